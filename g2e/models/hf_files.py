"""Hugging Face checkpoint files: our parameters' HF names, and safetensors read and written.

Names: released checkpoints, and transformers 5's save_pretrained, write `model.layers.N...`,
`model.embed_tokens`, `model.norm`, `visual...` and `lm_head.weight`; transformers' in-memory
names (`model.language_model...`, `model.visual...`) are accepted too. Writing uses the former.
The text and LM-head names are shared by Qwen2-VL and Qwen2.5-VL, the vision tower's come from
`g2e.models.vision.hf_names`.

Layouts: HF linear weights are [out, in], ours [in, out]; decoder and vision layers are stacked
along a leading 'layers' axis.

Reading: the files are memory-mapped and parsed here rather than through safe_open because
numpy has no bfloat16, the dtype of the released checkpoints (ml_dtypes supplies it); a tensor
is read only where it is indexed, so each device can read just its own block.
Writing: `write_shards` streams tensors one at a time into size-capped shard files plus the
index, so a writer holds one tensor in memory, not the model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
from collections.abc import Callable

import ml_dtypes
import numpy as np

from g2e.models import vision as vision_lib
from g2e.models.config import Qwen2VLConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
DTYPE_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
# Floating dtypes: the ones a written checkpoint may cast (integer tensors keep theirs).
FLOATS = {
    np.dtype(np.float64),
    np.dtype(np.float32),
    np.dtype(np.float16),
    np.dtype(ml_dtypes.bfloat16),
}


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
    out = [
        HFParam(("language_model", "embed_tokens"), "model.embed_tokens.weight"),
        HFParam(("language_model", "norm", "scale"), "model.norm.weight"),
    ]
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        out.append(
            HFParam(
                layer + ("self_attn", proj, "kernel"),
                f"model.layers.{{i}}.self_attn.{proj}.weight",
                "linear",
            )
        )
        if proj != "o_proj":
            out.append(
                HFParam(
                    layer + ("self_attn", proj, "bias"), f"model.layers.{{i}}.self_attn.{proj}.bias"
                )
            )
    for proj in ("gate_proj", "up_proj", "down_proj"):
        out.append(
            HFParam(
                layer + ("mlp", proj, "kernel"), f"model.layers.{{i}}.mlp.{proj}.weight", "linear"
            )
        )
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
            out.append(
                HFParam(
                    ("visual",) + path,
                    "visual." + hf_name,
                    kind,
                    from_hf=functools.partial(
                        vision_lib._from_hf_layout, kind, config=config.vision
                    ),
                    to_hf=functools.partial(vision_lib._to_hf_layout, kind, config=config.vision),
                )
            )
    return out


def hf_params(config: Qwen2VLConfig) -> list[HFParam]:
    """All parameter mappings: text decoder, LM head and vision tower."""
    return text_hf_params(config) + vision_hf_params(config)


def alternative_names(name: str) -> list[str]:
    """The released name first, then transformers' in-memory spelling of the same tensor."""
    if name.startswith("model."):
        return [name, "model.language_model." + name[len("model.") :]]
    if name.startswith("visual."):
        return [name, "model." + name]
    return [name]


# ----------------------------------------------------------------------------- reading files


class SafetensorsFile:
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
        dtype = np.dtype(DTYPES[entry["dtype"]])
        start, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if end == start:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self.base + start, shape=shape)


class Checkpoint:
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
                    "copy the complete checkpoint."
                )
            opened = {name: SafetensorsFile(directory / name) for name in files}
            self.files = {tensor: opened[name] for tensor, name in weight_map.items()}
        elif single_path.is_file():
            single = SafetensorsFile(single_path)
            self.files = {tensor: single for tensor in single.entries}
        else:
            raise FileNotFoundError(
                f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found; a Qwen2-VL checkpoint "
                "directory holds config.json and its safetensors weights."
            )
        self.directory = directory

    def resolve(self, name: str) -> str:
        for candidate in alternative_names(name):
            if candidate in self.files:
                return candidate
        raise KeyError(
            f"{self.directory}: tensor {name!r} is missing from the checkpoint (also looked for "
            f"{alternative_names(name)[1:]}); the checkpoint does not match its config.json."
        )

    def array(self, name: str) -> np.ndarray:
        return self.files[name].array(name)


def read_block(
    checkpoint: Checkpoint, param: HFParam, names: list[str], shape, index, dtype
) -> np.ndarray:
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


def check_shape(
    checkpoint: Checkpoint, param: HFParam, name: str, own_shape: tuple[int, ...]
) -> None:
    """Raises ValueError naming the tensor when its HF shape cannot be our `own_shape`."""
    file = checkpoint.files[name]
    found = tuple(file.entries[name]["shape"])
    if param.kind == "linear":
        ok, expected = found == own_shape[::-1], list(own_shape[::-1])
    elif param.kind == "same":
        ok, expected = found == own_shape, list(own_shape)
    else:
        ok = (
            math.prod(found) == math.prod(own_shape)
            and param.from_hf(np.zeros(found, np.float32)).shape == own_shape
        )
        expected = f"a {param.kind!r} layout of {list(own_shape)}"
    if not ok:
        raise ValueError(
            f"{file.path}: tensor {name!r} has shape {list(found)}, expected {expected} from "
            "config.json; the weights and the config do not match."
        )


# ----------------------------------------------------------------------------- writing files


@dataclasses.dataclass(frozen=True)
class OutTensor:
    """One tensor to write: its HF name, shape and dtype on disk, and how to produce it.

    `read` returns the value in HF layout; when `collective`, every process must call it (it
    merges or gathers arrays that span hosts), otherwise only the writing process does.
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[], np.ndarray]
    collective: bool

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def write_safetensors(path: pathlib.Path, tensors: list[OutTensor]) -> None:
    """Writes the header (known from shapes and dtypes), then each tensor as it is read."""
    header, offset = {}, 0
    for tensor in tensors:
        header[tensor.name] = {
            "dtype": DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for tensor in tensors:
            array = tensor.read()
            if array.shape != tensor.shape or array.dtype != tensor.dtype:
                raise RuntimeError(
                    f"hf_io: {tensor.name} came out {array.dtype}{list(array.shape)}"
                    f", expected {tensor.dtype}{list(tensor.shape)}"
                )
            f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def write_shards(
    out_dir: pathlib.Path | None, tensors: list[OutTensor], max_shard_bytes: int
) -> list[pathlib.Path]:
    """Writes `tensors`, in order, as model-0000i-of-0000n.safetensors plus INDEX_FILE.

    A new shard starts when the next tensor would pass `max_shard_bytes`. With out_dir None,
    nothing is written and only the collective tensors are read: what a process that takes
    part in a collective write without writing does.

    Returns:
        The safetensors files written.
    """
    if out_dir is None:
        for tensor in tensors:
            if tensor.collective:
                tensor.read()
        return []
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        path = out_dir / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(path, shard)
        files.append(path)
        weight_map.update({tensor.name: path.name for tensor in shard})
    total = sum(tensor.nbytes for tensor in tensors)
    with open(out_dir / INDEX_FILE, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files
