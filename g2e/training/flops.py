"""FLOP accounting of a train step: model FLOPs (MFU) and hardware FLOPs (HFU).

MFU = model FLOPs / (step time x peak FLOP/s of every device). Model FLOPs are the matrix work
the method itself needs, counted from the batch's real (non-pad) tokens and image patches:
  * text decoder, forward: every projection (q, k, v, o, gate, up, down) on every real token,
    except in the last layer, which runs only at the pooled token (its keys and values still
    on every token); the adapters' A and B products; DoRA-with-dropout's second base product
    drop(x) @ W (PEFT's formulation needs it); attention as 2 products of H x E per
    (query, key) pair the causal mask allows. No embedding lookup, and no LM head (an embedder
    never uses it).
  * text decoder, backward: each product's activation gradient costs its forward (dX = dY W^T;
    attention's backward twice its forward), and weight gradients are counted for the trainable
    parameters only: the adapters' A and B (or every weight under full fine-tuning). A frozen
    base gets no weight gradient, so an adapter step costs about 2x its forward, not the 3x of
    the usual 6N rule, which would inflate MFU by half. Layer 0's input gradient, which no
    parameter needs, is counted: under 1/N of the backward.
  * vision tower: each image's forward once (frozen, nothing flows back), with attention inside
    the image (or its windows, Qwen2.5-VL), the patch embedding and the merger.
  * the loss: the [N, N] similarity matrix, forward and backward.
HFU = hardware FLOPs / (step time x peak), from the compiled step itself (`hlo_flops`): every
dot of the optimised per-device HLO, so recomputation (GradCache's second forward, remat) counts
towards HFU only. XLA's own `compiled.cost_analysis()` counts a while loop's body once, which
undercounts scanned layers N-fold; `hlo_flops` multiplies loop bodies by their trip count.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from g2e.models import lora
from g2e.models.config import Qwen2VLConfig, TextConfig, VisionConfig

# Peak dense bf16 FLOP/s per chip (device_kind prefixes), for MFU and HFU.
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v4", 275e12),
)


def peak_flops(device: Any = None) -> float | None:
    """Peak bf16 FLOP/s of one device (default the first), or None when unknown (CPU)."""
    kind = (device or jax.devices()[0]).device_kind
    for prefix, flops in PEAK_FLOPS:
        if kind.startswith(prefix) or prefix in kind:
            return flops
    return None


def _projections(text: TextConfig) -> dict[str, tuple[int, int]]:
    d, e = text.hidden_size, text.head_dim
    return {
        "q_proj": (d, text.num_heads * e),
        "k_proj": (d, text.num_kv_heads * e),
        "v_proj": (d, text.num_kv_heads * e),
        "o_proj": (text.num_heads * e, d),
        "gate_proj": (d, text.intermediate_size),
        "up_proj": (d, text.intermediate_size),
        "down_proj": (text.intermediate_size, d),
    }


def text_step_flops(
    text: TextConfig, lengths: np.ndarray, adapter: lora.AdapterConfig | None, *, train: bool = True
) -> float:
    """Model FLOPs of the text decoder on rows of `lengths` real tokens, pooled at the last.

    train=False: the forward alone; True: forward and backward (see the module docstring).
    """
    lengths = np.asarray(lengths, np.float64)
    tokens, rows = float(lengths.sum()), float(len(lengths))
    layers = text.num_layers
    # Tokens each projection sees: every token in N - 1 layers, and in the last layer every
    # token for k and v but only the pooled one for q, o and the MLP.
    seen = {
        name: (layers - 1) * tokens + (tokens if name in ("k_proj", "v_proj") else rows)
        for name in _projections(text)
    }
    dense = adapter_macs = 0.0
    for name, (fan_in, fan_out) in _projections(text).items():
        dense += seen[name] * fan_in * fan_out
        if adapter is not None and name in adapter.targets:
            adapter_macs += seen[name] * adapter.r * (fan_in + fan_out)
            if train and adapter.kind == "dora" and adapter.dropout > 0:
                dense += seen[name] * fan_in * fan_out  # drop(x) @ W
    # Causal pairs: l (l + 1) / 2 per row in N - 1 layers, l for the pooled query of the last.
    pairs = (layers - 1) * float(np.sum(lengths * (lengths + 1) / 2)) + tokens
    attention = 2.0 * text.num_heads * text.head_dim * pairs
    if not train:
        return 2.0 * (dense + adapter_macs + attention)
    # Forward + activation gradients (attention's twice) + the trainable weights' gradients.
    weight_grads = adapter_macs if adapter is not None else dense
    return 2.0 * (2 * dense + 2 * adapter_macs + 3 * attention + weight_grads)


def vision_forward_flops(
    vision: VisionConfig, image_patches: np.ndarray, window_patches: np.ndarray | None = None
) -> float:
    """Forward FLOPs of the tower over images of `image_patches` patches each.

    window_patches: patches of each attention window (Qwen2.5-VL's windowed blocks).
    """
    p = np.asarray(image_patches, np.float64)
    width, patches = vision.embed_dim, float(p.sum())
    merged = vision.embed_dim * vision.spatial_merge_size**2
    mlp_products = 3 if vision.is_qwen2_5 else 2
    per_patch = 4 * width * width + mlp_products * width * vision.mlp_width  # qkv, proj, MLP
    full = sum(vision.full_attention_blocks)
    pairs = full * float(np.sum(p * p))
    if vision.depth - full:
        windows = p if window_patches is None else np.asarray(window_patches, np.float64)
        pairs += (vision.depth - full) * float(np.sum(windows * windows))
    macs = (
        patches * vision.patch_dim * width
        + vision.depth * patches * per_patch
        + 2 * width * pairs
        + patches / vision.spatial_merge_size**2 * merged * (merged + vision.hidden_size)
    )
    return 2.0 * macs


def _segment_sizes(ids: np.ndarray) -> np.ndarray:
    """Sizes of the non-zero segments of each row of int ids [B, P]."""
    sizes = []
    for row in np.asarray(ids):
        _, counts = np.unique(row[row > 0], return_counts=True)
        sizes.extend(counts.tolist())
    return np.asarray(sizes, np.int64)


def side_flops(
    config: Qwen2VLConfig,
    batch: Mapping[str, np.ndarray],
    adapter: lora.AdapterConfig | None,
    *,
    train: bool = True,
) -> float:
    """Model FLOPs of one side of a batch (host arrays): text (each example of a packed row
    on its own), and each image's tower forward."""
    if "segment_ids" in batch:
        lengths = _segment_sizes(batch["segment_ids"])
    else:
        lengths = np.asarray(batch["attention_mask"]).sum(axis=-1)
    total = text_step_flops(config.text, lengths, adapter, train=train)
    segments = batch.get("vision_segment_ids")
    if segments is not None and np.asarray(segments).size:
        windows = batch.get("vision_window_ids")
        total += vision_forward_flops(
            config.vision,
            _segment_sizes(segments),
            None if windows is None else _segment_sizes(windows),
        )
    return total


def train_step_flops(
    config: Qwen2VLConfig, batch: Mapping[str, Any], adapter: lora.AdapterConfig | None
) -> float:
    """Model FLOPs of one train step on a host batch {'query', 'candidate', ...} or, packed,
    {'pool', ...} (the rows this process holds; multiply by the process count for the global
    figure)."""
    pairs = len(np.asarray(batch["ids"]))
    loss = 2.0 * 3 * pairs * pairs * config.text.hidden_size  # sims, then dQ and dC
    sides = ("pool",) if "pool" in batch else ("query", "candidate")
    return sum(side_flops(config, batch[side], adapter) for side in sides) + loss


# ----------------------------------------------------------------------- hardware FLOPs (HLO)

_HEADER = re.compile(r"^(ENTRY )?%([\w.\-]+) \(.*\{$")
_DEFINITION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = ")
_DIMS = re.compile(r"^[a-z][a-z0-9]*\[([\d,]*)\]")
_CALLED = re.compile(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)")
_BRANCHES = re.compile(
    r"(?:branch_computations=\{([^}]*)\}|true_computation=%([\w.\-]+), "
    r"false_computation=%([\w.\-]+))"
)
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CONTRACTING = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")
_GEMM_CONTRACTING = re.compile(r'"lhs_contracting_dimensions":\[([^\]]*)\]')


def _split_instruction(line: str) -> tuple[str, list[int] | None, str, list[str], str] | None:
    """(name, first result dims, opcode, operand names, attributes) of an HLO instruction."""
    match = _DEFINITION.match(line)
    if not match:
        return None
    rest = line[match.end() :]
    if rest.startswith("("):  # tuple result: skip to its closing parenthesis
        depth = 0
        for i, char in enumerate(rest):  # noqa: B007 (i is read after the loop)
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth == 0:
                break
        result, rest = rest[1:i], rest[i + 1 :].lstrip()
    else:
        result, _, rest = rest.partition(" ")
    dims = _DIMS.match(result.strip())
    opcode, _, rest = rest.partition("(")
    depth, end = 1, 0
    for end, char in enumerate(rest):  # noqa: B007 (end is read after the loop)
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            break
    operands = re.findall(r"%([\w.\-]+)", rest[:end])
    shape = None if dims is None else [int(d) for d in dims.group(1).split(",") if d]
    return match.group(1), shape, opcode.strip(), operands, rest[end + 1 :]


def _instruction_flops(
    opcode: str,
    shape: list[int] | None,
    operands: list[str],
    attributes: str,
    shapes: dict[str, list[int] | None],
) -> float:
    """FLOPs of a dot or a cuBLAS/cuDNN custom call (0 for anything else)."""
    if shape is None or not operands:
        return 0.0
    lhs = shapes.get(operands[0])
    if lhs is None:
        return 0.0
    if opcode == "dot":
        found = _CONTRACTING.search(attributes)
    elif opcode == "custom-call" and ("gemm" in attributes or "matmul" in attributes):
        found = _GEMM_CONTRACTING.search(attributes)
    elif opcode == "custom-call" and "fmha" in attributes and len(operands) >= 2:
        # cuDNN attention, q [B, ., ., E] and k: the key length is k's longer middle dim.
        key = shapes.get(operands[1]) or lhs
        factor = 8.0 if "Backward" in attributes else 4.0
        return factor * math.prod(lhs) * max(key[1:-1] or [1])
    else:
        return 0.0
    contracting = [int(d) for d in re.findall(r"\d+", found.group(1))] if found else []
    return 2.0 * math.prod(shape) * math.prod(lhs[d] for d in contracting)


def hlo_flops(hlo_text: str) -> float:
    """Matrix FLOPs of an optimised HLO module (`compiled.as_text()`), per device.

    Counts every dot (and cuBLAS gemm / cuDNN attention custom call) reached from the entry
    computation: while-loop bodies times their known trip count, fusions and calls once per
    use, conditionals at their most expensive branch (an upper bound where a branch is
    skipped at run time, as for text-only chunks of the vision tower).
    """
    computations: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(2)
            computations[current] = []
            entry = current if header.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif current is not None:
            computations[current].append(line)
    cache: dict[str, float] = {}

    def cost(name: str) -> float:
        if name in cache or name not in computations:
            return cache.get(name, 0.0)
        cache[name] = 0.0  # guards against cycles
        shapes: dict[str, list[int] | None] = {}
        total = 0.0
        for line in computations[name]:
            parsed = _split_instruction(line)
            if parsed is None:
                continue
            result, shape, opcode, operands, attributes = parsed
            shapes[result] = shape
            total += _instruction_flops(opcode, shape, operands, attributes, shapes)
            called = sum(cost(c) for c in _CALLED.findall(attributes))
            if opcode == "while":
                trips = _TRIP_COUNT.search(attributes)
                called *= int(trips.group(1)) if trips else 1
            total += called
            branches = _BRANCHES.search(attributes)
            if branches:
                names = (
                    re.findall(r"%([\w.\-]+)", branches.group(1))
                    if branches.group(1)
                    else [branches.group(2), branches.group(3)]
                )
                total += max(cost(b) for b in names)
        cache[name] = total
        return total

    return cost(entry) if entry else 0.0
