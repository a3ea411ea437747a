"""The embedded default: the whole recipe on a generated mini-MMEB and a tiny model, on a CPU.

  python -m g2e.main --config=configs/demo.py

Nothing is downloaded; the table lands in <workdir>/report.md (docs/recipe.md says what each
stage shows).
"""

from g2e import configuration


def get_config():
    config = configuration.base_config()
    config.workdir = "g2e_demo"
    config.stages = (
        "prepare_demo,eval_plain,eval_zero_shot,mine,judge_quality,train,train_random,"
        "train_plain_random,eval,eval_random,eval_plain_random,eval_mmeb_v2,export,report"
    )
    config.mesh.data = -1

    config.model.dtype = "float32"
    config.model.param_dtype = "float32"
    config.model.remat = "none"

    config.data.on_bad_input = "error"
    config.data.max_length = 256
    config.data.train_max_length = 256
    config.data.image_resolution = "processor"
    config.data.train_image_resolution = "processor"
    config.data.length_buckets = (64, 128, 256)
    config.data.pack_length = 256  # rows shared by several inputs (embedding and training)
    config.data.pack_patches = 256  # vision rows of a packed batch: about five images each
    config.data.patch_buckets = (0, 64, 128)
    config.data.train_split = "original"
    config.data.heldout_rows = 16  # per training subset, evaluated every train.heldout_every

    config.eval.batch_size = 32  # per device: the demo runs on one (a CPU)

    config.mine.top_k = 3
    config.mine.pool_mult = 3
    config.mine.batch_size = 32  # per device, as eval.batch_size
    config.mine.judge_batch_size = 16  # Pairs per device and judge step, from many anchors.

    # Tuned with the committed generator: at lr 2e-4 in-batch accuracy stayed at chance for
    # 200 steps; at 1e-3 it rises within 50.
    config.train.steps = 150
    config.train.lr = 1e-3
    config.train.warmup_steps = 5
    config.train.global_batch = 16  # 4 clusters of 4 rows, on however many devices
    config.train.cluster_size = 4
    config.train.checkpoint_every = 20
    config.train.log_every = 5
    config.train.heldout_every = 50
    config.train.adapter.r = 8
    config.train.adapter.alpha = 16
    config.train.adapter.dropout = 0.0

    config.export.dtype = "float32"

    # 200 queries per evaluation subset: every meta-task's 95% interval within about +-5.
    config.demo.eval_queries = 200
    return config
