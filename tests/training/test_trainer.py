"""Cluster batches, the train loop, checkpoint resume after SIGKILL / SIGTERM."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from g2e import killpoints
from g2e.models import sharding
from g2e.training import batches, optimizer, trainer
from g2e.training import loss as loss_lib
from g2e.training import stage as training_stage
from g2e.training import step as step_lib
from tests.training import toy

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_clusters_stay_whole_and_batches_are_a_function_of_the_step():
    clusters = [[0, 1, 2], [3, 4], [5], [6, 7, 8, 9], [10, 11], [12], [13, 14, 15]]
    schedule = batches.ClusterSchedule(clusters, 20, cluster_size=4, batch_size=8, seed=1)
    again = batches.ClusterSchedule(clusters, 20, cluster_size=4, batch_size=8, seed=1)
    by_anchor = {c[0]: c for c in clusters}
    seen_epochs = set()
    for step in [5, 0, 1, 2, 3, 4, 9]:
        rows = schedule.rows(step)
        np.testing.assert_array_equal(rows, again.rows(step))
        assert len(rows) == 8 and len(set(rows.tolist())) == 8
        seen_epochs.add(schedule.position(step)["epoch"])
        placed = []
        for slot in rows.reshape(2, 4).tolist():
            # Each slot starts with whole clusters; the rest are filler rows (random negatives).
            pos = 0
            while (
                pos < 4
                and slot[pos] in by_anchor
                and slot[pos : pos + len(by_anchor[slot[pos]])] == by_anchor[slot[pos]]
            ):
                placed += by_anchor[slot[pos]]
                pos += len(by_anchor[slot[pos]])
            assert pos > 0, slot
        fillers = set(rows.tolist()) - set(placed)
        assert not fillers & set(placed)
    assert len(seen_epochs) > 1
    assert not np.array_equal(schedule.rows(0), schedule.rows(1))
    with pytest.raises(ValueError, match="cannot fill a batch"):
        batches.ClusterSchedule(clusters, 6, cluster_size=4, batch_size=8, seed=0)


def test_learning_rate_warms_up_and_decays_linearly():
    schedule = optimizer.learning_rate_schedule(5e-5, 100, 1500)
    assert float(schedule(0)) == 0.0
    assert float(schedule(50)) == pytest.approx(2.5e-5)
    assert float(schedule(100)) == pytest.approx(5e-5)
    assert float(schedule(800)) == pytest.approx(2.5e-5)
    assert float(schedule(1500)) == pytest.approx(0.0, abs=1e-12)


def _mesh():
    return jax.make_mesh((4, 2, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


def test_short_run_lowers_the_loss_and_logs(tmp_path, caplog):
    cfg = toy.train_config(
        steps=30,
        lr=5e-2,
        global_batch=16,
        cluster_size=2,
        backprop="gradcache",
        query_chunk=1,
        candidate_chunk=2,
        checkpoint_every=100,
        log_every=1,
        heldout_every=12,
    )
    queries, candidates = toy.data(64)
    schedule = batches.ClusterSchedule([[i] for i in range(64)], 64, 2, 16, seed=0)
    trainable, frozen = toy.params()
    evaluated = []

    def evaluate(step, params):  # the held-out hook gets the weights after `step` steps
        evaluated.append((step, jax.device_get(params)))
        return {"heldout_accuracy": float(step)}

    run = trainer.Run(
        embed_fn=toy.embed_fn,
        trainable=trainable,
        frozen=frozen,
        schedule=schedule,
        codec=toy.encode(queries, candidates),
        mesh=_mesh(),
        rules=sharding.DEFAULT_RULES,
        workdir=str(tmp_path),
        model_flops=lambda host: 1e6,
        evaluate=evaluate,
    )
    with caplog.at_level(logging.INFO):
        result = trainer.fit(run, cfg)
    # One batch shape, one GradCache plan asked for: one program.
    assert "train: 1 step programs compiled for 1 batch shapes" in caplog.messages
    everything = [json.loads(x) for x in (tmp_path / "train_metrics.jsonl").open()]
    assert [(x["step"], x["heldout_accuracy"]) for x in everything if "loss" not in x] == [
        (12, 12.0),
        (24, 24.0),
        (30, 30.0),
    ]
    assert [step for step, _ in evaluated] == [12, 24, 30]
    for a, b in zip(jax.tree.leaves(evaluated[-1][1]), jax.tree.leaves(result.trainable)):
        np.testing.assert_array_equal(a, np.asarray(b))
    lines = [x for x in everything if "loss" in x]
    assert [x["step"] for x in lines] == list(range(1, 31))
    # FLOPs of the step: the model's as given, the hardware's from the compiled program.
    assert lines[-1]["model_flops"] == 1e6 and lines[-1]["hardware_flops"] > 0
    first, last = np.mean([x["loss"] for x in lines[:3]]), np.mean([x["loss"] for x in lines[-3:]])
    assert last < 0.7 * first, (first, last)
    for key in (
        "accuracy",
        "grad_norm",
        "param_norm",
        "update_norm",
        "learning_rate",
        "pairs_per_s",
    ):
        assert np.isfinite(lines[-1][key]), key
    assert result.step == 30 and not result.stopped_early
    assert any(p.name.startswith("events") for p in (tmp_path / "tensorboard").iterdir())


def test_nan_stops_with_step_and_subsets(tmp_path):
    cfg = toy.train_config(steps=3, global_batch=16, cluster_size=2)
    queries, candidates = toy.data(32)
    queries[:] = np.nan
    schedule = batches.ClusterSchedule([[i] for i in range(32)], 32, 2, 16, seed=0)
    trainable, frozen = toy.params()
    with pytest.raises(FloatingPointError, match=r"step 0: .*subsets in the batch: VQA"):
        run = trainer.Run(
            embed_fn=toy.embed_fn,
            trainable=trainable,
            frozen=frozen,
            schedule=schedule,
            codec=toy.encode(queries, candidates),
            mesh=_mesh(),
            rules=sharding.DEFAULT_RULES,
            workdir=str(tmp_path),
            subsets=["VQA"] * 32,
        )
        trainer.fit(run, cfg)
    # The poisoned state never reached a checkpoint.
    assert not list((tmp_path / "checkpoints").glob("[0-9]*"))


def _run(workdir, out, workers=2, killpoint=None):
    """The resume_run child; with `killpoint`, it stops there and writes <workdir>.killpoint."""
    env = dict(os.environ)
    if killpoint is not None:
        env[killpoints.ENV_NAME] = killpoint
        env[killpoints.ENV_FILE] = str(_marker(workdir))
    return subprocess.Popen(
        [sys.executable, "-m", "tests.training.resume_run", str(workdir), str(out), str(workers)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _marker(workdir) -> pathlib.Path:
    return pathlib.Path(f"{workdir}.killpoint")


def _wait_at_killpoint(proc, workdir, timeout=240):
    """Polls until the child has reached its kill point (it waits there for us)."""
    deadline = time.monotonic() + timeout
    while not _marker(workdir).exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, f"no kill point reached after {timeout} s"
        time.sleep(0.05)
    _marker(workdir).unlink()


def _cache_entries(workdir) -> list[str]:
    return sorted(p.name for p in (workdir / "compilation_cache").glob("*-cache"))


@pytest.mark.slow
def test_sigkill_and_sigterm_resume_equal_an_uninterrupted_run(tmp_path):
    """Killed and stopped runs encode rows in 2 Grain worker processes, the reference in the
    main process: the resumed result is bit-equal (the input of step s depends on s only).
    The run finishes in its workdir moved to another path, and compiles nothing: its train step
    and every other program come from the compilation cache the killed run filled."""
    reference = _run(tmp_path / "ref", tmp_path / "ref.npz", workers=0)
    work, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    # After step 7 the save of step 6 has begun, so step 3's is complete (a save waits for the
    # previous one); step 6's may or may not be.
    killed = _run(work, tmp_path / "out.npz", killpoint="train_step_7")
    _wait_at_killpoint(killed, work)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=30) == -signal.SIGKILL
    assert not (ckpts / "9").exists()
    compiled = _cache_entries(work)
    assert [name for name in compiled if name.startswith("jit_train_step-")], compiled

    resumed_from = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert resumed_from in (3, 6)
    # SIGTERM while the restarted run waits after its first step; released, it saves the
    # next step and exits.
    stopped = _run(work, tmp_path / "out.npz", killpoint=f"train_step_{resumed_from + 1}")
    _wait_at_killpoint(stopped, work)
    stopped.send_signal(signal.SIGTERM)
    pathlib.Path(f"{_marker(work)}.release").touch()
    output = stopped.communicate(timeout=60)[0]
    assert stopped.returncode == 0, output
    assert f"finished step={resumed_from + 2} stopped_early=True" in output, output
    assert (ckpts / str(resumed_from + 2)).is_dir()

    assert reference.wait(timeout=120) == 0, reference.stdout.read()
    # A resume on another machine, where the workdir is mounted at another path.
    work = work.rename(tmp_path / "moved")
    ckpts = work / "checkpoints"
    compiled = _cache_entries(work)
    finished = _run(work, tmp_path / "out.npz")
    output = finished.communicate(timeout=120)[0]
    assert finished.returncode == 0, output
    assert "finished step=12 stopped_early=False" in output, output
    assert _cache_entries(work) == compiled, "the moved run compiled programs again"
    ref, out = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "out.npz")
    for key in ref.files:
        # Bitwise: the same compiled step on the same batches from the same state.
        np.testing.assert_array_equal(out[key], ref[key], err_msg=key)
    assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())[-1] == 12


def _fit_losses(cfg, mesh, workdir):
    queries, candidates = toy.data(64)
    size = training_stage.global_batch_size(cfg, mesh, sharding.DEFAULT_RULES)
    schedule = batches.ClusterSchedule([[i] for i in range(64)], 64, cfg.cluster_size, size, seed=0)
    trainable, frozen = toy.params()
    run = trainer.Run(
        embed_fn=toy.embed_fn,
        trainable=trainable,
        frozen=frozen,
        schedule=schedule,
        codec=toy.encode(queries, candidates),
        mesh=mesh,
        rules=sharding.DEFAULT_RULES,
        workdir=str(workdir),
    )
    trainer.fit(run, cfg)
    return size, [json.loads(x)["loss"] for x in (workdir / "train_metrics.jsonl").open()]


def test_global_batch_is_the_same_on_1_2_and_8_devices(tmp_path):
    cfg = toy.train_config(steps=3, global_batch=16, cluster_size=2, checkpoint_every=100)
    runs = []
    for devices in (1, 2, 8):
        mesh = jax.make_mesh(
            (devices, 1, 1),
            ("data", "fsdp", "tensor"),
            axis_types=(AxisType.Auto,) * 3,
            devices=jax.devices()[:devices],
        )
        runs.append(_fit_losses(cfg, mesh, tmp_path / str(devices)))
    assert [size for size, _ in runs] == [16, 16, 16]
    for _, losses in runs[1:]:
        np.testing.assert_allclose(losses, runs[0][1], rtol=1e-5)
    three = jax.make_mesh(
        (3, 1, 1),
        ("data", "fsdp", "tensor"),
        axis_types=(AxisType.Auto,) * 3,
        devices=jax.devices()[:3],
    )
    with pytest.raises(
        ValueError,
        match=r"--config\.train\.global_batch=16 does not split "
        r"into 3 devices .* --config\.train\.cluster_size=2; use a multiple "
        r"of 6 \(e\.g\. 18\)",
    ):
        training_stage.global_batch_size(cfg, three, sharding.DEFAULT_RULES)


def test_auto_backprop_falls_back_to_gradcache_over_the_memory_limit():
    cfg = toy.train_config()
    opt, schedule = optimizer.make_optimizer(cfg)
    config = loss_lib.LossConfig(0.05)
    mesh = _mesh()
    setup = step_lib.StepSetup(
        embed_fn=toy.embed_fn,
        loss_config=config,
        optimizer=opt,
        schedule=schedule,
        mesh=mesh,
        rules=sharding.DEFAULT_RULES,
    )
    queries, candidates = toy.data(64)
    host = toy.encode(queries, candidates).collate(list(range(64)))
    batch = jax.tree.map(
        lambda x: jax.device_put(
            x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
        ),
        host,
    )
    results = {}
    for name, limit in (("direct", None), ("gradcache", 1)):
        trainable, frozen = toy.params()  # fresh: the step donates the state
        state = trainer._placed(step_lib.init_state(trainable, opt, 0, config), mesh)
        steps = step_lib.CompiledSteps(
            setup, jax.tree.map(lambda x: x.sharding, state), memory_limit=limit
        )
        chosen = steps.get(state, frozen, batch)
        assert chosen.backprop == name and chosen.hardware_flops > 0
        if name == "gradcache":
            # A new shape with as many rows per device compiles the chosen plan only.
            tried = steps.compilations
            assert tried > 1
            wider = {**batch, "query": {**batch["query"], "unused": batch["ids"][:, None]}}
            assert steps.get(state, frozen, wider).backprop == "gradcache"
            assert steps.compilations == tried + 1 and steps.shapes == 2
        results[name] = steps(state, frozen, batch)
    assert chosen.query_chunk == chosen.candidate_chunk == 1  # nothing fits: the smallest
    (direct, direct_metrics), (cached, cached_metrics) = results["direct"], results["gradcache"]
    np.testing.assert_allclose(
        float(cached_metrics["loss"]), float(direct_metrics["loss"]), rtol=1e-6
    )
    for a, b in zip(jax.tree.leaves(cached["params"]), jax.tree.leaves(direct["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
