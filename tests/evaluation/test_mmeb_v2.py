"""MMEB-V2: the task table, NDCG@5 and the streaming top-k against hand computations, and the
generated mini-MMEB-V2 read and scored end to end with embedders whose rankings are known."""

import json

import numpy as np
import pytest

from g2e.data import mmeb_v2
from g2e.demo import mini_mmeb_v2
from g2e.evaluation import mmeb_v2 as evaluation


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini_mmeb_v2")
    mini_mmeb_v2.write(root, seed=3, queries_per_task=12)
    return root


def test_the_table_holds_the_78_scored_tasks():
    counts = {m: sum(t.modality == m for t in mmeb_v2.TASKS) for m in mmeb_v2.MODALITIES}
    assert counts == {"image": 36, "video": 18, "visdoc": 24}
    meta = {m: sum(t.meta_task == m for t in mmeb_v2.TASKS) for m in mmeb_v2.META_TASKS}
    assert meta == {
        "I-CLS": 10,
        "I-QA": 10,
        "I-RET": 12,
        "I-VG": 4,
        "V-CLS": 5,
        "V-QA": 5,
        "V-RET": 5,
        "V-MRET": 3,
        "VDR-V1": 10,
        "VDR-V2": 4,
        "VisRAG": 6,
        "VisDoc-OOD": 4,
    }
    assert len({t.name for t in mmeb_v2.TASKS}) == 78
    assert [t.name for t in mmeb_v2.select_tasks("video,ViDoRe_docvqa")][-1] == "ViDoRe_docvqa"
    with pytest.raises(mmeb_v2.UnknownTaskError, match="MSR-VTTT"):
        mmeb_v2.select_tasks("MSR-VTTT")


def test_two_copies_of_a_repository_read_their_own_rows(tmp_path):
    """datasets' on-disk cache keys a local folder by its repository name: a copy read after
    another must not get the other's rows."""
    for seed in (0, 1):
        mini_mmeb_v2.write(tmp_path / f"copy{seed}", seed=seed, queries_per_task=4)
    read = [
        mmeb_v2.Reader(tmp_path / f"copy{seed}").read(mmeb_v2.task("MSR-VTT")) for seed in (0, 1)
    ]
    assert read[0].queries != read[1].queries
    written = mmeb_v2.Reader(tmp_path / "copy1").rows(mmeb_v2.task("MSR-VTT"))
    assert [r["caption"] for r in written] == [q.text.split(": ")[1] for q in read[1].queries]


def test_ndcg_at_5_equals_a_hand_computation():
    gains = {"a": 3.0, "b": 2.0, "c": 1.0}
    # Ranked: x, b, a, y, c. DCG = 2/log2(3) + 3/log2(4) + 1/log2(6) = 1.26186 + 1.5 + 0.38685;
    # IDCG = 3 + 2/log2(3) + 1/log2(4) = 3 + 1.26186 + 0.5.
    hit, ndcg = evaluation.query_metrics(["x", "b", "a", "y", "c", "a"], gains)
    assert hit == 0.0
    assert ndcg == pytest.approx((1.261860 + 1.5 + 0.386853) / (3 + 1.261860 + 0.5), abs=1e-6)
    # Only the first five count; a relevant page at rank 6 adds nothing.
    assert evaluation.query_metrics(["x"] * 5 + ["a"], gains) == (0.0, 0.0)
    assert evaluation.query_metrics(["a", "b", "c"], gains) == (1.0, pytest.approx(1.0))


def test_streaming_top_k_equals_a_full_sort_and_gives_ties_to_the_lower_row():
    rng = np.random.default_rng(0)
    # Small integers: many exact ties.
    queries = rng.integers(-2, 3, size=(9, 4)).astype(np.float32)
    pool = rng.integers(-2, 3, size=(50, 4)).astype(np.float32)
    scores = queries @ pool.T
    expected = np.stack([np.lexsort((np.arange(50), -row))[:5] for row in scores])
    np.testing.assert_array_equal(evaluation.top_k(queries, pool, 5, block=7), expected)
    np.testing.assert_array_equal(evaluation.top_k(queries, pool, 5, block=4096), expected)
    assert evaluation.top_k(queries, pool[:3], 5).shape == (9, 3)


def _constant(items):
    """Every input the same vector: every ranking a tie, so the first listed wins."""
    return np.ones((len(items), 4), np.float32)


def test_the_mini_mmeb_v2_read_and_scored_equals_a_hand_computation(mini, tmp_path):
    results = evaluation.evaluate_mmeb_v2(
        _constant,
        data_dir=str(mini),
        out_dir=str(tmp_path),
        tasks=mini_mmeb_v2.TASK_NAMES,
        batch_size=5,
    )
    tasks = results["tasks"]
    assert list(tasks) == list(mini_mmeb_v2.TASK_NAMES)
    # Local lists: the first candidate wins every tie. ImageNet-1K and MSCOCO_t2i list the
    # positive first (MMEB-V1's rows): 100.
    assert tasks["ImageNet-1K"]["score"] == 100.0
    assert tasks["MSCOCO_t2i"]["score"] == 100.0
    # NExTQA lists left, right, up, down, ...: right only where the answer is 'left'.
    reader = mmeb_v2.Reader(mini)
    qa = reader.read(mmeb_v2.task("NExTQA"))
    lefts = sum(r == {"left": 1.0} for r in qa.relevance)
    assert tasks["NExTQA"]["score"] == pytest.approx(100.0 * lefts / 12)
    # QVHighlight lists its clips sorted by folder: negative_*, then positive: never first.
    assert tasks["QVHighlight"]["score"] == 0.0
    # Global pools rank in pool order: the first row's video / label wins.
    ret = reader.read(mmeb_v2.task("MSR-VTT"))
    assert tasks["MSR-VTT"]["score"] == pytest.approx(100.0 / 12)
    assert ret.relevance[0] == {"video0000": 1.0}
    cls = reader.read(mmeb_v2.task("Kinetics-700"))
    first_label = next(iter(cls.pool))
    expected = 100.0 * sum(r == {first_label: 1.0} for r in cls.relevance) / 12
    assert tasks["Kinetics-700"]["score"] == pytest.approx(expected)
    # ViDoRe: top five = page000_0 (gain 2), page000_1 (1), page001_0 (2), page001_1 (1),
    # page002_0 (2). q000: DCG = IDCG -> 1. q001: (2/log2 4 + 1/log2 5) / (2 + 1/log2 3).
    # q002: (2/log2 6) / (2 + 1/log2 3). The other nine: 0. The unjudged query is not scored.
    idcg = 2 + 1 / np.log2(3)
    q001 = (2 / np.log2(4) + 1 / np.log2(5)) / idcg
    q002 = (2 / np.log2(6)) / idcg
    assert tasks["ViDoRe_docvqa"]["metric"] == "ndcg_linear@5"
    assert tasks["ViDoRe_docvqa"]["num_queries"] == 12
    assert tasks["ViDoRe_docvqa"]["score"] == pytest.approx(100 * (1 + q001 + q002) / 12)
    # Means: meta-task, modality, overall over tasks.
    assert results["meta_tasks"]["I-CLS"] == 100.0
    assert results["modalities"]["video"] == pytest.approx(
        np.mean([tasks[n]["score"] for n in ("Kinetics-700", "MSR-VTT", "NExTQA", "QVHighlight")])
    )
    assert results["overall"] == pytest.approx(np.mean([t["score"] for t in tasks.values()]))
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["overall"] == pytest.approx(results["overall"])
    assert (
        "| ViDoRe_docvqa | visdoc | VDR-V1 | global | ndcg_linear@5 |"
        in (tmp_path / "results.md").read_text()
    )


def test_an_embedder_that_knows_the_truth_scores_100(mini, tmp_path):
    """Items embedded by what they show (the generator's words in their text or folder name)
    rank their relevant candidates first: every task scores 100 (hit@1) or its ideal NDCG."""
    reader = mmeb_v2.Reader(mini)
    truth: dict[str, np.ndarray] = {}
    for name in mini_mmeb_v2.TASK_NAMES:
        data = reader.read(mmeb_v2.task(name))
        pool = list(data.pool)
        for query, gains in zip(data.queries, data.relevance):
            vector = np.zeros(len(pool), np.float32)
            for page, gain in gains.items():
                vector[pool.index(page)] = gain
            truth[repr(query)] = vector
        for row, candidate in enumerate(data.pool.values()):
            truth.setdefault(repr(candidate), np.eye(len(pool), dtype=np.float32)[row])

    def oracle(items):
        out = []
        for item in items:
            key = mmeb_v2.Input(item.text, item.image, getattr(item, "video", None))
            out.append(truth[repr(key)])
        width = max(len(v) for v in out)
        return np.stack([np.pad(v, (0, width - len(v))) for v in out])

    results = {}
    for name in mini_mmeb_v2.TASK_NAMES:
        data = reader.read(mmeb_v2.task(name))
        results[name] = evaluation.evaluate_task(oracle, data, batch_size=1000)["score"]
    assert results == {name: pytest.approx(100.0) for name in mini_mmeb_v2.TASK_NAMES}


def _reader_of(tables, tmp_path):
    """A Reader whose `load` serves in-memory rows: {(repo, config, split): rows}."""

    def load(root, repo, config, split):
        return tables[(repo, config, split)]

    return mmeb_v2.Reader(tmp_path, load=load)


def test_the_video_parsers_write_queries_and_candidates_as_the_public_code(tmp_path):
    frames = tmp_path / mmeb_v2.ASSETS_REPO / "video-tasks" / "frames"
    tables = {
        ("VLM2Vec/SmthSmthV2", None, "test"): [
            {"video_id": "v1", "pos_text": "Pushing sth", "neg_text": ["Pulling sth", "Lifting"]}
        ],
        ("VLM2Vec/Video-MME", None, "test"): [
            {
                "question": "What colour?",
                "videoID": "abc",
                "options": ["A. red", "B. blue", "C. green", "D. pink"],
                "answer": "B",
            }
        ],
        ("VLM2Vec/EgoSchema", "Subset", "test"): [
            {
                "question": "Why?",
                "video_idx": "e1",
                "option": ["A. one", "B. two", "C. three"],
                "answer": "2",
            }
        ],
        ("VLM2Vec/ActivityNetQA", None, "test"): [
            {"question": "Is it raining", "video_name": "v_9", "answer": "no"}
        ],
        ("VLM2Vec/VATEX", None, "test"): [{"videoID": "vx", "enCap": ["first", "second"]}],
        ("VLM2Vec/MomentSeeker", None, "test"): [
            {
                "query": "a dog jumps",
                "input_frames": "query_dog.jpg",
                "positive_frames": [{"output_path": "clips/a/0.mp4"}],
                "negative_frames": [{"output_path": "clips/b/1.mp4"}],
            }
        ],
    }
    reader = _reader_of(tables, tmp_path)
    ssv2 = reader.read(mmeb_v2.task("SmthSmthV2"))
    assert ssv2.candidates == [["Pushing sth", "Pulling sth", "Lifting"]]
    assert ssv2.queries[0].video == str(frames / "video_cls" / "SmthSmthV2" / "v1")
    mme = reader.read(mmeb_v2.task("Video-MME"))
    assert mme.candidates == [["red", "blue", "green", "pink"]]
    assert mme.relevance == [{"blue": 1.0}]
    assert mme.queries[0].text == (
        evaluation.mmeb_v2.QA_INSTRUCTION + " What colour?\nA. red\nB. blue\nC. green\nD. pink"
    )
    ego = reader.read(mmeb_v2.task("EgoSchema"))
    assert ego.relevance == [{"three": 1.0}]
    assert ego.queries[0].text.endswith("Why?A. one B. two C. three")
    anet = reader.read(mmeb_v2.task("ActivityNetQA"))
    assert anet.relevance == [{"no": 1.0}] and anet.queries[0].text.endswith(
        "raining? (A) yes; (B) no."
    )
    vatex = reader.read(mmeb_v2.task("VATEX"))
    assert vatex.queries[0].text == "Select a video that fits the description provided: first"
    assert list(vatex.pool) == ["vx"] and vatex.candidates is None
    moment = reader.read(mmeb_v2.task("MomentSeeker"))
    assert moment.queries[0].image == str(frames / "video_mret" / "MomentSeeker" / "query_dog.jpg")
    positive, negative = moment.candidates[0]
    assert positive.endswith("video_frames/clips_a_0.mp4") and moment.relevance == [{positive: 1.0}]
    assert negative.endswith("video_frames/clips_b_1.mp4")


def test_a_visual_document_query_naming_a_page_the_corpus_lacks_is_an_error(tmp_path):
    repo = "vidore/docvqa_test_subsampled_beir"
    tables = {
        (repo, "queries", "test"): [{"query-id": "q1", "query": "where?"}],
        (repo, "qrels", "test"): [
            {"query-id": "q1", "corpus-id": "p9", "score": 1},
            {"query-id": "q1", "corpus-id": "p1", "score": 0},  # gain 0: dropped
        ],
        (repo, "corpus", "test"): [{"corpus-id": "p1", "image": b"png"}],
    }
    with pytest.raises(ValueError, match=r"query q1 names pages \['p9'\]"):
        _reader_of(tables, tmp_path).read(mmeb_v2.task("ViDoRe_docvqa"))


def test_an_unknown_task_in_the_config_names_the_key():
    from g2e import configuration
    from g2e.main import STAGE_NAMES

    config = configuration.base_config()
    config.model_dir, config.stages = "/m", "eval_mmeb_v2"
    config.data.mmeb_v2_dir, config.data.mmeb_v2_tasks = "/v2", "video,MSR-VTTT"
    with pytest.raises(configuration.ConfigError, match="data.mmeb_v2_tasks: 'MSR-VTTT'"):
        configuration.validate(config, STAGE_NAMES)
