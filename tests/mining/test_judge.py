"""The model's judge in the `mine` stage, on a tiny Qwen2-VL: the speculative, batched judge
gives the sequential judge's clusters (mini-MMEB and synthetic subsets), in far fewer device
calls; over-length pairs follow the documented policy under on_bad_input=error and skip."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from g2e import mining
from g2e.data import mmeb, synthetic_mmeb
from g2e.data.errors import BadInput, BadInputReport
from g2e.data.preprocess import EmbedItem, Processor
from g2e.demo import mini_mmeb
from g2e.embedding import Embedder
from g2e.embedding_cache import EmbeddingCache
from g2e.mining import judge as judge_lib
from g2e.mining import stage
from g2e.mining.judge import Judge
from g2e.mining.judge_cache import JudgeCache
from g2e.pipeline import Pipeline
from tests.mining.tiny_mine import config_of, mine_settings, write_checkpoint


@pytest.fixture(scope="module")
def tiny_mine(tmp_path_factory):
    """A pipeline on a tiny checkpoint, its embedder and judge (compiled once), two data sets."""
    root = tmp_path_factory.mktemp("judge")
    model_dir = write_checkpoint(root / "model")
    mini_mmeb.build(str(root / "mini"), seed=0, train_rows=32, eval_queries=2, candidates=2)
    # Small pages (136x176) and photos: at most 128 patches an image, as the mini-MMEB's.
    synthetic_mmeb.build(
        str(root / "synth"),
        rows=64,
        subsets=2,
        eval_queries=2,
        candidates=2,
        page_fraction=0.25,
        image_scale=0.08,
        pool=8,
    )
    pipeline = Pipeline(
        config_of(mine_settings(model_dir, root / "mini", root / "work")), root / "work"
    )
    model = pipeline.model(trained=False)
    config = pipeline.config
    embedder = Embedder(
        model,
        pipeline.processor(),
        mesh=pipeline.mesh,
        rules=pipeline.rules,
        batch_size=config.mine.batch_size,
        progress=False,
    )
    judge = Judge(
        model,
        pipeline.processor(),
        mesh=pipeline.mesh,
        rules=pipeline.rules,
        batch_size=config.mine.judge_batch_size,
        progress=False,
    )
    return root, pipeline, embedder, judge


def _rows(pipeline, data_dir, subset):
    pipeline.config.data.train_dir = str(data_dir / "train")
    pipeline.config.data.train_image_root = str(data_dir)
    return mmeb.read_train_subset(
        str(data_dir / "train"), subset, "original", str(data_dir), BadInputReport("error")
    )


def _threshold_near_the_median(cache: JudgeCache) -> float:
    """A threshold in the widest gap between P(yes)s around their median: the judge then drops
    about half the pairs, and no answer lies within float noise of the threshold."""
    values = np.unique([p for p, _ in cache.answers.values()])
    middle = range(max(len(values) // 2 - 5, 0), min(len(values) // 2 + 5, len(values) - 1))
    i = max(middle, key=lambda j: values[j + 1] - values[j])
    return float(values[i] + values[i + 1]) / 2


@pytest.mark.parametrize(
    "data, subset", [("mini", "ColorCls"), ("mini", "ShapeGround"), ("synth", "SynthVQA_1")]
)
def test_batched_judge_gives_the_sequential_clusters(tiny_mine, tmp_path, data, subset):
    root, pipeline, embedder, judge = tiny_mine
    rows = _rows(pipeline, root / data, subset)
    embeddings = EmbeddingCache(tmp_path / "embeddings", "test")
    pipeline.config.mine.judge_threshold = 0.9  # The tiny model's P(yes) are all near 0.47.
    first = JudgeCache(tmp_path / "first", "test")
    stage.mine_subset(pipeline, subset, rows, embedder, embeddings, judge, first)
    pipeline.config.mine.judge_threshold = _threshold_near_the_median(first)

    batched = stage.mine_subset(
        pipeline,
        subset,
        rows,
        embedder,
        embeddings,
        judge,
        JudgeCache(tmp_path / "batched", "test"),
    )
    sequential = stage.mine_subset(
        pipeline, subset, rows, embedder, embeddings, judge, None, sequential=True
    )
    assert batched.clusters == sequential.clusters
    assert batched.phases == sequential.phases
    ours, reference = batched.report["judge"], sequential.report["judge"]
    assert ours["mode"] == "batched" and reference["mode"] == "sequential"
    assert ours["dropped"] == reference["dropped"] > 0
    assert ours["consulted"] == reference["consulted"]
    # Batched: a device call holds up to 2 pairs x 8 devices; the sequential judge's hold
    # one anchor round (at most top_k = 3 pairs) each.
    assert ours["calls"] < reference["calls"] / 2
    assert ours["pairs"] / ours["calls"] > 3 >= reference["pairs"] / reference["calls"]
    for phase in ("phase1", "phase2"):
        assert {"judge_calls", "judge_pairs"} <= set(batched.report[phase])


NOISE = np.random.RandomState(0).randint(0, 256, (224, 224, 3), dtype=np.uint8)


def _pairs(missing_image: str | None = None):
    """(query, candidate) pairs for the judge prompt at max_length 104 (tests.assets' tokenizer):
    its template and labels are 102 tokens with these short texts, of which ~90 cannot be cut;
    a 224x224 image is 64 tokens, 36, 16 and 9 at 1/2, 1/4 and 1/8 of its pixels. So one image
    fits at 1/8 of its pixels and two never do."""
    image = Image.fromarray(NOISE)
    long_text = " ".join(["red circle and blue square"] * 60)  # ~300 tokens

    def query(text, with_image):
        return EmbedItem(
            ("<|image_1|>\n" if with_image else "") + text,
            image if with_image else None,
            "query",
            "Toy",
            0,
        )

    def candidate(text, with_image):
        return EmbedItem(
            ("<|image_1|>\n" if with_image else "") + text,
            image if with_image else None,
            "candidate",
        )

    pairs = [
        (query("a query", False), candidate("a candidate", False)),  # fits
        (query("a query", True), candidate("a candidate", False)),  # fits at 1/8
        (query("a query", True), candidate("a candidate", True)),  # never fits
        (query(long_text, False), candidate(long_text, False)),  # texts far over
    ]
    if missing_image:
        pairs.append(
            (query("a query", False), EmbedItem("<|image_1|>\nx", missing_image, "candidate"))
        )
    return pairs


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_over_length_pairs_are_downscaled_or_kept_unjudged(tiny_mine, tmp_path, policy):
    root, pipeline, _, _ = tiny_mine
    processor = Processor.from_dir(
        root / "model",
        max_length=104,
        image_resolution="processor",
        length_buckets=(128,),
        patch_buckets=(0, 512),
        on_bad_input=policy,
    )
    judge = Judge(
        pipeline.model(trained=False),
        processor,
        mesh=pipeline.mesh,
        rules=pipeline.rules,
        batch_size=1,
        progress=False,
    )
    missing = str(tmp_path / "missing.jpg")
    if policy == "error":
        result = judge.judge(_pairs())
        with pytest.raises(BadInput, match="missing image"):
            judge.judge(_pairs(missing))
    else:
        result = judge.judge(_pairs(missing))
        assert processor.report.total == 1  # the missing image, not the over-length pairs
    expected = [mining.JUDGED, mining.DOWNSCALED, mining.UNJUDGED, mining.UNJUDGED]
    assert result.status.tolist()[:4] == expected
    assert np.all(np.isfinite(result.p_yes))
    assert np.all((result.p_yes[:2] > 0) & (result.p_yes[:2] < 1))
    assert result.p_yes[2:].tolist() == [0.0] * (len(result.p_yes) - 2)
    if policy == "skip":
        assert result.status[4] == mining.UNJUDGED
    assert result.device_calls == 1  # every pair in one step of 8 (1 per device)


def test_each_image_is_loaded_once_not_once_per_pair(tiny_mine, monkeypatch):
    root, pipeline, _, judge = tiny_mine
    rows = _rows(pipeline, root / "mini", "ShapeGround")  # image queries, image positives
    anchor = stage.query_item(rows[0])
    pairs = [(anchor, stage.positive_item(rows[i])) for i in range(1, 6)]
    loaded = []
    load = judge.processor.load_images
    # Earlier tests judged these rows with the same judge: start from an empty image memo.
    monkeypatch.setattr(judge_lib, "_IMAGE_MEMO", {})
    monkeypatch.setattr(
        judge.processor,
        "load_images",
        lambda sources, **kw: loaded.extend(sources) or load(sources, **kw),
    )
    first = judge(pairs)
    assert sorted(map(str, loaded)) == sorted(
        {str(p[0].image) for p in pairs[:1]} | {str(c.image) for _, c in pairs}
    )
    second = judge(pairs)  # Kept between calls (the later rounds of a block).
    assert len(loaded) == 6
    np.testing.assert_array_equal(first, second)


def test_pairs_encode_as_the_processors_own_encode_judge(tiny_mine):
    # Under `random` (mining's policy) the image is resized once and encoded without the
    # policy again: token ids and patches must equal the processor's own pair encoding.
    root, pipeline, _, judge = tiny_mine
    processor = Processor.from_dir(root / "model", max_length=512, image_resolution="random")
    random_judge = Judge(
        pipeline.model(trained=False),
        processor,
        mesh=pipeline.mesh,
        rules=pipeline.rules,
        batch_size=1,
    )
    rows = _rows(pipeline, root / "mini", "ShapeGround")
    for q, c in [(stage.query_item(rows[0]), stage.positive_item(rows[i])) for i in (1, 2)]:
        expected = Processor.from_dir(
            root / "model", max_length=512, image_resolution="random"
        ).encode_judge(q, c)
        encoding = random_judge.pair_encoder((q, c))  # the function the workers run
        encoded, status = encoding.encoded, encoding.status
        assert status == mining.JUDGED
        np.testing.assert_array_equal(encoded.input_ids, expected.input_ids)
        np.testing.assert_array_equal(encoded.pixel_values, expected.pixel_values)
        assert encoded.image_grid_thw == expected.image_grid_thw
