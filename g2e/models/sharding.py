"""Logical axis names -> mesh axes, through one short rule table.

Every parameter carries logical axis names in its nnx metadata (`out_sharding`, e.g.
('layers', 'embed', 'mlp')); key activations are constrained with `constrain(x, axes)`. A rule
table (a list of (logical name, mesh axes) pairs, kept in the experiment config) maps them onto
a mesh with axes ('data', 'fsdp', 'tensor'). Names without a rule are replicated, and a mesh axis
is used at most once per array (the first logical axis that asks for it wins).

Activations are constrained only inside `with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):`
(no mesh or no rules: `constrain` is the identity), so single-device code needs no mesh at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.core.spmd
import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, Any]]

# The default table (`config.sharding_rules` starts from it). Batch-like axes go over data and
# fsdp; weights are sharded over fsdp on their model width and over tensor on heads / MLP width /
# vocabulary (Megatron-style); axes without a mesh axis are replicated. Names: the legend of
# `g2e.models`.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("vision_embed", "fsdp"),
    ("vision_heads", "tensor"),
    ("vision_mlp", "tensor"),
    ("patches", None),
    ("lora_rank", None),
)

# Logical axes of each batch field (see "The batch" in the design notes); a field not listed
# has its batch dimension first.
BATCH_FIELD_AXES: dict[str, tuple[str | None, ...]] = {
    "input_ids": ("batch", "length"),
    "attention_mask": ("batch", "length"),
    "position_ids": (None, "batch", "length"),
    "pixel_values": ("batch", "patches", None),
    "vision_segment_ids": ("batch", "patches"),
    "vision_positions": ("batch", "patches", None),
    "vision_window_ids": ("batch", "patches"),  # Qwen2.5-VL only
    "image_token_index": ("batch", "length"),
    "merged_token_index": ("batch", "length"),
    "last_index": ("batch",),
}


def logical_to_spec(
    axes: Sequence[str | None], rules: Rules, mesh_axis_names: Sequence[str] | None = None
) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec with the rule table.

    Mesh axes absent from `mesh_axis_names` (when given) and mesh axes already used by an earlier
    dimension are dropped, so one table serves meshes of any shape.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in axes:
        target = table.get(name) if name is not None else None
        if target is None:
            spec.append(None)
            continue
        wanted = (target,) if isinstance(target, str) else tuple(target)
        kept = tuple(
            a for a in wanted if a not in used and (mesh_axis_names is None or a in mesh_axis_names)
        )
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return PartitionSpec(*spec)


def batch_axes(rules: Rules, mesh_axis_names: Sequence[str]) -> tuple[str, ...]:
    """The mesh axes the batch dimension is split over: the 'batch' rule, restricted to the mesh.

    Every batch placement, per-device batch size and collective over the batch reads this, so
    changing the 'batch' rule in the config moves all of them together.
    """
    entry = logical_to_spec(("batch",), rules, mesh_axis_names)[0]
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def rules_or_default(rules: Rules | None) -> tuple[tuple[str, Any], ...]:
    """`rules` as a tuple, or DEFAULT_RULES when None: the one place the default applies."""
    return DEFAULT_RULES if rules is None else tuple(rules)


def batch_devices(mesh: Any, rules: Rules | None, *, per_process: bool = False) -> int:
    """Devices the batch dimension is split over: the product of the sizes of `batch_axes`.

    The one definition of this number: per-device batch sizes, GradCache chunks, the vision
    tower's row groups and per-device dropout draws all read it.

    Args:
      mesh: a Mesh or AbstractMesh; None (no mesh) counts as one device.
      rules: the logical-axis rule table (None: DEFAULT_RULES).
      per_process: count only this process's share of those devices (at least 1).
    """
    if mesh is None:
        return 1
    axes = batch_axes(rules_or_default(rules), mesh.axis_names)
    devices = math.prod(mesh.shape[axis] for axis in axes)
    return max(devices // jax.process_count(), 1) if per_process else devices


def batch_dim(field: str) -> int:
    """The position of the batch dimension in a batch field (1 for position_ids [3, B, L])."""
    return BATCH_FIELD_AXES.get(field, ("batch",)).index("batch")


def _fits(shape: Sequence[int], spec: PartitionSpec, mesh: jax.sharding.Mesh) -> PartitionSpec:
    """Replicates any dimension the mesh axes do not divide (e.g. 2 KV heads on tensor=4)."""
    out = []
    for size, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if entry is None else (entry,) if isinstance(entry, str) else entry
        ways = int(np.prod([mesh.shape[n] for n in names])) if names else 1
        out.append(entry if size % ways == 0 else None)
    return PartitionSpec(*out)


def variable_axes(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names a parameter was created with (None if it has none)."""
    return variable.get_metadata().get("out_sharding")


def state_shardings(state: Any, mesh: jax.sharding.Mesh, rules: Rules) -> Any:
    """NamedShardings for an nnx.State (abstract or concrete) from its variables' logical axes."""

    def one(variable):
        axes = variable_axes(variable) or ()
        spec = logical_to_spec(axes, rules, mesh.axis_names)
        return NamedSharding(mesh, _fits(variable.shape, spec, mesh))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical axes; identity without mesh and rules."""
    rules = flax.core.spmd.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh is None or mesh.empty:
        return x
    spec = logical_to_spec(axes, rules, mesh.axis_names)
    return jax.lax.with_sharding_constraint(x, _fits(x.shape, spec, mesh))


def create_sharded(
    make_module: Callable[[], nnx.Module], mesh: jax.sharding.Mesh, rules: Rules
) -> nnx.Module:
    """Builds a module with every parameter created already sharded (never whole on one device).

    Shapes come from `nnx.eval_shape`; the initialiser then runs under `jax.jit` with
    `out_shardings`, so each device computes only its own shards.
    """
    abstract = nnx.eval_shape(make_module)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)

    def init():
        return nnx.state(make_module())

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)
