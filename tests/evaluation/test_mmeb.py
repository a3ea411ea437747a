"""MMEB evaluator: precision@1 and ties, aggregates, dedupe, reports, a cache that survives a
SIGKILL."""

import hashlib
import json
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from g2e.data import mmeb, subsets
from g2e.data.errors import BadInput
from g2e.demo import mini_mmeb
from g2e.evaluation import mmeb as evaluation
from tests import killing

# A tiny MMEB-eval in the hub's layout, with real subset names so the MMEB table applies.
# Every text names a label; the fake embedder maps a text to its label's one-hot vector, so a
# query is right exactly when its label is its positive's. Expected precision@1 by hand:
#   ImageNet-1K (Classification, IND): 3 of 4 -> 75;  OK-VQA (VQA, IND): 1 of 2 -> 50;
#   RefCOCO (Grounding, OOD): 1 of 1 -> 100;          ScienceQA (VQA, OOD): 0 of 2 -> 0.
LABELS = ("cat", "dog", "bird", "car", "red", "blue", "yes", "no")
SUBSETS = {
    "ImageNet-1K": [  # (query text, query image, [(candidate text, candidate image), ...])
        ("<|image_1|> what is it? cat", "images/a.png", [("cat", ""), ("dog", ""), ("bird", "")]),
        ("<|image_1|> what is it? dog", "images/b.png", [("dog", ""), ("cat", ""), ("bird", "")]),
        ("<|image_1|> what is it? bird", "images/c.png", [("bird", ""), ("cat", ""), ("dog", "")]),
        ("<|image_1|> what is it? cat", "images/d.png", [("dog", ""), ("cat", ""), ("bird", "")]),
    ],
    "OK-VQA": [
        ("<|image_1|> colour? red", "images/a.png", [("red", ""), ("blue", "")]),
        ("<|image_1|> colour? red", "images/b.png", [("blue", ""), ("red", "")]),
    ],
    "RefCOCO": [
        (
            "<|image_1|> find the car",
            "images/a.png",
            [("car", "images/b.png"), ("dog", "images/c.png")],
        ),
    ],
    "ScienceQA": [
        ("is it? no", "", [("yes", ""), ("no", "")]),
        ("is it? no", "images/c.png", [("yes", ""), ("no", "")]),
    ],
}
EXPECTED = {"ImageNet-1K": 75.0, "OK-VQA": 50.0, "RefCOCO": 100.0, "ScienceQA": 0.0}


def label_vector(text: str) -> np.ndarray:
    """The one-hot vector of the last label word in `text`."""
    words = [w for w in text.replace("?", " ").split() if w in LABELS]
    vector = np.zeros(len(LABELS), np.float32)
    vector[LABELS.index(words[-1])] = 1.0
    return vector


class FakeEmbedder:
    """Deterministic embed_fn that records what it was asked."""

    def __init__(self):
        self.items = []
        self.calls = 0

    def __call__(self, items):
        self.calls += 1
        self.items.extend(items)
        return np.stack([label_vector(item.text) for item in items])


@pytest.fixture
def mmeb_eval(tmp_path):
    """(eval_dir, image_root) of the tiny MMEB-eval above."""
    eval_dir, image_root = tmp_path / "MMEB-eval", tmp_path / "images_root"
    os.makedirs(image_root / "images")
    for name in "abcd":
        (image_root / "images" / f"{name}.png").write_bytes(b"not decoded by the fake embedder")
    for subset, rows in SUBSETS.items():
        os.makedirs(eval_dir / subset)
        table = pa.table(
            {
                "qry_text": [r[0] for r in rows],
                "qry_img_path": [r[1] for r in rows],
                "tgt_text": [[c[0] for c in r[2]] for r in rows],
                "tgt_img_path": [[c[1] for c in r[2]] for r in rows],
            }
        )
        pq.write_table(table, eval_dir / subset / "test-00000-of-00001.parquet")
    return str(eval_dir), str(image_root)


def test_precision_at_1_with_ties():
    queries = np.array([[1.0, 0.0]], np.float32)
    candidates = np.array(
        [
            [2.0, 0.0],  # 0: cosine 1 (scale must not matter)
            [0.0, 1.0],  # 1: cosine 0
            [1.0, 1.0],  # 2: cosine 1/sqrt2
            [1.0, -1.0],  # 3: cosine 1/sqrt2, a tie with 2
            [-1.0, 0.0],  # 4: cosine -1
        ],
        np.float32,
    )
    rows = [
        [0, 1],  # positive best -> right
        [1, 0],  # another candidate better -> wrong
        [2, 3, 4],  # tie with another candidate: the positive (first maximum) wins -> right
        [3, 2],  # the same tie the other way round -> right
        [4, 1, 2],  # positive worst -> wrong
        [2, 2],  # the positive repeated -> right
        [1],  # a single candidate -> right
    ]
    correct = evaluation.precision_at_1(queries, candidates, [0] * len(rows), rows)
    np.testing.assert_array_equal(correct, [True, False, True, True, False, True, True])


def test_precision_at_1_rejects_a_row_without_candidates():
    with pytest.raises(ValueError, match="row 1 has no candidates"):
        evaluation.precision_at_1(np.eye(2), np.eye(2), [0, 0], [[0], []])


def test_aggregate_means_over_present_subsets():
    def result(score, task, split):
        return {"precision_at_1": score, "meta_task": task, "split": split, "num_queries": 1}

    summary = evaluation.aggregate(
        {
            "A": result(10.0, "Classification", "IND"),
            "B": result(20.0, "Classification", "OOD"),
            "C": result(40.0, "VQA", "IND"),
            "D": result(90.0, "Grounding", "OOD"),
        }
    )
    assert summary["meta_tasks"] == {"Classification": 15.0, "VQA": 40.0, "Grounding": 90.0}
    assert summary["IND"] == 25.0
    assert summary["OOD"] == 55.0
    assert summary["overall"] == 40.0
    assert "Retrieval" not in summary["meta_tasks"]
    only_ind = evaluation.aggregate({"A": result(10.0, "Classification", "IND")})
    assert only_ind["OOD"] is None and only_ind["IND"] == 10.0


def test_evaluate_mmeb_known_answers_and_reports(mmeb_eval, tmp_path):
    eval_dir, image_root = mmeb_eval
    out_dir = tmp_path / "eval_zero_shot"
    summary = evaluation.evaluate_mmeb(
        FakeEmbedder(),
        eval_dir=eval_dir,
        image_root=image_root,
        out_dir=str(out_dir),
        batch_size=2,
        progress=False,
        model_name="fake",
    )
    assert {n: r["precision_at_1"] for n, r in summary["subsets"].items()} == EXPECTED
    assert summary["subsets"]["RefCOCO"] == {
        "precision_at_1": 100.0,
        "meta_task": "Grounding",
        "split": "OOD",
        "num_queries": 1,
        "num_correct": 1,
        "num_unique_queries": 1,
        "num_unique_candidates": 2,
        "num_skipped_rows": 0,
        "chance": 50.0,
        "correct": "1",
    }
    assert summary["subsets"]["ImageNet-1K"]["correct"] == "1110"  # row by row
    assert summary["meta_tasks"] == {"Classification": 75.0, "VQA": 25.0, "Grounding": 100.0}
    assert (summary["IND"], summary["OOD"], summary["overall"]) == (62.5, 50.0, 56.25)
    # The leaderboard's order: meta-task, then IND before OOD.
    assert list(summary["subsets"]) == ["ImageNet-1K", "OK-VQA", "ScienceQA", "RefCOCO"]

    assert json.loads((out_dir / "results.json").read_text()) == summary
    markdown = (out_dir / "results.md").read_text().splitlines()
    assert markdown[2] == (
        "| Model | Classification | VQA | Retrieval | Grounding | IND | OOD | Overall |"
    )
    assert "| fake | 75.0 | 25.0 | - | 100.0 | 62.5 | 50.0 | 56.2 |" in markdown
    assert "| RefCOCO | Grounding | OOD | 1 | 100.0 |" in markdown
    assert (out_dir / "results.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    for subset in SUBSETS:
        index = json.loads((out_dir / "cache" / subset / "candidates.json").read_text())
        assert np.load(out_dir / "cache" / subset / "candidates" / "00000.npy").shape == (
            index["count"],
            len(LABELS),
        )
        assert index["count"] == summary["subsets"][subset]["num_unique_candidates"]


def test_candidates_repeated_across_rows_are_embedded_once(mmeb_eval, tmp_path):
    eval_dir, image_root = mmeb_eval
    embedder = FakeEmbedder()
    evaluation.evaluate_mmeb(
        embedder,
        eval_dir=eval_dir,
        image_root=image_root,
        out_dir=str(tmp_path / "out"),
        subsets="ImageNet-1K",
        batch_size=4,
        progress=False,
    )
    candidates = [i.text for i in embedder.items if i.role == "candidate"]
    queries = [(i.text, i.image) for i in embedder.items if i.role == "query"]
    # 4 rows x 3 candidates name only cat, dog and bird.
    assert sorted(candidates) == ["bird", "cat", "dog"]
    # Rows 1 and 4 share a text but not an image: two queries.
    assert len(queries) == 4 and len(set(queries)) == 4
    assert all(i.subset == "ImageNet-1K" for i in embedder.items)
    assert all(os.path.isabs(i.image) for i in embedder.items if i.role == "query")


def test_subsets_option_limits_the_run(mmeb_eval, tmp_path):
    eval_dir, image_root = mmeb_eval
    summary = evaluation.evaluate_mmeb(
        FakeEmbedder(),
        eval_dir=eval_dir,
        image_root=image_root,
        out_dir=str(tmp_path / "out"),
        subsets="OK-VQA, RefCOCO",
        progress=False,
    )
    assert list(summary["subsets"]) == ["OK-VQA", "RefCOCO"]
    assert summary["overall"] == 75.0


def test_evaluation_killed_mid_subset_resumes_from_its_stored_shards(mmeb_eval, tmp_path):
    """A real SIGKILL (no cleanup runs) after OK-VQA's first query shard: the rerun embeds only
    what was not stored (no ImageNet-1K item, one OK-VQA query) and writes the results of an
    uninterrupted run, byte for byte."""
    eval_dir, image_root = mmeb_eval
    run = dict(
        eval_dir=eval_dir,
        image_root=image_root,
        batch_size=1,
        progress=False,
        fingerprint="model-a",
        cache_options=dict(shard_size=1, dtype="float16"),
    )
    reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
    reference = FakeEmbedder()
    evaluation.evaluate_mmeb(reference, out_dir=str(reference_dir), **run)

    # Subsets run in the leaderboard's order: ImageNet-1K, OK-VQA, ScienceQA, RefCOCO.
    command = [sys.executable, "-m", "tests.evaluation.killable_eval"]
    killing.kill_at(
        [*command, json.dumps(dict(run, out_dir=str(resumed_dir)))],
        "embedding_shard_OK-VQA/queries_0",
        tmp_path / "killed.log",
    )
    assert not (resumed_dir / "results.json").exists()
    cache = resumed_dir / "cache"
    assert sorted(p.name for p in (cache / "OK-VQA" / "queries").iterdir()) == ["00000.npy"]
    assert not (cache / "OK-VQA" / "candidates").exists()

    rerun = FakeEmbedder()
    evaluation.evaluate_mmeb(rerun, out_dir=str(resumed_dir), **run)
    embedded = [(i.subset, i.role) for i in rerun.items]
    # OK-VQA's queries and candidates are embedded together, shard by shard: the rerun embeds
    # its two candidates and its second query (not the stored first), then the later subsets.
    assert sorted(embedded[:3]) == [("OK-VQA", "candidate")] * 2 + [("OK-VQA", "query")]
    assert embedded[3:] == [
        (i.subset, i.role) for i in reference.items if i.subset in ("ScienceQA", "RefCOCO")
    ]
    (query,) = [i for i in rerun.items[:3] if i.role == "query"]
    assert query.image.endswith("b.png")
    for name in ("results.json", "results.md"):
        assert (resumed_dir / name).read_bytes() == (reference_dir / name).read_bytes(), name
    shard = np.load(cache / "ImageNet-1K" / "queries" / "00000.npy")
    assert shard.dtype == np.float16

    # A third run embeds nothing; another fingerprint (model or prompt) re-embeds everything.
    third = FakeEmbedder()
    evaluation.evaluate_mmeb(third, out_dir=str(resumed_dir), **run)
    assert third.calls == 0
    other_model = FakeEmbedder()
    evaluation.evaluate_mmeb(
        other_model, out_dir=str(resumed_dir), **{**run, "fingerprint": "model-b"}
    )
    assert len(other_model.items) == len(reference.items)


def test_a_truncated_cache_is_recomputed(mmeb_eval, tmp_path):
    eval_dir, image_root = mmeb_eval
    run = dict(
        eval_dir=eval_dir,
        image_root=image_root,
        subsets="OK-VQA",
        progress=False,
        out_dir=str(tmp_path / "out"),
    )
    evaluation.evaluate_mmeb(FakeEmbedder(), **run)
    candidates = tmp_path / "out" / "cache" / "OK-VQA" / "candidates" / "00000.npy"
    candidates.write_bytes(candidates.read_bytes()[:40])
    again = FakeEmbedder()
    summary = evaluation.evaluate_mmeb(again, **run)
    assert again.calls > 0 and summary["overall"] == 50.0


def test_bad_embeddings_are_reported_with_the_subset(mmeb_eval, tmp_path):
    eval_dir, image_root = mmeb_eval

    def nan_embedder(items):
        return np.full((len(items), 4), np.nan, np.float32)

    with pytest.raises(ValueError, match="OK-VQA queries.*non-finite"):
        evaluation.evaluate_mmeb(
            nan_embedder,
            eval_dir=eval_dir,
            image_root=image_root,
            out_dir=str(tmp_path / "out"),
            subsets="OK-VQA",
            progress=False,
        )


def test_bad_rows_and_unknown_subsets_error_or_are_skipped(mmeb_eval, tmp_path):
    eval_dir, image_root = mmeb_eval
    os.remove(os.path.join(image_root, "images", "d.png"))  # ImageNet-1K's (wrong) row 4
    run = dict(
        eval_dir=eval_dir, image_root=image_root, progress=False, subsets="ImageNet-1K,NotASubset"
    )
    with pytest.raises(subsets.UnknownSubsetError, match="NotASubset"):
        evaluation.evaluate_mmeb(FakeEmbedder(), out_dir=str(tmp_path / "a"), **run)
    with pytest.raises(BadInput, match="ImageNet-1K.*d.png"):
        evaluation.evaluate_mmeb(
            FakeEmbedder(), out_dir=str(tmp_path / "b"), **{**run, "subsets": "ImageNet-1K"}
        )
    summary = evaluation.evaluate_mmeb(
        FakeEmbedder(), out_dir=str(tmp_path / "c"), on_bad_input="skip", **run
    )
    assert list(summary["subsets"]) == ["ImageNet-1K"]
    assert summary["subsets"]["ImageNet-1K"]["precision_at_1"] == 100.0
    assert summary["subsets"]["ImageNet-1K"]["num_skipped_rows"] == 1
    assert "NotASubset" in summary["skipped_subsets"]


def test_precision_at_1_matches_a_per_row_reference_across_blocks():
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(30, 8)).astype(np.float32)
    candidates = rng.normal(size=(50, 8)).astype(np.float32)
    rows = [rng.choice(50, size=rng.integers(1, 12), replace=False) for _ in range(150)]
    row_query = rng.integers(0, 30, size=150)
    correct = evaluation.precision_at_1(queries, candidates, row_query, rows)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    expected = [
        np.argmax(unit(candidates[ids]) @ unit(queries[q])) == 0 for q, ids in zip(row_query, rows)
    ]
    np.testing.assert_array_equal(correct, expected)
    assert 0 < correct.sum() < 150


def hashed_vector(text: str, image, role: str) -> np.ndarray:
    """A deterministic pseudo-random embedding of (text, image file, role)."""
    name = "" if image is None else os.path.basename(image)
    seed = int.from_bytes(hashlib.sha1(f"{role}|{text}|{name}".encode()).digest()[:8], "little")
    return np.random.default_rng(seed).normal(size=16).astype(np.float32)


def test_mini_mmeb_matches_a_row_by_row_reference(tmp_path):
    """On the mini-MMEB's real layout and manifest, dedupe + cache change nothing: the result
    equals embedding every query and candidate of every row separately."""
    data = tmp_path / "mini"
    mini_mmeb.build(str(data), seed=0, train_rows=1, eval_queries=6, candidates=4)
    manifest = subsets.known_subsets(str(data / "eval"))
    summary = evaluation.evaluate_mmeb(
        lambda items: np.stack([hashed_vector(i.text, i.image, i.role) for i in items]),
        eval_dir=str(data / "eval"),
        image_root=str(data),
        out_dir=str(tmp_path / "out"),
        batch_size=5,
        progress=False,
    )
    assert set(summary["subsets"]) == set(manifest)
    for name, result in summary["subsets"].items():
        assert result["split"] == manifest[name].group
        assert result["meta_task"].lower() == manifest[name].meta_task
        rows = mmeb.read_eval_subset(str(data / "eval"), name, str(data))
        right = 0
        for row in rows:
            query = hashed_vector(row.qry_text, row.qry_image, "query")
            scores = [
                cos(query, hashed_vector(t, i, "candidate"))
                for t, i in zip(row.tgt_texts, row.tgt_images)
            ]
            right += int(np.argmax(scores)) == 0
        assert result["precision_at_1"] == pytest.approx(100.0 * right / len(rows))
    assert summary["overall"] == pytest.approx(
        np.mean([r["precision_at_1"] for r in summary["subsets"].values()])
    )


def cos(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_items_the_embedder_skipped_drop_their_rows_under_skip(mmeb_eval, tmp_path):
    eval_dir, image_root = mmeb_eval

    class SkipsImageD(FakeEmbedder):
        """Returns NaN for d.png, as the Embedder does for an input it skipped as bad."""

        def __call__(self, items):
            embeddings = super().__call__(items)
            for row, item in enumerate(items):
                if item.image and item.image.endswith("d.png"):
                    embeddings[row] = np.nan
            return embeddings

    run = dict(eval_dir=eval_dir, image_root=image_root, subsets="ImageNet-1K", progress=False)
    with pytest.raises(ValueError, match="ImageNet-1K queries.*non-finite"):
        evaluation.evaluate_mmeb(SkipsImageD(), out_dir=str(tmp_path / "a"), **run)
    for attempt in range(2):  # The second run reads the cache, NaN rows included.
        embedder = SkipsImageD()
        summary = evaluation.evaluate_mmeb(
            embedder, out_dir=str(tmp_path / "b"), on_bad_input="skip", **run
        )
        result = summary["subsets"]["ImageNet-1K"]
        assert (result["precision_at_1"], result["num_queries"]) == (100.0, 3)
        assert result["num_skipped_rows"] == 1
        assert embedder.calls == (0 if attempt else 1)  # queries and candidates together
