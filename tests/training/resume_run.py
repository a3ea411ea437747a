"""Subprocess body of the resume test: a short toy run in a workdir, printing each step.

  python -m tests.training.resume_run WORKDIR OUT.npz WORKERS

Runs 12 toy steps (checkpoints every 3) on a 2-device mesh, rows encoded by WORKERS Grain
processes, resuming from WORKDIR's checkpoints, and writes the final trainable parameters to
OUT.npz. A test stops it at a step with G2E_KILLPOINT=train_step_<n> (g2e.killpoints).
Compiled programs go to the persistent compilation cache as g2e.main sets it up
(<WORKDIR>/compilation_cache), every program however fast it compiled.
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

from g2e import configuration  # noqa: E402
from g2e import main as g2e_main  # noqa: E402
from g2e.models import sharding  # noqa: E402
from g2e.training import batches, trainer  # noqa: E402
from tests.training import toy  # noqa: E402


def main(workdir: str, out: str, workers: int):
    config = configuration.base_config()
    config.compilation_cache.min_compile_time_secs = 0
    g2e_main.setup_compilation_cache(config, pathlib.Path(workdir))
    cfg = toy.train_config(steps=12, checkpoint_every=3)
    mesh = jax.make_mesh(
        (2, 1, 1),
        ("data", "fsdp", "tensor"),
        axis_types=(AxisType.Auto,) * 3,
        devices=jax.devices()[:2],
    )
    queries, candidates = toy.data(40)
    clusters = [[i, i + 1] for i in range(0, 30, 2)] + [[i] for i in range(30, 40)]
    schedule = batches.ClusterSchedule(clusters, 40, cfg.cluster_size, 8, seed=0)
    codec = toy.Codec(queries, candidates)
    trainable, frozen = toy.params()
    run = trainer.Run(
        embed_fn=toy.embed_fn,
        trainable=trainable,
        frozen=frozen,
        schedule=schedule,
        codec=codec,
        mesh=mesh,
        rules=sharding.DEFAULT_RULES,
        workdir=workdir,
        workers=workers,
    )
    result = trainer.fit(run, cfg)
    if not result.stopped_early:
        np.savez(out, **{k: np.asarray(v) for k, v in result.trainable.items()})
    print(f"finished step={result.step} stopped_early={result.stopped_early}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
