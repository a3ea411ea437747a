"""Subprocess body of tests/test_stop_together.py: one process of a 2-process toy training job.

  python -m tests.stop_together_run WORKDIR OUT.npz PROCESS_ID PORT [BAD_ROW]

Two processes of 4 CPU devices each (coordinator on 127.0.0.1:PORT) train the toy embedder of
tests/training/toy.py for STEPS (40) steps on an 8-device mesh, checkpointing every 3 steps under
WORKDIR and resuming from it; process 0 writes the final trainable parameters to OUT.npz.
With BAD_ROW, encoding that row id raises BadInput (only the process whose share of a step
holds it meets it). A test stops a process with G2E_KILLPOINT=train_step_<n> (g2e.killpoints).
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

from g2e import distributed  # noqa: E402
from g2e.data.errors import BadInput  # noqa: E402
from g2e.models import sharding  # noqa: E402
from g2e.training import batches, trainer  # noqa: E402

# Enough steps after the SIGTERM for JAX's preemption notice to reach every process on a busy
# machine before the run would end on its own.
STEPS = 40
from tests.training import toy  # noqa: E402


class BadRowCodec(toy.Codec):
    """The toy codec, with one row that cannot be encoded."""

    def __init__(self, queries, candidates, bad_row: int):
        super().__init__(queries, candidates)
        self.bad_row = bad_row

    def encode(self, row: int):
        if row == self.bad_row:
            raise BadInput("unreadable image", subset="Toy", row=row, file=f"toy/{row}.png")
        return super().encode(row)


def main(workdir: str, out: str, process_id: int, port: int, bad_row: int | None):
    settings = dict(coordinator_address=f"127.0.0.1:{port}", num_processes=2)
    distributed.initialize(
        ml_collections.ConfigDict(dict(distributed=dict(**settings, process_id=process_id)))
    )
    cfg = toy.train_config(steps=STEPS, checkpoint_every=3)
    mesh = jax.make_mesh((8, 1, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    queries, candidates = toy.data(40)
    clusters = [[i, i + 1] for i in range(0, 30, 2)] + [[i] for i in range(30, 40)]
    schedule = batches.ClusterSchedule(clusters, 40, cfg.cluster_size, 8, seed=0)
    if bad_row is None:
        codec = toy.Codec(queries, candidates)
    else:
        codec = BadRowCodec(queries, candidates, bad_row)
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
    )
    result = trainer.fit(run, cfg)
    # The parameters are replicated: each process holds all of them.
    trained = {k: np.asarray(v.addressable_data(0)) for k, v in result.trainable.items()}
    if not result.stopped_early and distributed.is_primary():
        np.savez(out, **trained)
    print(f"finished step={result.step} stopped_early={result.stopped_early}", flush=True)


if __name__ == "__main__":
    bad = int(sys.argv[5]) if len(sys.argv) > 5 else None
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), bad)
