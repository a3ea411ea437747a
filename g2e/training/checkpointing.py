"""Training checkpoints: Orbax CheckpointManager, asynchronous, keep-N, auto-resume.

A checkpoint holds the train state pytree (trainable parameters, optimizer state, step, RNG) and
the data loader's position as JSON. Frozen base weights are not saved: they come from
model_dir. Restoring uses the shapes and shardings of a freshly initialised state, so each
array lands directly on its devices.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp

PyTree = Any


class Checkpointer:
    """Saves and restores (state, loader position) under <workdir>/checkpoints.

    Args:
      directory: where step folders go (created if missing).
      keep: how many recent checkpoints to keep.
      every: save every `every` steps (and always when asked with force=True).
      async_save: write in a background thread while training continues.
    """

    def __init__(self, directory: str, keep: int, every: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=every,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory), options=options, item_names=("state", "data")
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def save(
        self, step: int, state: PyTree, position: dict[str, Any], *, force: bool = False
    ) -> bool:
        """Starts saving `state` at `step` if due (or forced); returns whether it saves."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(position)
        )
        return self.manager.save(step, args=args, force=force)

    def restore(
        self, abstract_state: PyTree, step: int | None = None
    ) -> tuple[PyTree, dict[str, Any]]:
        """Restores the state (as shaped and sharded like `abstract_state`) and the position.

        Raises:
          FileNotFoundError: there is no checkpoint to restore.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.manager.directory}")
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["data"]

    def reached_preemption(self, step: int) -> bool:
        """True when a TPU preemption notice arrived (multi-host sync point; False elsewhere)."""
        try:
            return self.manager.reached_preemption(step)
        except (RuntimeError, ValueError):
            # No distributed runtime (single process without jax.distributed): no notices.
            return False

    def wait(self):
        """Blocks until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(state: PyTree) -> PyTree:
    """ShapeDtypeStructs (with shardings) of a concrete or abstract state, for restoring."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        state,
    )


def jax_handles_sigterm() -> bool:
    """True when JAX's preemption notifier owns SIGTERM: a multi-process job whose
    `jax.distributed.initialize` started the preemption service (on by default). A notice on any
    process then reaches every process, and `CheckpointManager.reached_preemption(step)` is True
    on all of them at the same step (JAX's preemption sync point, as MaxText and Orbax use it)."""
    from jax._src import distributed as jax_distributed

    state = jax_distributed.global_state
    return state.client is not None and state.preemption_sync_manager is not None


class StopSignal:
    """Turns SIGINT, and SIGTERM where JAX's preemption notifier does not own it, into a flag
    the train loop polls at each step, agreeing on it across processes (see `jax_handles_sigterm`:
    a Python handler would silently displace JAX's, so it is not installed then)."""

    def __init__(self):
        self.event = threading.Event()
        self._previous = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            signals = [signal.SIGINT]
            if jax_handles_sigterm():
                logging.info("SIGTERM goes to JAX's preemption notifier (multi-host sync point)")
            else:
                signals.append(signal.SIGTERM)
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        self.event.set()
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    @property
    def requested(self) -> bool:
        return self.event.is_set()
