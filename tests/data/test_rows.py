"""The stages' row readers: the TFDS copy gives what the parquet layout gives, images as lazy
references into its image tables."""

import hashlib
import os
import shutil
import types

import numpy as np
import pytest
import tensorflow_datasets as tfds

from g2e import configuration
from g2e.data import images as images_lib
from g2e.data import mmeb, rows, subsets, tfds_builders
from g2e.data.errors import BadInput, BadInputReport
from g2e.demo import mini_mmeb
from g2e.evaluation import mmeb as evaluation
from g2e.main import STAGE_NAMES

tfds.disable_progress_bar()


def _bytes(image) -> bytes:
    """An image's content, whether the row names a file or refers to the TFDS copy's table."""
    if isinstance(image, str):
        with open(image, "rb") as f:
            return f.read()
    if isinstance(image, images_lib.ImageRef):
        return image.read()
    return image or b""


def fake_embed(items) -> np.ndarray:
    """A deterministic embedding of (role, subset, text, image content): the same for a path
    and that file's bytes, different for anything else."""
    vectors = []
    for item in items:
        digest = hashlib.sha1(
            f"{item.role}|{item.subset}|{item.text}|".encode() + _bytes(item.image)
        ).digest()
        vectors.append(
            np.random.default_rng(int.from_bytes(digest[:8], "little"))
            .normal(size=8)
            .astype(np.float32)
        )
    return np.stack(vectors)


def _data(format, root, split="original"):
    config = configuration.base_config()
    data = config.data
    data.format, data.train_split = format, split
    if format == "parquet":
        data.train_dir, data.eval_dir = str(root / "mini" / "train"), str(root / "mini" / "eval")
        data.train_image_root = data.eval_image_root = str(root / "mini")
    else:
        data.tfds_dir = str(root / "tfds")
    return config


def _evaluate(config, out_dir):
    return evaluation.evaluate_mmeb(
        fake_embed, data=config.data, out_dir=str(out_dir), batch_size=7, progress=False
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A mini-MMEB, its TFDS copy, and everything read from the parquet side (then the source
    is deleted: the TFDS side must need neither its images nor its manifest)."""
    root = tmp_path_factory.mktemp("rows")
    source = str(root / "mini")
    mini_mmeb.build(source, seed=3, train_rows=5, eval_queries=4, candidates=3)
    parquet = _data("parquet", root)
    for kind, folder in (("train", parquet.data.train_dir), ("eval", parquet.data.eval_dir)):
        tfds_builders.prepare(kind, folder, source, mmeb.list_subsets(folder), str(root / "tfds"))
    expected = {
        "train_subsets": rows.train_subsets(parquet.data),
        "eval_subsets": rows.list_eval_subsets(parquet.data),
        "results": _evaluate(parquet, root / "out_parquet"),
        "train": {},
    }
    for split in mmeb.TRAIN_SPLITS:
        data = _data("parquet", root, split).data
        for subset in expected["train_subsets"]:
            subset_rows = rows.train_rows(data, subset, BadInputReport())
            images = [
                {side: _bytes(getattr(r, f"{side}_image")) for side in ("qry", "pos", "neg")}
                for r in subset_rows
            ]
            expected["train"][split, subset] = (
                subset_rows,
                images,
                rows.train_row_keys(subset_rows),
            )
    expected["parquet_results_json"] = (root / "out_parquet" / "results.json").read_text()
    shutil.rmtree(source)
    return root, expected


def test_eval_over_the_tfds_copy_writes_the_same_results(prepared):
    root, expected = prepared
    config = _data("tfds", root)
    assert rows.list_eval_subsets(config.data) == expected["eval_subsets"]
    assert len(expected["eval_subsets"]) == len(mini_mmeb.SUBSETS)
    results = _evaluate(config, root / "out_tfds")
    assert results == expected["results"]
    assert (root / "out_tfds" / "results.json").read_text() == expected["parquet_results_json"]
    # Not a vacuous comparison: the fake embedder separates rows, so scores vary.
    scores = {s["precision_at_1"] for s in results["subsets"].values()}
    assert len(scores) > 1 and all(s["num_queries"] == 4 for s in results["subsets"].values())


def test_train_rows_are_equal_from_both_formats(prepared):
    root, expected = prepared
    for split in mmeb.TRAIN_SPLITS:
        config = _data("tfds", root, split)
        assert rows.train_subsets(config.data) == expected["train_subsets"]
        for subset in expected["train_subsets"]:
            want, images, (want_queries, want_positives) = expected["train"][split, subset]
            got = rows.train_rows(config.data, subset, BadInputReport())
            assert len(got) == len(want) == 5
            for g, w, image in zip(got, want, images):
                assert (g.subset, g.index, g.qry_text, g.pos_text, g.neg_text) == (
                    w.subset,
                    w.index,
                    w.qry_text,
                    w.pos_text,
                    w.neg_text,
                )
                for side in ("qry", "pos", "neg"):
                    value, path = getattr(g, f"{side}_image"), getattr(w, f"{side}_image")
                    assert value is None or isinstance(value, images_lib.ImageRef)
                    assert _bytes(value) == image[side]
                    if path:  # the key is the path the parquet named
                        assert value.key == os.path.relpath(path, root / "mini")
            # Mining keys: short (the relative path), and the same rows share a key.
            queries, positives = rows.train_row_keys(got)
            assert all(len(key[1]) < 50 for key in queries + positives)
            for got_keys, want_keys in ((queries, want_queries), (positives, want_positives)):
                distinct, ids = rows.index_keys(got_keys)
                np.testing.assert_array_equal(ids, rows.index_keys(want_keys)[1])
                first = rows.first_of_each(ids)
                assert [got_keys[i] for i in first] == distinct
                assert [got[int(i)].index for i in first] == [
                    got[got_keys.index(k)].index for k in distinct
                ]
            assert any(w.qry_image or w.pos_image for w in want), subset


def test_train_rows_concatenate_lazily(prepared):
    root, _ = prepared
    config = _data("tfds", root)
    parts = [rows.train_rows(config.data, s, BadInputReport()) for s in ("ShapeCls", "ShapeVQA")]
    together = rows.ConcatRows(parts)
    assert len(together) == 10 and list(together) == list(parts[0]) + list(parts[1])
    assert together[5] == parts[1][0] and together[-1] == parts[1][4]
    with pytest.raises(IndexError, match="row 10 of 10"):
        together[10]


def test_the_manifest_travels_with_the_tfds_copy(prepared):
    root, _ = prepared
    tfds_dir = str(root / "tfds")
    assert subsets.find_manifest(tfds_dir) == os.path.join(tfds_dir, subsets.MANIFEST_NAME)
    assert subsets.subset_info("ShapeEdit", tfds_dir).group == "OOD"
    assert rows.manifest_dir(_data("tfds", root).data, "train") == tfds_dir
    # A second data set declaring a subset differently cannot be prepared into the same dir.
    other = root / "other"
    other.mkdir()
    subsets.write_manifest(str(other), [subsets.SubsetInfo("ShapeEdit", "vqa", "OOD")])
    with pytest.raises(ValueError, match="declares"):
        tfds_builders.copy_manifest(str(other), tfds_dir)
    assert subsets.subset_info("ShapeEdit", tfds_dir).meta_task == "retrieval"


def test_missing_or_unknown_subsets_follow_on_bad_input(prepared):
    root, _ = prepared
    data = _data("tfds", root, split="nope").data
    with pytest.raises(BadInput, match="subset 'ShapeCls'.*not in the TFDS copy.*splits"):
        rows.train_rows(data, "ShapeCls", BadInputReport("error"))
    report = BadInputReport("skip")
    assert rows.train_rows(data, "ShapeCls", report) == []
    assert rows.eval_rows(data, "Nope", report) == []
    assert report.counts == {("ShapeCls", "not in the TFDS copy"): 1, ("Nope", "unknown subset"): 1}
    with pytest.raises(FileNotFoundError, match="tfds_builders --kind train"):
        rows.list_train_subsets(_data("tfds", root / "nowhere").data)


def test_config_validation_names_the_data_keys():
    config = configuration.base_config()
    config.model_dir, config.stages = "model", "eval"
    config.data.format = "tfds"
    with pytest.raises(configuration.ConfigError, match="data.tfds_dir"):
        configuration.validate(config, STAGE_NAMES)
    config.data.tfds_dir = "gs://bucket/tfds"
    configuration.validate(config, STAGE_NAMES)  # eval_dir is not needed with a TFDS copy
    config.data.format = "arrow"
    with pytest.raises(configuration.ConfigError, match="data.format"):
        configuration.validate(config, STAGE_NAMES)


def test_training_rows_over_the_tfds_copy_offset_the_mined_clusters(prepared, tmp_path):
    from g2e import mining
    from g2e.training import stage as training_stage

    root, expected = prepared
    pipeline = types.SimpleNamespace(config=_data("tfds", root), workdir=tmp_path)
    mining.write_clusters(
        str(tmp_path / "mine" / "ShapeCls.clusters.json"),
        [[0, 2], [3, 1]],
        [1, 2],
        subset="ShapeCls",
        num_rows=5,
    )
    got, clusters = training_stage.training_rows(pipeline)
    want = [r for s in expected["train_subsets"] for r in expected["train"]["original", s][0]]
    assert [(r.subset, r.index, r.qry_text, r.pos_text) for r in got] == [
        (r.subset, r.index, r.qry_text, r.pos_text) for r in want
    ]
    offset = 5 * expected["train_subsets"].index("ShapeCls")
    assert [offset, offset + 2] in clusters and [offset + 3, offset + 1] in clusters
    assert sorted(i for c in clusters for i in c) == list(range(len(want)))
    assert (
        got[offset + 3].qry_image.read() == expected["train"]["original", "ShapeCls"][1][3]["qry"]
    )


def test_heldout_rows_are_the_last_rows_after_the_cap_and_never_train(tmp_path):
    mini_mmeb.build(str(tmp_path / "mini"), seed=0, train_rows=12, eval_queries=2, candidates=2)
    data = configuration.base_config().data
    data.train_dir, data.train_image_root = str(tmp_path / "mini" / "train"), str(tmp_path / "mini")
    data.train_split, data.max_rows_per_subset, data.heldout_rows = "original", 10, 3
    report = BadInputReport()

    def indices(heldout):
        return [r.index for r in rows.train_rows(data, "ShapeCls", report, heldout=heldout)]

    assert indices(False) == list(range(7)) and indices(True) == [7, 8, 9]
    data.heldout_rows = 0
    assert indices(False) == list(range(10)) and indices(True) == []
    data.heldout_rows = 10
    with pytest.raises(
        ValueError, match="data.heldout_rows=10 leaves no training row of subset ShapeCls"
    ):
        indices(False)
