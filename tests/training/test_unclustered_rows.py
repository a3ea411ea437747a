"""Rows in no mined cluster: trained as single rows (g2e), or left out (the release)."""

import types

from g2e import configuration, layout, mining
from g2e.demo import mini_mmeb
from g2e.training import stage as training_stage


def test_rows_in_no_cluster_train_alone_or_are_left_out(tmp_path):
    mini_mmeb.build(str(tmp_path / "mini"), seed=0, train_rows=6, eval_queries=2, candidates=2)
    config = configuration.base_config()
    data = config.data
    data.train_dir, data.train_image_root = str(tmp_path / "mini" / "train"), str(tmp_path / "mini")
    data.train_split, data.train_subsets = "original", "ShapeCaption_t2i"
    workdir = tmp_path / "work"
    clusters_file = layout.clusters_file(workdir, "ShapeCaption_t2i")
    mining.write_clusters(
        str(clusters_file), [[4, 1], [2]], [1, 2], subset="ShapeCaption_t2i", num_rows=6
    )
    pipeline = types.SimpleNamespace(config=config, workdir=workdir)

    rows, clusters = training_stage.training_rows(pipeline)
    assert len(rows) == 6
    assert clusters == [[4, 1], [2], [0], [3], [5]]

    config.train.keep_unclustered_rows = False
    rows, clusters = training_stage.training_rows(pipeline)
    # Only rows 1, 2 and 4 train (so only they can top up a short batch), renumbered in order.
    assert [row.index for row in rows] == [1, 2, 4]
    assert clusters == [[2, 0], [1]]

    # Random batches use every row whatever the key.
    rows, clusters = training_stage.training_rows(pipeline, use_clusters=False)
    assert len(rows) == 6 and clusters == [[i] for i in range(6)]
