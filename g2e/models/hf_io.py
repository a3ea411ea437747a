"""Hugging Face Qwen2-VL / Qwen2.5-VL checkpoints in and out: safetensors <-> (sharded) Qwen2VL.

Which of the two a directory holds is read from its config.json (`model_type`); the HF names,
layouts and the safetensors files themselves are `g2e.models.hf_files`.

Reading: config.json plus model.safetensors, or model-*.safetensors with
model.safetensors.index.json. Each parameter is built with `jax.make_array_from_callback`, and
the callback reads only the slice its device owns straight from a memory-mapped file, so a
large model is never materialised whole on one device or host.

Writing (`save_hf`) is collective, since a model's arrays may span hosts: every process calls
it with the same arguments, all take part in each merge and gather, and only process 0 (the
one given a directory) writes. Adapters are merged in float32; given the checkpoint the model
came from (`source_dir`), the base weights are the source's as stored on disk, not the copy
held in `param_dtype`, and every tensor nothing changed is copied bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import shutil
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from g2e.models import lora
from g2e.models.config import Qwen2VLConfig
from g2e.models.hf_files import (
    DTYPE_NAMES,
    DTYPES,
    FLOATS,
    Checkpoint,
    HFParam,
    OutTensor,
    check_shape,
    hf_params,
    read_block,
    write_shards,
)
from g2e.models.qwen2_vl import Qwen2VL
from g2e.models.sharding import Rules, rules_or_default, state_shardings
from g2e.models.text import Projection

# The files of a checkpoint directory besides config.json and the weights; they travel
# unchanged with a checkpoint g2e writes from it.
ASSET_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "generation_config.json",
)


def _load_param(
    checkpoint: Checkpoint,
    param: HFParam,
    abstract: jax.ShapeDtypeStruct,
    sharding: jax.sharding.Sharding,
) -> jax.Array:
    shape = tuple(abstract.shape)
    own_shape = shape[1:] if param.stacked else shape
    names = []
    for layer in range(shape[0]) if param.stacked else [None]:
        name = checkpoint.resolve(param.hf_name.format(i=layer) if param.stacked else param.hf_name)
        check_shape(checkpoint, param, name, own_shape)
        names.append(name)
    dtype = np.dtype(abstract.dtype)
    return jax.make_array_from_callback(
        shape, sharding, lambda index: read_block(checkpoint, param, names, shape, index, dtype)
    )


def _by_path(state: nnx.State) -> dict[tuple, Any]:
    return {tuple(str(k) for k in path): value for path, value in nnx.to_flat_state(state)}


def load_model(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    remat: str = "none",
    attention: str = "xla",
    adapter: lora.AdapterConfig | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: Rules | None = None,
    seed: int = 0,
) -> Qwen2VL:
    """Reads a HF Qwen2-VL or Qwen2.5-VL directory into a Qwen2VL, parameters already sharded.

    Args:
        path: checkpoint directory (config.json + model.safetensors or sharded files + index).
        dtype, param_dtype, remat, attention, adapter: as for Qwen2VL.
        mesh: device mesh to shard over; None puts everything on the first device.
        rules: logical-axis rule table (default sharding.DEFAULT_RULES).
        seed: initialises the adapter (LoRA A); DoRA magnitudes start from the loaded weights.

    Returns:
        The model. Adapter parameters (if any) are freshly initialised.

    Raises:
        FileNotFoundError: the directory, config.json or safetensors files are missing.
        ValueError: model_type is not qwen2_vl / qwen2_5_vl, or a tensor has the wrong shape
            (named).
        KeyError: a tensor is missing (named).
    """
    directory = pathlib.Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: checkpoint directory does not exist.")
    config = Qwen2VLConfig.from_dir(directory)
    rules = rules_or_default(rules)

    def make() -> Qwen2VL:
        return Qwen2VL(
            config,
            dtype=dtype,
            param_dtype=param_dtype,
            remat=remat,
            attention=attention,
            adapter=adapter,
            rngs=nnx.Rngs(seed),
        )

    # LoRAParam subclasses Param, so adapters are split off first.
    graphdef, abstract_adapter, abstract_params = nnx.split(
        nnx.eval_shape(make), nnx.LoRAParam, nnx.Param
    )
    params = _load_params(
        Checkpoint(directory), config, abstract_params, _shardings(abstract_params, mesh, rules)
    )
    model = nnx.merge(graphdef, params, abstract_adapter)
    if adapter is not None:
        adapter_shardings = _shardings(abstract_adapter, mesh, rules)
        _init_adapters(model, adapter, seed, _by_path(adapter_shardings))
    return model


def _shardings(abstract: nnx.State, mesh: jax.sharding.Mesh | None, rules: Rules) -> Any:
    """Where each variable of `abstract` goes: its logical axes on the mesh, or the first
    device without a mesh."""
    if mesh is not None:
        return state_shardings(abstract, mesh, rules)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    is_variable = lambda x: isinstance(x, nnx.Variable)
    return jax.tree.map(lambda _: device, abstract, is_leaf=is_variable)


def _load_params(
    checkpoint: Checkpoint, config: Qwen2VLConfig, abstract_params: nnx.State, shardings: Any
) -> nnx.State:
    """Every parameter of `abstract_params` read from the checkpoint, each straight onto its
    shardings (the HF name and layout of each: `hf_params`)."""
    abstract_by_path = _by_path(abstract_params)
    sharding_by_path = _by_path(shardings)
    mapping = {param.path: param for param in hf_params(config)}
    unmapped = sorted(set(abstract_by_path) - set(mapping))
    if unmapped:
        raise RuntimeError(f"hf_io: no HF name for parameters {unmapped}; update hf_params().")
    loaded = {
        path: _load_param(checkpoint, mapping[path], abstract_by_path[path], sharding_by_path[path])
        for path in abstract_by_path
    }
    return nnx.State.from_flat_path(
        {
            path: variable.replace(loaded[tuple(str(k) for k in path)])
            for path, variable in nnx.to_flat_state(abstract_params)
        }
    )


def _init_adapters(
    model: Qwen2VL,
    adapter: lora.AdapterConfig,
    seed: int,
    shardings: dict[tuple, jax.sharding.Sharding],
) -> None:
    """Initialises each adapted projection from its loaded kernel (DoRA magnitudes need it).

    One small jitted init per projection, placed directly with the adapter's shardings.
    """
    root = jax.random.key(seed)
    for path, module in nnx.iter_graph(model):
        if not isinstance(module, Projection) or module.adapter_config is None:
            continue
        path = tuple(str(k) for k in path)
        names = ["lora_a", "lora_b"] + (["magnitude"] if adapter.kind == "dora" else [])
        dtypes = {name: getattr(module, name).value.dtype for name in names}

        def init(key, kernel, dtypes=dtypes):
            state = lora.init_adapter(key, kernel.shape[0], kernel.shape[1], kernel, adapter)
            return {name: state[name].astype(dtypes[name]) for name in dtypes}

        kernel = module.kernel.value
        key = jax.random.fold_in(root, zlib.crc32("/".join(path).encode()))
        if kernel.ndim == 3:  # stacked layers: one key per layer
            init = jax.vmap(init)
            key = jax.random.split(key, kernel.shape[0])
        out_shardings = {name: shardings[path + (name,)] for name in names}
        state = jax.jit(init, out_shardings=out_shardings)(key, kernel)
        for name in names:
            getattr(module, name).value = state[name]


# ----------------------------------------------------------------------------- writing
# Every process produces the tensors in the same order, so the collective ones (merges and
# gathers) line up; each is produced when its turn to be written comes, so host memory holds one
# tensor (one stacked parameter without a source), not the model.

# Dtypes a checkpoint may be written in (`export.dtype` and save_hf's `dtype`).
DISK_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def to_host(array: jax.Array) -> np.ndarray:
    """The whole array as numpy on every process; a collective when the array spans several
    processes (then every process must call it, in the same order)."""
    if array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def _cast(array: np.ndarray, dtype: Any) -> np.ndarray:
    """`array` in `dtype` if both are floating (integer tensors keep theirs); None keeps it."""
    if dtype is None or array.dtype not in FLOATS or np.dtype(dtype) == array.dtype:
        return array
    return array.astype(dtype)


def _out_dtype(stored: np.dtype, dtype: Any) -> np.dtype:
    return np.dtype(dtype) if dtype is not None and stored in FLOATS else stored


@jax.jit
def _take_layer(stacked: jax.Array, layer: jax.Array) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(stacked, layer, keepdims=False)


def _merge_sharding(shape: tuple[int, int], kernel: jax.Array) -> jax.sharding.Sharding | None:
    """How one merged layer [in, out] is spread: its out dimension over every mesh axis when
    they divide it (else replicated), `in` never split. Each column norm is then summed whole
    on one device, and every device holds a block of the same shape for any layout of the same
    number of devices (one process x 8 or two x 4), so the bytes do not depend on the layout
    (XLA's CPU reductions round differently for blocks of different widths). None: no mesh."""
    sharding = kernel.sharding
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return None
    mesh = sharding.mesh
    axes = tuple(name for name in mesh.axis_names if mesh.shape[name] > 1)
    ways = math.prod(mesh.shape[name] for name in axes)
    spec = jax.sharding.PartitionSpec(None, axes if axes and shape[1] % ways == 0 else None)
    return jax.sharding.NamedSharding(mesh, spec)


@functools.cache
def _merge_program(
    config: lora.AdapterConfig, dtype: np.dtype, sharding: jax.sharding.Sharding | None
) -> Callable:
    """kernel [in, out] (any dtype), adapter of one layer -> merged kernel in `dtype`, the merge
    itself in float32 (lora.merge)."""

    def merge(kernel, adapter):
        kernel = kernel.astype(jnp.float32)
        if sharding is not None:
            kernel = jax.lax.with_sharding_constraint(kernel, sharding)
        return lora.merge(kernel, adapter, config).astype(dtype)

    return jax.jit(merge, out_shardings=sharding)


def _merged_layer(
    module: Projection,
    layer: int | None,
    dtype: np.dtype,
    kernel: Callable[[jax.sharding.Sharding | None], jax.Array],
) -> np.ndarray:
    """One layer of an adapted projection, merged, in HF layout [out, in] (collective).

    `kernel(sharding)` gives the base kernel of that layer [in, out], placed with `sharding`
    (None: wherever it is).
    """
    adapter = module.adapter_state()
    if layer is not None:
        adapter = {key: _take_layer(value, layer) for key, value in adapter.items()}
    stacked = module.kernel.value
    shape = tuple(stacked.shape[-2:])
    sharding = _merge_sharding(shape, stacked)
    merged = _merge_program(module.adapter_config, np.dtype(dtype), sharding)(
        kernel(sharding), adapter
    )
    return np.ascontiguousarray(to_host(merged).T)


def _adapted_projections(model: Qwen2VL) -> dict[tuple, Projection]:
    """{kernel path in nnx.state(model): projection} of the projections carrying an adapter."""
    return {
        tuple(str(k) for k in path) + ("kernel",): module
        for path, module in nnx.iter_graph(model)
        if isinstance(module, Projection) and module.adapter_config is not None
    }


def _model_tensors(model: Qwen2VL, dtype: Any) -> list[OutTensor]:
    """Every parameter of the model under its released HF name, adapters merged in float32."""
    params = {
        path: variable.value for path, variable in _by_path(nnx.state(model, nnx.Param)).items()
    }
    adapted = _adapted_projections(model)
    stacks: dict[tuple, np.ndarray] = {}  # the parameter being written, gathered once

    def read(param: HFParam, layer: int | None) -> np.ndarray:
        value = params[param.path]
        if param.path in adapted:
            module = adapted[param.path]
            kernel = (lambda _: value) if layer is None else (lambda _: _take_layer(value, layer))
            return _merged_layer(module, layer, _out_dtype(value.dtype, dtype), kernel)
        if param.path not in stacks:
            stacks.clear()
            stacks[param.path] = to_host(value)
        array = stacks[param.path] if layer is None else stacks[param.path][layer]
        if param.kind == "linear":
            array = array.T
        elif param.kind != "same":
            array = param.to_hf(array)
        return np.ascontiguousarray(_cast(array, dtype))

    out = []
    for param in hf_params(model.config):
        value = params[param.path]
        stored = _out_dtype(np.dtype(value.dtype), dtype)
        own_shape = tuple(value.shape[1:] if param.stacked else value.shape)
        if param.kind == "linear":
            shape = own_shape[::-1]
        elif param.kind == "same":
            shape = own_shape
        else:
            shape = param.to_hf(np.zeros(own_shape, np.float32)).shape
        for layer in range(value.shape[0]) if param.stacked else [None]:
            name = param.hf_name.format(i=layer) if param.stacked else param.hf_name
            out.append(
                OutTensor(
                    name,
                    tuple(shape),
                    stored,
                    functools.partial(read, param, layer),
                    collective=True,
                )
            )
    return out


def _source_tensors(model: Qwen2VL, source_dir: pathlib.Path, dtype: Any) -> list[OutTensor]:
    """Every tensor of the source checkpoint, as stored, under its own name; the kernels the
    model adapts are merged in float32 from the source's values (not from the model's copy in
    param_dtype). Only the merges are collective."""
    checkpoint = Checkpoint(source_dir)
    merges: dict[str, tuple[Projection, HFParam, int | None]] = {}
    adapted = _adapted_projections(model)
    for param in hf_params(model.config):
        if param.path not in adapted:
            continue
        stacked = adapted[param.path].kernel.value
        for layer in range(stacked.shape[0]) if param.stacked else [None]:
            name = checkpoint.resolve(
                param.hf_name.format(i=layer) if param.stacked else param.hf_name
            )
            check_shape(checkpoint, param, name, tuple(stacked.shape[-2:]))
            merges[name] = (adapted[param.path], param, layer)

    def copy(name: str) -> np.ndarray:
        return np.ascontiguousarray(_cast(np.asarray(checkpoint.array(name)), dtype))

    def merge(name: str, stored: np.dtype) -> np.ndarray:
        module, param, layer = merges[name]
        shape = tuple(module.kernel.value.shape[-2:])
        layer_param = dataclasses.replace(param, hf_name=name)

        def kernel(sharding):  # each device reads its own block of the source, in float32
            sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
            return jax.make_array_from_callback(
                shape,
                sharding,
                lambda index: read_block(checkpoint, layer_param, [name], shape, index, np.float32),
            )

        return _merged_layer(module, layer, stored, kernel)

    out = []
    for name in sorted(checkpoint.files):
        entry = checkpoint.files[name].entries[name]
        stored = _out_dtype(np.dtype(DTYPES[entry["dtype"]]), dtype)
        read = (
            functools.partial(merge, name, stored)
            if name in merges
            else functools.partial(copy, name)
        )
        out.append(OutTensor(name, tuple(entry["shape"]), stored, read, collective=name in merges))
    return out


def _source_config(model: Qwen2VL, source_dir: pathlib.Path, dtype: Any) -> dict[str, Any]:
    """The source's config.json, with only what the export changes: the dtype fields when
    `dtype` differs from the source's, and `architectures` when the source has none."""
    config = json.loads((source_dir / "config.json").read_text())
    config.setdefault("architectures", model.config.to_hf()["architectures"])
    if dtype is not None:
        name = next(key for key, value in DISK_DTYPES.items() if np.dtype(value) == dtype)
        found = False
        for block in (config, config.get("text_config"), config.get("vision_config")):
            for key in ("torch_dtype", "dtype"):
                if isinstance(block, dict) and key in block:
                    block[key], found = name, True
        if not found:
            config["torch_dtype"] = name
    return config


def save_hf(
    model: Qwen2VL,
    out_dir: str | os.PathLike | None,
    *,
    max_shard_bytes: int = 2 << 30,
    dtype: Any = None,
    source_dir: str | os.PathLike | None = None,
) -> list[pathlib.Path]:
    """Writes config.json, model-0000i-of-0000n.safetensors and model.safetensors.index.json.

    Collective: with several processes, every process calls it with the same arguments, and
    the processes other than 0 pass out_dir=None (they take part in the merges and gathers and
    write nothing).

    Args:
        model: the model; adapters are merged (in float32) into the written kernels.
        out_dir: created if missing; None: take part without writing.
        max_shard_bytes: a new shard starts when the next tensor would pass this size.
        dtype: floating tensors' dtype on disk (e.g. ml_dtypes.bfloat16 or np.float32); None
            keeps each tensor's own (the source's, or the model's parameter dtype).
        source_dir: the checkpoint the model was loaded from. Given, the tensors are the
            source's as stored (bit-equal when nothing is adapted and `dtype` is None or the
            same), adapted kernels are merged from the source's values, and config.json is the
            source's (see `_source_config`). None: the model's own parameters (e.g. after full
            fine-tuning) and a config.json from its configuration.

    Returns:
        The safetensors files written (none when out_dir is None).
    """
    dtype = None if dtype is None else np.dtype(dtype)
    if source_dir is not None:
        tensors = _source_tensors(model, pathlib.Path(source_dir), dtype)
    else:
        tensors = _model_tensors(model, dtype)
    if out_dir is None:
        write_shards(None, tensors, max_shard_bytes)
        return []
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = write_shards(out_dir, tensors, max_shard_bytes)
    if source_dir is not None:
        config = _source_config(model, pathlib.Path(source_dir), dtype)
    else:
        config = model.config.to_hf()
        config["torch_dtype"] = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(
            DTYPE_NAMES[tensors[0].dtype], "float32"
        )
    with open(out_dir / "config.json", "w") as f:
        json.dump(config, f, indent=2)
    return files


def to_hf_state_dict(model: Qwen2VL, dtype: Any = None) -> dict[str, np.ndarray]:
    """Our parameters under HF names, shapes and layouts (released naming), as numpy arrays,
    adapters merged: what `save_hf` writes without a source (collective, like it)."""
    return {
        tensor.name: tensor.read()
        for tensor in _model_tensors(model, None if dtype is None else np.dtype(dtype))
    }


def copy_assets(source_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """Copies the ASSET_FILES that `source_dir` has (tokenizer, image processor, ...) to
    `out_dir`; returns their names."""
    source_dir, out_dir = pathlib.Path(source_dir), pathlib.Path(out_dir)
    copied = []
    for name in ASSET_FILES:
        if (source_dir / name).is_file():
            shutil.copy2(source_dir / name, out_dir / name)
            copied.append(name)
    return copied
