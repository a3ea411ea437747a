"""Bad rows reaching the mine and train stages, under data.on_bad_input: 'skip' drops and counts
them, 'error' stops the stage with the row named.

A row whose image file is missing is caught where the rows are read (g2e.data.mmeb), so both
stages see the same rows and the cluster indices hold. A row whose image exists but does not
decode passes that check and reaches the model's input: the embedder in `mine`
(g2e.mining.stage.mine_subset) and the row encoder of training (g2e.training.batches).
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from g2e.data import mmeb
from g2e.data import rows as rows_lib
from g2e.data.errors import BadInput, BadInputReport
from g2e.demo import mini_mmeb
from g2e.embedding import Embedder
from g2e.embedding_cache import EmbeddingCache
from g2e.mining import stage as mine_stage
from g2e.pipeline import Pipeline
from g2e.training import batches
from g2e.training import stage as train_stage
from tests.mining.tiny_mine import config_of, mine_settings, write_checkpoint

SUBSET = "ShapeCls"  # an image query and a text positive per row
ROWS = 16
BAD_ROW = 5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(checkpoint dir, {'missing': data dir, 'undecodable': data dir}, the bad row's image):
    the same mini-MMEB twice, row BAD_ROW's query image deleted in one, garbage in the other."""
    root = tmp_path_factory.mktemp("bad_rows")
    model_dir = write_checkpoint(root / "model")
    mini_mmeb.build(str(root / "good"), seed=0, train_rows=ROWS, eval_queries=2, candidates=2)
    good = root / "good"
    rows = mmeb.read_train_subset(str(good / "train"), SUBSET, "original", str(good))
    image = rows[BAD_ROW].qry_image
    relative = image[len(str(good)) + 1 :]
    assert [r.qry_image for r in rows].count(image) == 1
    dirs = {}
    for kind in ("missing", "undecodable"):
        dirs[kind] = root / kind
        shutil.copytree(root / "good", dirs[kind])
    (dirs["missing"] / relative).unlink()
    (dirs["undecodable"] / relative).write_bytes(b"\xff\xd8\xff not a JPEG")
    return model_dir, dirs, relative


def _pipeline(data, tmp_path, kind: str, policy: str) -> Pipeline:
    model_dir, dirs, _ = data
    settings = mine_settings(
        model_dir,
        dirs[kind],
        tmp_path / "work",
        **{
            "data.on_bad_input": policy,
            "data.train_subsets": SUBSET,
            "data.train_max_length": 192,
            "data.train_image_resolution": "processor",
            "mine.judge": False,
        },
    )
    return Pipeline(config_of(settings), tmp_path / "work")


# ---- a missing image: caught where the rows are read -------------------------------------


def test_a_missing_image_under_skip_is_dropped_and_counted_by_mine_and_train(
    data, tmp_path, caplog
):
    pipeline = _pipeline(data, tmp_path, "missing", "skip")
    summary = mine_stage.run(pipeline)
    assert summary["subsets"] == 1
    mined = json.loads((tmp_path / "work" / "mine" / f"{SUBSET}.clusters.json").read_text())
    report = json.loads((tmp_path / "work" / "mine" / f"{SUBSET}.report.json").read_text())
    assert mined["num_rows"] == ROWS - 1 and report["skipped_rows"] == 1
    assert sorted(r for c in mined["clusters"] for r in c) == list(range(ROWS - 1))

    with caplog.at_level(logging.WARNING):
        rows, clusters = train_stage.training_rows(pipeline, use_clusters=True)
    assert len(rows) == ROWS - 1 and BAD_ROW not in [r.index for r in rows]
    assert sorted(r for c in clusters for r in c) == list(range(ROWS - 1))
    assert any("1 skipped" in message for message in caplog.messages), caplog.messages


@pytest.mark.parametrize("stage", ["mine", "train"])
def test_a_missing_image_under_error_stops_the_stage_naming_the_row(data, tmp_path, stage):
    pipeline = _pipeline(data, tmp_path, "missing", "error")
    run = mine_stage.run if stage == "mine" else train_stage.training_rows
    with pytest.raises(BadInput, match=f"subset '{SUBSET}', row {BAD_ROW} of .*missing image"):
        run(pipeline)
    assert not (tmp_path / "work" / "mine" / f"{SUBSET}.clusters.json").exists()


# ---- an image that does not decode: caught at the model's input ---------------------------


def _mine(pipeline: Pipeline, tmp_path):
    """mine_subset over the subset's rows (what the stage runs per subset), no judge."""
    bad = BadInputReport(pipeline.config.data.on_bad_input)
    rows = rows_lib.train_rows(pipeline.config.data, SUBSET, bad)
    embedder = Embedder(
        pipeline.model(trained=False),
        pipeline.processor(),
        mesh=pipeline.mesh,
        rules=pipeline.rules,
        batch_size=8,
        progress=False,
    )
    cache = EmbeddingCache(tmp_path / "cache", "test")
    return mine_stage.mine_subset(pipeline, SUBSET, rows, embedder, cache, None, None), embedder


def _one_epoch(pipeline: Pipeline):
    """The row encoder of training over one epoch of the train stage's batches (two steps of
    half the rows each, so each step has rows outside it to stand in for a bad one): each
    step's (row ids, batch), and the training processor."""
    rows, clusters = train_stage.training_rows(pipeline, use_clusters=False)
    processor = pipeline.processor(train=True)
    inputs = batches.StepInputs(
        batches.ClusterSchedule(clusters, len(rows), 1, len(rows) // 2, seed=0),
        batches.RowCodec(processor, rows, image_root=None),
        rows_here=slice(0, len(rows) // 2),
        first_step=0,
        last_step=2,
        workers=0,
    )
    try:
        steps = []
        for step in range(2):
            prepared = inputs.prepare(step)
            batch, _ = inputs.agree(prepared, stop_requested=False)
            steps.append((prepared.rows, batch))
        return steps, processor
    finally:
        inputs.close()


def test_an_undecodable_image_under_error_stops_mine_naming_the_row(data, tmp_path):
    pipeline = _pipeline(data, tmp_path, "undecodable", "error")
    with pytest.raises(BadInput, match=f"subset '{SUBSET}', row {BAD_ROW}, file .*{data[2]}"):
        _mine(pipeline, tmp_path)


def test_an_undecodable_image_under_error_stops_training_naming_the_row(data, tmp_path):
    pipeline = _pipeline(data, tmp_path, "undecodable", "error")
    with pytest.raises(ValueError, match=rf"training step \d, row {BAD_ROW}: .*{data[2]}"):
        _one_epoch(pipeline)


def test_an_undecodable_image_under_skip_is_dropped_and_counted_by_mine(data, tmp_path):
    pipeline = _pipeline(data, tmp_path, "undecodable", "skip")
    result, embedder = _mine(pipeline, tmp_path)
    assert embedder.processor.report.total == 1
    assert BAD_ROW not in [r for c in result.clusters for r in c]


def test_an_undecodable_image_under_skip_is_replaced_and_counted_by_training(data, tmp_path):
    pipeline = _pipeline(data, tmp_path, "undecodable", "skip")
    steps, processor = _one_epoch(pipeline)
    assert processor.report.total == 1
    for rows, batch in steps:
        assert BAD_ROW not in rows.tolist() and np.unique(rows).size == rows.size
        assert len(batch["ids"]) == len(rows)
    # Every other row trains once, and the stand-in fills the bad row's place.
    seen = np.concatenate([rows for rows, _ in steps]).tolist()
    assert set(range(ROWS)) - set(seen) == {BAD_ROW} and len(seen) == ROWS
