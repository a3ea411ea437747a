"""Hugging Face Qwen2-VL / Qwen2.5-VL checkpoints in and out: safetensors <-> (sharded) Qwen2VL.

Which of the two a directory holds is read from its config.json (`model_type`); the text and
LM-head names are shared, the vision tower's come from `g2e.models.vision.hf_names`.

Reading: config.json plus model.safetensors, or model-*.safetensors with
model.safetensors.index.json. Each parameter is built with `jax.make_array_from_callback`, and
the callback reads only the slice its device owns straight from a memory-mapped file, so a
large model is never materialised whole on one device or host. (The files are memory-mapped
and parsed here rather than through safe_open because numpy has no bfloat16, the dtype of the
released checkpoints; ml_dtypes supplies it.)

Names: released checkpoints, and transformers 5's save_pretrained, write `model.layers.N...`,
`model.embed_tokens`, `model.norm`, `visual...` and `lm_head.weight`; transformers' in-memory
names (`model.language_model...`, `model.visual...`) are accepted too. Writing uses the former.

Layouts: HF linear weights are [out, in], ours [in, out]; decoder and vision layers are stacked
along a leading 'layers' axis.
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
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from g2e.models import lora
from g2e.models import vision as vision_lib
from g2e.models.config import Qwen2VLConfig
from g2e.models.qwen2_vl import Qwen2VL
from g2e.models.sharding import Rules, DEFAULT_RULES, state_shardings
from g2e.models.text import Projection

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# The files of a checkpoint directory besides config.json and the weights; they travel
# unchanged with a checkpoint g2e writes from it.
ASSET_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
               "special_tokens_map.json", "added_tokens.json", "chat_template.json",
               "chat_template.jinja", "preprocessor_config.json", "generation_config.json")

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
           "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
           "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_DTYPE_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class HFParam:
    """How one of our parameters maps onto one HF tensor (per layer when stacked).

    Attributes:
        path: the parameter's path in nnx.state(model), e.g. ('language_model', 'norm', 'scale').
        hf_name: HF tensor name; contains '{i}' for a stacked (per-layer) parameter.
        kind: 'same' (identical layout), 'linear' (HF [out, in], ours [in, out]) — both read
            slice by slice — or a reshaping layout of the vision tower ('conv', 'qkv', ...),
            read whole per layer (those tensors are small) and converted by `from_hf`/`to_hf`.
        from_hf, to_hf: whole-tensor layout converters for the reshaping kinds.
    """

    path: tuple[str, ...]
    hf_name: str
    kind: str = "same"
    from_hf: Callable[[np.ndarray], np.ndarray] | None = None
    to_hf: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf_name


def text_hf_params(config: Qwen2VLConfig) -> list[HFParam]:
    """The text decoder's and LM head's parameter mapping (released HF names)."""
    layer = ("language_model", "layers")
    out = [HFParam(("language_model", "embed_tokens"), "model.embed_tokens.weight"),
           HFParam(("language_model", "norm", "scale"), "model.norm.weight")]
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        out.append(HFParam(layer + ("self_attn", proj, "kernel"),
                           f"model.layers.{{i}}.self_attn.{proj}.weight", "linear"))
        if proj != "o_proj":
            out.append(HFParam(layer + ("self_attn", proj, "bias"),
                               f"model.layers.{{i}}.self_attn.{proj}.bias"))
    for proj in ("gate_proj", "up_proj", "down_proj"):
        out.append(HFParam(layer + ("mlp", proj, "kernel"),
                           f"model.layers.{{i}}.mlp.{proj}.weight", "linear"))
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out.append(HFParam(layer + (norm, "scale"), f"model.layers.{{i}}.{norm}.weight"))
    if not config.tie_word_embeddings:
        out.append(HFParam(("lm_head",), "lm_head.weight", "linear"))
    return out


def vision_hf_params(config: Qwen2VLConfig) -> list[HFParam]:
    """The vision tower's mapping, from vision.hf_names and its layout converters."""
    out = []
    for path, hf_name, kind in vision_lib.hf_names(config.vision):
        if kind in ("same", "linear"):
            out.append(HFParam(("visual",) + path, "visual." + hf_name, kind))
        else:
            out.append(HFParam(
                ("visual",) + path, "visual." + hf_name, kind,
                from_hf=functools.partial(vision_lib._from_hf_layout, kind, config=config.vision),
                to_hf=functools.partial(vision_lib._to_hf_layout, kind, config=config.vision)))
    return out


def hf_params(config: Qwen2VLConfig) -> list[HFParam]:
    """All parameter mappings: text decoder, LM head and vision tower."""
    return text_hf_params(config) + vision_hf_params(config)


def _alternative_names(name: str) -> list[str]:
    """The released name first, then transformers' in-memory spelling of the same tensor."""
    if name.startswith("model."):
        return [name, "model.language_model." + name[len("model."):]]
    if name.startswith("visual."):
        return [name, "model." + name]
    return [name]


# ----------------------------------------------------------------------------- reading files


class _SafetensorsFile:
    """A memory-mapped .safetensors file: header parsed once, tensors sliced lazily."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        self.base = 8 + header_len
        self.entries = header

    def array(self, name: str) -> np.ndarray:
        """The tensor as a read-only memmap (reading happens only for the slices indexed)."""
        entry = self.entries[name]
        dtype = np.dtype(_DTYPES[entry["dtype"]])
        start, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if end == start:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self.base + start, shape=shape)


class _Checkpoint:
    """Name -> tensor access over a checkpoint directory's safetensors files."""

    def __init__(self, directory: pathlib.Path):
        index_path = directory / INDEX_FILE
        single_path = directory / SINGLE_FILE
        if index_path.is_file():
            with open(index_path) as f:
                weight_map = json.load(f).get("weight_map")
            if not weight_map:
                raise ValueError(f"{index_path}: no 'weight_map'; the index file is damaged.")
            files = sorted(set(weight_map.values()))
            missing = [name for name in files if not (directory / name).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{index_path} lists shard files that are missing from {directory}: {missing}; "
                    "copy the complete checkpoint.")
            opened = {name: _SafetensorsFile(directory / name) for name in files}
            self.files = {tensor: opened[name] for tensor, name in weight_map.items()}
        elif single_path.is_file():
            single = _SafetensorsFile(single_path)
            self.files = {tensor: single for tensor in single.entries}
        else:
            raise FileNotFoundError(
                f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found; a Qwen2-VL checkpoint "
                "directory holds config.json and its safetensors weights.")
        self.directory = directory

    def resolve(self, name: str) -> str:
        for candidate in _alternative_names(name):
            if candidate in self.files:
                return candidate
        raise KeyError(
            f"{self.directory}: tensor {name!r} is missing from the checkpoint (also looked for "
            f"{_alternative_names(name)[1:]}); the checkpoint does not match its config.json.")

    def array(self, name: str) -> np.ndarray:
        return self.files[name].array(name)


def _read_block(checkpoint: _Checkpoint, param: HFParam, names: list[str], shape, index,
                dtype) -> np.ndarray:
    """Our array's block `index` (a tuple of slices over `shape`), read from the files."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    layer_ids = range(shape[0])[index[0]] if param.stacked else [None]
    inner = index[1:] if param.stacked else index
    blocks = []
    for layer in layer_ids:
        source = checkpoint.array(names[0 if layer is None else layer])
        if param.kind == "linear":
            block = np.asarray(source[inner[1], inner[0]]).T
        elif param.kind == "same":
            block = np.asarray(source[inner])
        else:
            block = param.from_hf(np.asarray(source))[inner]
        blocks.append(block.astype(dtype))
    return np.stack(blocks) if param.stacked else blocks[0]


def _check_shape(checkpoint: _Checkpoint, param: HFParam, name: str,
                 own_shape: tuple[int, ...]) -> None:
    """Raises ValueError naming the tensor when its HF shape cannot be our `own_shape`."""
    file = checkpoint.files[name]
    found = tuple(file.entries[name]["shape"])
    if param.kind == "linear":
        ok, expected = found == own_shape[::-1], list(own_shape[::-1])
    elif param.kind == "same":
        ok, expected = found == own_shape, list(own_shape)
    else:
        ok = (math.prod(found) == math.prod(own_shape) and
              param.from_hf(np.zeros(found, np.float32)).shape == own_shape)
        expected = f"a {param.kind!r} layout of {list(own_shape)}"
    if not ok:
        raise ValueError(
            f"{file.path}: tensor {name!r} has shape {list(found)}, expected {expected} from "
            "config.json; the weights and the config do not match.")


def _load_param(checkpoint: _Checkpoint, param: HFParam, abstract: jax.ShapeDtypeStruct,
                sharding: jax.sharding.Sharding) -> jax.Array:
    shape = tuple(abstract.shape)
    own_shape = shape[1:] if param.stacked else shape
    names = []
    for layer in (range(shape[0]) if param.stacked else [None]):
        name = checkpoint.resolve(param.hf_name.format(i=layer) if param.stacked
                                  else param.hf_name)
        _check_shape(checkpoint, param, name, own_shape)
        names.append(name)
    dtype = np.dtype(abstract.dtype)
    return jax.make_array_from_callback(
        shape, sharding,
        lambda index: _read_block(checkpoint, param, names, shape, index, dtype))


def _by_path(state: nnx.State) -> dict[tuple, Any]:
    return {tuple(str(k) for k in path): value for path, value in nnx.to_flat_state(state)}


def load_model(path: str | os.PathLike, *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, remat: str = "none", attention: str = "xla",
               adapter: lora.AdapterConfig | None = None, mesh: jax.sharding.Mesh | None = None,
               rules: Rules | None = None, seed: int = 0) -> Qwen2VL:
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
    checkpoint = _Checkpoint(directory)
    rules = DEFAULT_RULES if rules is None else rules

    def make() -> Qwen2VL:
        return Qwen2VL(config, dtype=dtype, param_dtype=param_dtype, remat=remat,
                       attention=attention, adapter=adapter, rngs=nnx.Rngs(seed))

    # LoRAParam subclasses Param, so adapters are split off first.
    graphdef, abstract_adapter, abstract_params = nnx.split(
        nnx.eval_shape(make), nnx.LoRAParam, nnx.Param)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        is_variable = lambda x: isinstance(x, nnx.Variable)
        param_shardings = jax.tree.map(lambda _: device, abstract_params, is_leaf=is_variable)
        adapter_shardings = jax.tree.map(lambda _: device, abstract_adapter, is_leaf=is_variable)
    else:
        param_shardings = state_shardings(abstract_params, mesh, rules)
        adapter_shardings = state_shardings(abstract_adapter, mesh, rules)

    abstract_by_path = _by_path(abstract_params)
    sharding_by_path = _by_path(param_shardings)
    mapping = {param.path: param for param in hf_params(config)}
    unmapped = sorted(set(abstract_by_path) - set(mapping))
    if unmapped:
        raise RuntimeError(f"hf_io: no HF name for parameters {unmapped}; update hf_params().")
    loaded = {path: _load_param(checkpoint, mapping[path], abstract_by_path[path],
                                sharding_by_path[path]) for path in abstract_by_path}
    params = nnx.State.from_flat_path(
        {path: variable.replace(loaded[tuple(str(k) for k in path)])
             for path, variable in nnx.to_flat_state(abstract_params)})

    model = nnx.merge(graphdef, params, abstract_adapter)
    if adapter is not None:
        _init_adapters(model, adapter, seed, _by_path(adapter_shardings))
    return model


def _init_adapters(model: Qwen2VL, adapter: lora.AdapterConfig, seed: int,
                   shardings: dict[tuple, jax.sharding.Sharding]) -> None:
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


def merged_kernels(model: Qwen2VL) -> dict[tuple, jax.Array]:
    """Kernels of adapted projections with their LoRA/DoRA update folded in (lora.merge).

    Returns:
        {kernel path in nnx.state(model): merged kernel}; empty without adapters.
    """
    merged = {}
    for path, module in nnx.iter_graph(model):
        if not isinstance(module, Projection) or module.adapter_config is None:
            continue
        merge = functools.partial(lora.merge, config=module.adapter_config)
        kernel, adapter_state = module.kernel.value, module.adapter_state()
        if kernel.ndim == 3:  # stacked layers
            merge = jax.vmap(merge)
        merged[tuple(str(k) for k in path) + ("kernel",)] = jax.jit(merge)(kernel, adapter_state)
    return merged


def to_hf_state_dict(model: Qwen2VL, dtype: Any = None) -> dict[str, np.ndarray]:
    """Our parameters under HF names, shapes and layouts (released naming), as numpy arrays.

    Adapters are merged into their base kernels (`merged_kernels`), so the result is a plain
    Qwen2-VL checkpoint. `dtype` casts every tensor (e.g. ml_dtypes.bfloat16); None keeps
    each parameter's dtype.
    """
    params = {path: variable.value for path, variable in
              _by_path(nnx.state(model, nnx.Param)).items()}
    params.update(merged_kernels(model))
    out: dict[str, np.ndarray] = {}
    for param in hf_params(model.config):
        value = np.asarray(jax.device_get(params[param.path]))
        layers = range(value.shape[0]) if param.stacked else [None]
        for layer in layers:
            array = value if layer is None else value[layer]
            if param.kind == "linear":
                array = array.T
            elif param.kind != "same":
                array = param.to_hf(array)
            name = param.hf_name.format(i=layer) if param.stacked else param.hf_name
            out[name] = np.ascontiguousarray(array if dtype is None else array.astype(dtype))
    return out


def _write_safetensors(path: pathlib.Path, tensors: dict[str, np.ndarray]) -> None:
    header, offset = {}, 0
    for name, array in tensors.items():
        header[name] = {"dtype": _DTYPE_NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for array in tensors.values():
            f.write(array.tobytes())


def save_hf(model: Qwen2VL, out_dir: str | os.PathLike, *, max_shard_bytes: int = 2 << 30,
            dtype: Any = None) -> list[pathlib.Path]:
    """Writes config.json, model-0000i-of-0000n.safetensors and model.safetensors.index.json.

    Args:
        model: the model; adapters are merged into the written kernels.
        out_dir: created if missing.
        max_shard_bytes: a new shard starts when the next tensor would pass this size.
        dtype: tensor dtype on disk (e.g. ml_dtypes.bfloat16 or np.float32); None keeps ours.

    Returns:
        The safetensors files written.
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_state_dict(model, dtype)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        array = tensors[name]
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(out_dir / file_name, shard)
        files.append(out_dir / file_name)
        weight_map.update({name: file_name for name in shard})
    total = sum(array.nbytes for array in tensors.values())
    with open(out_dir / INDEX_FILE, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    config = model.config.to_hf()
    first = next(iter(tensors.values()))
    config["torch_dtype"] = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(
        _DTYPE_NAMES[first.dtype], "float32")
    with open(out_dir / "config.json", "w") as f:
        json.dump(config, f, indent=2)
    return files


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
