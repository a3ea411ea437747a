"""Training the tiny Qwen2-VL: merged adapters, and a short run on a mini-MMEB."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from g2e import configuration, mining
from g2e.data import mmeb, prompts
from g2e.data import rows as rows_lib
from g2e.data.errors import BadInputReport
from g2e.data.preprocess import Processor
from g2e.demo import mini_mmeb, wording
from g2e.mining import stage as mine_stage
from g2e.models import lora, sharding
from g2e.models.config import Qwen2VLConfig
from g2e.models.qwen2_vl import Qwen2VL
from g2e.pipeline import Pipeline
from g2e.training import batches
from g2e.training import loss as loss_lib
from g2e.training import stage as training_stage


def _model(model_dir, kind="dora", dropout=0.0, seed=0):
    config = Qwen2VLConfig.from_dir(model_dir)
    adapter = lora.AdapterConfig(kind=kind, r=4, alpha=16, dropout=dropout)
    return Qwen2VL(config, adapter=adapter, rngs=nnx.Rngs(seed))


def _processor(model_dir):
    # One length and one patch bucket: every batch has the same shape, one compilation.
    return Processor.from_dir(
        model_dir,
        max_length=128,
        image_resolution="processor",
        length_buckets=(128,),
        patch_buckets=(64,),
    )


def _rows(root):
    return [
        row
        for subset in ("ShapeCaption_t2i", "ShapeCaption_i2t")
        for row in mmeb.read_train_subset(
            str(root / "data" / "train"), subset, "original", str(root / "data")
        )
    ]


def _distinct_captions(rows):
    """Rows whose caption (the text side: the i2t positive or the t2i query) means something
    no earlier row's does."""
    seen, kept = set(), []
    for row in rows:
        caption = (row.pos_text or row.qry_text).rsplit(":", 1)[-1].strip()
        meaning = wording.canonical(caption)
        if meaning not in seen:
            seen.add(meaning)
            kept.append(row)
    return kept


def move_adapters(model, seed: int = 5) -> None:
    """Moves the adapters off their identity initialisation (random steps of 0.2)."""
    _, adapters, _ = nnx.split(model, nnx.LoRAParam, ...)
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    nnx.update(
        model,
        jax.tree.map(lambda x: x + 0.2 * jax.random.normal(next(keys), x.shape, x.dtype), adapters),
    )


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_merged_model_embeds_like_the_adapted_one(assets, kind):
    model = _model(assets / "model", kind)
    move_adapters(model)
    rows = _rows(assets)[:3]
    codec = batches.RowCodec(_processor(assets / "model"), rows, image_root=None)
    batch = codec.collate([codec.encode(i) for i in range(3)])
    adapted = [np.asarray(model.embed(batch[side])) for side in ("query", "candidate")]
    assert lora.merge_adapters(model) == 5  # q, k, v, o, down (stacked layers merge at once)
    assert not jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
    merged = [np.asarray(model.embed(batch[side])) for side in ("query", "candidate")]
    for a, m in zip(adapted, merged):
        np.testing.assert_allclose(m, a, atol=2e-5, rtol=0)
    assert np.abs(adapted[0] - adapted[1]).max() > 1e-3


@pytest.mark.slow
def test_short_run_on_mini_mmeb_lowers_the_loss(assets, tmp_path):
    model_dir = assets / "model"
    # Dropout 0: on a random 2-layer model the pairs differ little, and dropout noise in the
    # adapter path (0.1, as the recipe) keeps the loss near chance for many more steps.
    model = _model(model_dir, dropout=0.0, seed=1)
    # 8 retrieval rows with distinct captions (the mini-MMEB also rewords reused captions) in
    # 2 clusters fill exactly one batch.
    rows = _distinct_captions(_rows(assets))[:8]
    processor = _processor(model_dir)
    mesh = jax.make_mesh(
        (2, 1, 1),
        ("data", "fsdp", "tensor"),
        axis_types=(AxisType.Auto,) * 3,
        devices=jax.devices()[:2],
    )
    config = configuration.base_config()
    config.seed = 0
    config.data.train_image_root = ""
    config.train.update(
        dict(
            steps=24,
            lr=5e-3,
            warmup_steps=1,
            weight_decay=0.0,
            grad_clip=1.0,
            global_batch=8,
            cluster_size=4,
            temperature=0.02,
            use_clusters=True,
            checkpoint_every=100,
            keep_checkpoints=1,
            log_every=1,
            vision_chunk=0,
        )
    )
    config.train.adapter.kind = "dora"
    # Clusters of same-subset rows, as mining would give (anchors first).
    clusters = [list(range(i, i + 4)) for i in range(0, len(rows) - 3, 4)]
    codec = batches.RowCodec(processor, rows, image_root=None)
    fixed = codec.collate([codec.encode(i) for i in range(8)])

    def fixed_loss():
        q, c = model.embed(fixed["query"]), model.embed(fixed["candidate"])
        return float(loss_lib.infonce(q, c, jnp.arange(8), loss_lib.LossConfig(0.05), mesh=None)[0])

    before = fixed_loss()
    result = training_stage.train_model(
        config, model, rows, clusters, processor, mesh, sharding.DEFAULT_RULES, str(tmp_path)
    )
    after = fixed_loss()
    assert result.step == 24
    # Below chance (ln 8 = 2.08) and well below the start: not a collapse to uniform.
    assert after < min(before, np.log(8)) - 0.25, (before, after)
    lines = [json.loads(x) for x in (tmp_path / "train_metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 24 and all(np.isfinite(x["loss"]) for x in lines)
    assert lines[-1]["tokens_per_s"] > 0


def test_split_model_trains_adapters_or_the_whole_language_model(assets):
    model = _model(assets / "model", "dora")
    _, adapters, frozen = training_stage.split_model(model, full=False)
    names = {p[-1].key for p, _ in jax.tree_util.tree_leaves_with_path(adapters)}
    assert names == {"lora_a", "lora_b", "magnitude"}
    assert all(
        p[-1].key not in names
        for p, _ in jax.tree_util.tree_leaves_with_path(frozen.to_pure_dict())
    )
    plain = Qwen2VL(Qwen2VLConfig.from_dir(assets / "model"), rngs=nnx.Rngs(0))
    _, everything, rest = training_stage.split_model(plain, full=True)
    total = sum(x.size for x in jax.tree.leaves(nnx.state(plain, nnx.Param)))
    tower = sum(x.size for x in jax.tree.leaves(nnx.state(plain.visual, nnx.Param)))
    assert tower > 0 and "visual" not in everything
    assert sum(x.size for x in jax.tree.leaves(everything)) == total - tower
    assert sum(x.size for x in jax.tree.leaves(rest.to_pure_dict())) == tower
    with pytest.raises(ValueError, match="adapter.kind=none"):
        training_stage.split_model(plain, full=False)


def test_row_codec_ids_agreed_shapes_and_widening(assets):
    """Equal positives share an id (a digest, computed per row); a batch collated to this
    process's buckets and widened to larger agreed ones embeds the same."""
    rows = _rows(assets)[:4]
    duplicate = dataclasses.replace(rows[1], index=99, qry_text="another query")
    processor = Processor.from_dir(
        assets / "model",
        max_length=128,
        image_resolution="processor",
        length_buckets=(64, 128),
        patch_buckets=(0, 64, 128),
    )
    codec = batches.RowCodec(processor, rows + [duplicate], image_root=None)
    encoded = [codec.encode(i) for i in range(5)]
    batch = codec.collate(encoded)
    ids = batch["ids"]
    assert ids.shape == (5, 2) and ids.dtype == np.int32
    assert (ids[4] == ids[1]).all() and len({tuple(i) for i in ids[:4]}) == 4
    shape = codec.shape(batch)
    wider = codec.widen(batch, [128, 128, 128, 128])
    assert wider["query"]["input_ids"].shape[1] == 128 and shape[0] <= 128
    model = _model(assets / "model", "lora")
    for side in ("query", "candidate"):
        np.testing.assert_allclose(
            np.asarray(model.embed(wider[side])),
            np.asarray(model.embed(batch[side])),
            atol=1e-5,
            rtol=0,
        )


def test_row_cap_is_deterministic_and_mining_and_training_read_the_same_rows(tmp_path, monkeypatch):
    mini_mmeb.build(str(tmp_path / "mini"), seed=0, train_rows=12, eval_queries=2, candidates=2)
    config = configuration.base_config()
    data = config.data
    data.train_dir, data.train_image_root = str(tmp_path / "mini" / "train"), str(tmp_path / "mini")
    data.train_split, data.train_subsets = "original", "ShapeCaption_t2i,ShapeCaption_i2t"
    data.max_rows_per_subset = 5

    def indices(subset):
        return [r.index for r in rows_lib.train_rows(data, subset, BadInputReport())]

    assert indices("ShapeCaption_t2i") == [0, 1, 2, 3, 4]  # seed -1: the release's first rows
    data.row_sample_seed = 3
    sampled = {s: indices(s) for s in ("ShapeCaption_t2i", "ShapeCaption_i2t")}
    for subset, picked in sampled.items():
        assert picked == indices(subset) and picked == sorted(picked) and len(picked) == 5
    assert sampled["ShapeCaption_t2i"] != sampled["ShapeCaption_i2t"]  # seeded per subset
    assert sampled["ShapeCaption_t2i"] != [0, 1, 2, 3, 4]
    data.max_rows_per_subset = 0
    assert len(indices("ShapeCaption_t2i")) == 12
    data.max_rows_per_subset = 5

    # The mine stage (its model and embedder stubbed) and the train stage see the same rows.
    seen = {}

    def fake_mine(pipeline, subset, rows, embedder, cache, judge, judge_cache):
        seen[subset] = [r.index for r in rows]
        report = dict(
            clusters=1,
            phase1=dict(clusters=1),
            phase2=dict(clusters=0),
            rows_uncovered=len(rows) - 2,
            judge=dict(dropped=0, pairs=0),
        )
        return mining.MiningResult([[4, 0]], [1], report, {})

    monkeypatch.setattr(mine_stage, "mine_subset", fake_mine)
    stub = types.SimpleNamespace(
        close=lambda: None,
        host_snapshot=lambda: None,
        host_report=lambda before: {},
        processor=types.SimpleNamespace(padding_share=lambda: {}),
    )
    for_stage = types.SimpleNamespace(for_stage=lambda *args, **kwargs: stub)
    monkeypatch.setattr(mine_stage, "Embedder", for_stage)
    monkeypatch.setattr(mine_stage, "EmbeddingCache", lambda *args, **kwargs: None)
    config.mine.judge = False
    pipeline = Pipeline(config, pathlib.Path(tmp_path / "work"))
    monkeypatch.setattr(pipeline, "model", lambda **kwargs: None)
    monkeypatch.setattr(
        pipeline, "processor", lambda **kwargs: types.SimpleNamespace(prompt="prompt")
    )
    mine_stage.run(pipeline)
    assert seen == sampled
    for subset in seen:
        written = mining.read_clusters(str(tmp_path / "work" / "mine" / f"{subset}.clusters.json"))
        assert written.num_rows == 5
    rows, clusters = training_stage.training_rows(pipeline)
    assert [r.index for r in rows] == seen["ShapeCaption_t2i"] + seen["ShapeCaption_i2t"]
    assert [4, 0] in clusters and [9, 5] in clusters and len(clusters) == 2 + 2 * 3


def test_the_three_training_stages_differ_only_in_batches_prompt_and_folder(tmp_path, monkeypatch):
    config = configuration.base_config()
    pipeline = Pipeline(config, pathlib.Path(tmp_path))
    calls = []
    monkeypatch.setattr(pipeline, "model", lambda **kwargs: "model")
    monkeypatch.setattr(pipeline, "forget_model", lambda: None)
    monkeypatch.setattr(
        pipeline,
        "processor",
        lambda **kwargs: types.SimpleNamespace(
            prompt=kwargs["prompt"], report=BadInputReport(), padding_share=lambda: {}
        ),
    )
    monkeypatch.setattr(
        training_stage,
        "training_rows",
        lambda pipeline, use_clusters: calls.append(use_clusters) or ([0, 1], [[0, 1]]),
    )
    monkeypatch.setattr(training_stage, "heldout_rows", lambda pipeline: [])

    def train_model(config, model, rows, clusters, processor, mesh, rules, workdir, **kwargs):
        calls.append((processor.prompt, pathlib.Path(workdir).name))
        return types.SimpleNamespace(step=3, stopped_early=False, last_metrics={"loss": 0.5})

    monkeypatch.setattr(training_stage, "train_model", train_model)
    monkeypatch.setattr(
        training_stage.saving,
        "save_model",
        lambda model, out_dir, **kwargs: calls.append(pathlib.Path(out_dir)),
    )
    monkeypatch.setattr(Pipeline, "mesh", None)
    plain = prompts.PromptOptions(system=False, suffix=False)
    for run, name, clustered, prompt in (
        (training_stage.run, "train", True, None),
        (training_stage.run_random, "train_random", False, None),
        (training_stage.run_plain_random, "train_plain_random", False, plain),
    ):
        calls.clear()
        summary = run(pipeline)
        assert calls == [clustered, (prompt, name), pipeline.trained_paths(name)[0]], name
        assert summary == {
            "steps": 3,
            "final_loss": 0.5,
            "rows": 2,
            "clusters": 1,
            "skipped_rows": 0,
            "padding": {},
        }
