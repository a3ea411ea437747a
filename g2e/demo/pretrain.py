"""The demo's pre-trained generator: a tiny Qwen2-VL-architecture MLLM that sees, made here.

  python -m g2e.demo.pretrain --out g2e/demo/assets/generator [--preset full|ci]

The method starts from a generative MLLM. The demo has none to download, so the project makes
one and commits it (g2e/demo/assets/generator, package data): a Hugging Face directory with
config.json, float32 safetensors, tokenizer, preprocessor config and MANIFEST.json.

Recipe (docs/method.md §1 needs a generator whose last token summarises its input):
  * the widths of `PRESETS` (today's demo: text 128 x 4 layers, vision 64 x 4, vocab 1024), the
    tokenizer trained on the built-in corpus plus texts of the lessons;
  * random init with a cosine basis in the patch embedding, the vision tower trained alone
    first (g2e.demo.tower), then the merger's output layer scaled so image tokens start at the
    RMS of the token embeddings (unscaled they start about 30x larger and drown the text);
  * next-token loss on the answer tokens only, logits computed only there, the tower below
    the merger left as it is, each phase under its own warmup-cosine schedule;
  * the phases of g2e.demo.lessons in the preset's order, each lesson drawn fresh from the
    seed stream [seed, phase, step] (so a resumed run draws the same batches);
  * the probes (`probe`): greedy answers on fresh images (colour, shape of a large object,
    count), the judge's balanced accuracy on fresh matching pairs, and the mean cosine between
    hierarchical-prompt embeddings of images of different colours. The full preset refuses to
    write the asset unless every probe passes `GATES`; the ci preset (a miniature, under a
    minute) records them without a gate.

The run checkpoints its training state in <out>.state/ every `checkpoint_every` steps and
resumes from it. Same seed and preset, same machine: the same bytes (tests/demo/test_pretrain).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import pathlib
import pickle
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from g2e import atomic
from g2e.data import prompts
from g2e.data.batching import Encoded
from g2e.data.preprocess import Processor
from g2e.demo import lessons, mini_mmeb, probes, scenes, tiny, tower
from g2e.models import hf_io
from g2e.models.config import Qwen2VLConfig
from g2e.models.qwen2_vl import Qwen2VL

ASSET_DIR = pathlib.Path(__file__).parent / "assets" / "generator"
REGENERATE = "python -m g2e.demo.pretrain --out g2e/demo/assets/generator"
# Answer tokens a batch row can hold (a four-object caption is about 20).
ANSWER_WIDTH = 32
LENGTH_BUCKETS = (64, 128, 256)
PATCH_BUCKETS = (0, 64, 128)


@dataclasses.dataclass(frozen=True)
class Preset:
    """Widths and training budget of one pretraining recipe."""

    hidden_size: int
    layers: int
    vision_width: int
    vision_layers: int
    heads: int
    kv_heads: int
    vocab_size: int
    # (phase of g2e.demo.lessons.PHASES, steps), in order.
    phases: tuple[tuple[str, int], ...]
    batch_size: int
    lr: float
    probe_images: int
    gated: bool
    corpus_lessons: int = 600
    checkpoint_every: int = 100
    seed: int = 20
    # Every batch padded to the largest buckets: one compiled program (the ci preset's minute).
    fixed_shape: bool = False
    # (k, span): the first k phases share one schedule spanning `span` steps (phase_schedule).
    shared_schedule: tuple[int, int] = (0, 0)
    # `train_tower` before the next-token phases, which then leave the tower as it is.
    tower_steps: int = 2000
    tower_lr: float = 2e-3


PRESETS = {
    "full": Preset(
        hidden_size=128,
        layers=4,
        vision_width=64,
        vision_layers=4,
        heads=4,
        kv_heads=2,
        vocab_size=1024,
        phases=(
            ("see", 100),
            ("align", 600),
            ("instruct", 700),
            ("checks", 300),
            ("attribute", 300),
            ("judge_classification", 300),
            ("judge", 1200),
        ),
        shared_schedule=(4, 2700),
        batch_size=32,
        lr=2e-3,
        probe_images=200,
        gated=True,
    ),
    "ci": Preset(
        hidden_size=32,
        layers=1,
        vision_width=16,
        vision_layers=1,
        heads=2,
        kv_heads=1,
        vocab_size=400,
        phases=(
            ("see", 4),
            ("align", 4),
            ("instruct", 4),
            ("checks", 2),
            ("attribute", 2),
            ("judge_classification", 2),
            ("judge", 2),
        ),
        shared_schedule=(4, 16),
        batch_size=4,
        lr=2e-3,
        probe_images=8,
        gated=False,
        corpus_lessons=40,
        checkpoint_every=5,
        fixed_shape=True,
        tower_steps=4,
    ),
}


# ---- training ------------------------------------------------------------------------------


def answer_targets(batch: dict[str, np.ndarray], width: int = ANSWER_WIDTH) -> dict:
    """The batch with, per row, the positions whose next token is an answer token, those
    tokens and their weights ([B, width] each; answers past `width` tokens are cut)."""
    is_target = batch["target_mask"][:, 1:] > 0
    positions = np.zeros((len(is_target), width), np.int32)
    weights = np.zeros((len(is_target), width), np.float32)
    for row, mask in enumerate(is_target):
        found = np.flatnonzero(mask)[:width]
        positions[row, : len(found)] = found
        weights[row, : len(found)] = 1.0
    targets = np.take_along_axis(batch["input_ids"], positions + 1, axis=1)
    out = {k: v for k, v in batch.items() if k != "target_mask"}
    return out | {
        "answer_positions": positions,
        "answer_targets": targets,
        "answer_weights": weights,
    }


def lm_loss(params: nnx.State, graphdef: nnx.GraphDef, frozen: nnx.State, batch: dict[str, Any]):
    """Next-token cross-entropy at the answer positions (`answer_targets`) only."""
    model = nnx.merge(graphdef, params, frozen)
    hidden = model(batch)
    logits = model.logits_at(hidden, batch["answer_positions"]).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["answer_targets"])
    weights = batch["answer_weights"]
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


# What next-token training updates: all but the vision tower below the merger, which
# `train_tower` trains beforehand (as a real MLLM starts from a pre-trained vision encoder).
NEXT_TOKEN_TRAINED = nnx.All(
    nnx.Param,
    nnx.Not(nnx.All(nnx.PathContains("visual"), nnx.Not(nnx.PathContains("merger")))),
)


def phase_schedule(
    lr: float, steps: int | Sequence[int], shared: tuple[int, int] = (0, 0)
) -> optax.Schedule:
    """Warmup-cosine schedules (to `lr`, then down to lr/20) over phases of `steps` steps (or
    one phase). `shared` = (k, span): the first k phases share one schedule that spans `span`
    steps and is cut where they end; each later phase has its own (it warms up to `lr` again).
    lessons.CHECKS says why the first phases share one."""
    phases = [steps] if isinstance(steps, int) else list(steps)
    count, span = shared
    blocks = [(sum(phases[:count]), span)] if count else []
    blocks += [(n, n) for n in phases[count:]]
    schedules = [
        optax.warmup_cosine_decay_schedule(0.0, lr, max(n // 20, 1), n, lr / 20) for _, n in blocks
    ]
    return optax.join_schedules(schedules, [int(b) for b in np.cumsum([n for n, _ in blocks])[:-1]])


def make_optimizer(
    lr: float, steps: int | Sequence[int], shared: tuple[int, int] = (0, 0)
) -> optax.GradientTransformation:
    """AdamW under `phase_schedule(lr, steps, shared)`, gradients clipped to norm 1."""
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(phase_schedule(lr, steps, shared), 0.9, 0.98, weight_decay=0.01),
    )


def train(
    model: Qwen2VL,
    processor: Processor,
    draw_batch: Callable[[int], Sequence[Encoded]],
    *,
    steps: int | Sequence[int],
    lr: float,
    state_file: pathlib.Path | None = None,
    checkpoint_every: int = 0,
    shape: tuple[int, int] | None = None,
    name: str = "generator",
    trained: Any = nnx.Param,
    shared: tuple[int, int] = (0, 0),
) -> list[float]:
    """Next-token training of `model` in place; returns the loss of every step.

    `draw_batch(step)` gives the step's encodings (a pure function of the step, so a run
    resumed from `state_file` draws what the interrupted one would have). `steps`: the steps
    of each phase (their schedules: `phase_schedule`, with `shared`), or of the one phase. `shape`: every
    batch padded to this (length, patches), else to the smallest buckets that fit it.
    `trained`: an nnx filter of the parameters it updates (the others stay as they are)."""
    length, num_patches = shape or (None, None)
    graphdef, params, frozen = nnx.split(model, trained, ...)
    optimizer = make_optimizer(lr, steps, shared)
    steps = steps if isinstance(steps, int) else sum(steps)
    opt_state, start, losses = optimizer.init(params), 0, []
    if state_file is not None and state_file.is_file():
        saved = pickle.loads(state_file.read_bytes())
        params = jax.tree.map(jnp.asarray, saved["params"])
        opt_state = jax.tree.map(jnp.asarray, saved["opt_state"])
        start, losses = saved["step"], saved["losses"]
        logging.info("%s: resumed at step %d from %s", name, start, state_file)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lm_loss)(params, graphdef, frozen, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    began = time.time()
    for index in range(start, steps):
        encoded = draw_batch(index)
        batch = processor.batcher.collate(encoded, length=length, num_patches=num_patches)
        batch = answer_targets(batch)
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(float(loss))
        if index % 25 == 0 or index == steps - 1:
            logging.info(
                "%s step %d/%d loss %.4f (%.2f s/step)",
                name,
                index,
                steps,
                np.mean(losses[-25:]),
                (time.time() - began) / (index - start + 1),
            )
        finished = index == steps - 1 or (checkpoint_every and (index + 1) % checkpoint_every == 0)
        if state_file is not None and finished:
            saved = dict(params=jax.device_get(params), opt_state=jax.device_get(opt_state))
            atomic.write_bytes(
                state_file, pickle.dumps(saved | dict(step=index + 1, losses=losses))
            )
    nnx.update(model, params)
    return losses


def lesson_batches(
    processor: Processor, phase: str, seed: int, batch_size: int
) -> Callable[[int], list[Encoded]]:
    """draw_batch(step) for `train`: `batch_size` fresh lessons of `phase`, seeded by step."""
    phase_index = list(lessons.PHASES).index(phase)

    def draw_batch(step: int) -> list[Encoded]:
        rng = np.random.default_rng([seed, phase_index, step])
        encoded = []
        while len(encoded) < batch_size:
            item = lessons.encode(processor, lessons.draw(phase, rng))
            if item is not None:
                encoded.append(item)
        return encoded

    return draw_batch


def curriculum(processor: Processor, preset: Preset) -> Callable[[int], list[Encoded]]:
    """draw_batch(step) for `train` over the preset's phases in order."""
    phases = [
        (lesson_batches(processor, p, preset.seed, preset.batch_size), n) for p, n in preset.phases
    ]

    def draw_batch(step: int) -> list[Encoded]:
        for draw_phase, steps in phases:
            if step < steps:
                return draw_phase(step)
            step -= steps
        raise IndexError(f"step past the curriculum's {sum(n for _, n in phases)} steps")

    return draw_batch


def _phase_losses(losses: list[float], phases) -> dict[str, dict[str, float]]:
    """Mean loss over the first and last 20 steps of each phase."""
    out, start = {}, 0
    for phase, steps in phases:
        part = losses[start : start + steps]
        out[phase] = {
            "first": round(float(np.mean(part[:20])), 4),
            "last": round(float(np.mean(part[-20:])), 4),
            "steps": steps,
        }
        start += steps
    return out


def scale_merger(model: Qwen2VL, processor: Processor, seed: int) -> float:
    """Scales the merger's output layer so image tokens start at the token embeddings' RMS;
    returns the factor applied."""
    rng = np.random.default_rng([seed, 9])
    items = [lessons.encode(processor, lessons.colour_lesson(rng), answer=False) for _ in range(4)]
    tokens = model.vision_tokens(processor.batcher.collate(items))
    rms = lambda x: float(jnp.sqrt(jnp.mean(jnp.square(x))))  # noqa: E731
    factor = rms(model.language_model.embed_tokens[...]) / rms(tokens)
    fc2 = model.visual.merger.fc2
    fc2.kernel[...] = fc2.kernel[...] * factor
    fc2.bias[...] = fc2.bias[...] * factor
    return factor


# ---- the asset -----------------------------------------------------------------------------


def fingerprint(preset: Preset) -> str:
    """sha256 of everything the generator depends on: scenes, prompt strings, lesson kinds,
    the mini-MMEB's instructions, processor settings, tokenizer corpus and the preset."""
    parts = {
        "scenes": [scenes.SHAPES, scenes.COLORS, scenes.NUMBERS, scenes.POSITIONS],
        "sizes": [scenes.MIN_SIDE, scenes.MAX_SIDE, scenes.SIZE_RANGE, scenes.CENTRE_CELL],
        "prompts": [
            prompts.SYSTEM_PROMPT,
            prompts.QUERY_SUFFIX_WITH_IMAGE,
            prompts.QUERY_SUFFIX_TEXT_ONLY,
            prompts.JUDGE_SYSTEM_PROMPT,
            prompts.JUDGE_QUESTION,
            prompts.JUDGE_QUERY_LABEL,
            prompts.JUDGE_CANDIDATE_LABEL,
        ],
        "lessons": {
            name: {kind.__name__: weight for kind, weight in kinds.items()}
            for name, kinds in lessons.PHASES.items()
        },
        "questions": [
            v for k, v in sorted(vars(lessons).items()) if k.isupper() and isinstance(v, str)
        ],
        "paraphrases": lessons.PARAPHRASES,
        "subsets": mini_mmeb.SUBSETS,
        "processor": tiny.preprocessor_config(),
        "corpus": tiny.BUILTIN_CORPUS,
        "preset": dataclasses.asdict(preset),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


# Preset fields the tower's training does not read.
_NEXT_TOKEN_ONLY = (
    "phases",
    "shared_schedule",
    "lr",
    "probe_images",
    "gated",
    "corpus_lessons",
    "checkpoint_every",
)


def tower_fingerprint(preset: Preset) -> str:
    """sha256 of what `train_tower`'s result depends on (scenes, sizes, processor settings, the
    widths, seed and tower settings), which names its saved state: a run that changes only
    the next-token recipe starts from the tower trained before."""
    parts = {
        "scenes": [scenes.SHAPES, scenes.COLORS, scenes.NUMBERS],
        "sizes": [scenes.MIN_SIDE, scenes.MAX_SIDE, scenes.SIZE_RANGE, lessons.BIG],
        "processor": tiny.preprocessor_config(),
        "preset": {
            k: v for k, v in dataclasses.asdict(preset).items() if k not in _NEXT_TOKEN_ONLY
        },
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def weights_sha256(directory: pathlib.Path) -> str:
    """sha256 over the directory's safetensors files, in name order."""
    digest = hashlib.sha256()
    for path in sorted(directory.glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def check_asset(directory: pathlib.Path = ASSET_DIR, preset: str = "full") -> dict[str, Any]:
    """The asset's MANIFEST.json, after checking its weights' sha256 and its fingerprint.

    Raises:
      ValueError: the weights differ from the manifest's sha256, or the fingerprint is stale
        (something the generator depends on changed since it was made); the message names the
        command that makes it again.
    """
    manifest = json.loads((directory / "MANIFEST.json").read_text())
    remake = f"make it again with `{REGENERATE} --preset {preset}` and commit it"
    if weights_sha256(directory) != manifest["weights_sha256"]:
        raise ValueError(f"{directory}: weights do not match MANIFEST.json's sha256; {remake}")
    if fingerprint(PRESETS[preset]) != manifest["fingerprint"]:
        raise ValueError(
            f"{directory} is stale: scenes, prompts, lessons, processor settings, tokenizer "
            f"corpus or preset changed since it was made (fingerprint differs); {remake}"
        )
    return manifest


def _versions() -> dict[str, str]:
    names = ("jax", "jaxlib", "flax", "optax", "numpy", "pillow", "tokenizers", "transformers")
    return {name: importlib.metadata.version(name) for name in names}


def corpus_texts(preset: Preset) -> list[str]:
    """The tokenizer's texts beyond the built-in corpus: lessons of both phases (own stream)."""
    texts = []
    for phase_index, phase in enumerate(lessons.PHASES):
        rng = np.random.default_rng([preset.seed, 7, phase_index])
        for _ in range(preset.corpus_lessons):
            lesson = lessons.draw(phase, rng)
            texts += [lesson.user + lesson.suffix, lesson.answer]
    return texts + [prompts.SYSTEM_PROMPT, prompts.JUDGE_SYSTEM_PROMPT, prompts.JUDGE_QUESTION]


def processor_for(directory: pathlib.Path) -> Processor:
    """The generator's processor, with the buckets pretraining and the probes use."""
    return Processor.from_dir(
        directory,
        max_length=LENGTH_BUCKETS[-1],
        length_buckets=LENGTH_BUCKETS,
        patch_buckets=PATCH_BUCKETS,
    )


def build(out: pathlib.Path, preset: Preset) -> tuple[Qwen2VL, Processor, dict[str, Any]]:
    """Writes tokenizer, config and preprocessor config to `out`; a model of random weights
    with its merger scaled, and its processor."""
    tiny.write_generator_assets(
        out,
        corpus_texts(preset),
        vocab_size=preset.vocab_size,
        hidden_size=preset.hidden_size,
        layers=preset.layers,
        heads=preset.heads,
        kv_heads=preset.kv_heads,
        vision_width=preset.vision_width,
        vision_layers=preset.vision_layers,
    )
    model = Qwen2VL(Qwen2VLConfig.from_dir(out), rngs=nnx.Rngs(preset.seed))
    processor = processor_for(out)
    cosine_columns = tower.cosine_patch_embedding(model)
    return (
        model,
        processor,
        {
            "merger_scale": scale_merger(model, processor, preset.seed),
            "cosine_patch_columns": cosine_columns,
        },
    )


def pretrained_tower(
    model: Qwen2VL, processor: Processor, preset: Preset, state_file: pathlib.Path
) -> dict[str, Any]:
    """`train_tower` for the preset's tower steps (or its saved result, when `state_file`
    holds one), then the merger scaled again to the token embeddings' RMS. Returns the
    manifest's record: loss over the first and last 20 steps, and the new merger scale."""
    visual = nnx.All(nnx.Param, nnx.PathContains("visual"))
    if state_file.is_file():
        saved = pickle.loads(state_file.read_bytes())
        nnx.update(model, jax.tree.map(jnp.asarray, saved["params"]))
        losses = saved["losses"]
        logging.info("pretrain: the tower trained before, from %s", state_file)
    else:
        losses = tower.train_tower(
            model,
            processor,
            make_optimizer(preset.tower_lr, preset.tower_steps),
            steps=preset.tower_steps,
            seed=preset.seed,
            batch_size=preset.batch_size,
            shape=(LENGTH_BUCKETS[0], PATCH_BUCKETS[-1]),
        )
        params = jax.device_get(nnx.state(model, visual))
        atomic.write_bytes(state_file, pickle.dumps(dict(params=params, losses=losses)))
    return {
        "loss": {"first": float(np.mean(losses[:20])), "last": float(np.mean(losses[-20:]))},
        "steps": len(losses),
        "merger_scale": scale_merger(model, processor, preset.seed),
    }


def pretrain(out: pathlib.Path, preset_name: str) -> dict[str, Any]:
    """Trains, probes and (if the probes pass) writes the generator asset to `out`.

    Raises:
      SystemExit: a gated preset whose probes fail; the scores are in <out>.state/probes.json.
    """
    preset = PRESETS[preset_name]
    state_dir = out.with_name(out.name + ".state")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    began = time.time()
    model, processor, manifest = build(tmp, preset)
    tower_state = state_dir / f"tower-{tower_fingerprint(preset)[:12]}.pkl"
    manifest["tower"] = pretrained_tower(model, processor, preset, tower_state)
    losses = train(
        model,
        processor,
        curriculum(processor, preset),
        steps=[steps for _, steps in preset.phases],
        lr=preset.lr,
        # Named by the fingerprint: a changed recipe never resumes another's state.
        state_file=state_dir / f"train-{fingerprint(preset)[:12]}.pkl",
        checkpoint_every=preset.checkpoint_every,
        shape=(LENGTH_BUCKETS[-1], PATCH_BUCKETS[-1]) if preset.fixed_shape else None,
        name="pretrain",
        trained=NEXT_TOKEN_TRAINED,
        shared=preset.shared_schedule,
    )
    scores = probes.probe(model, processor, preset.seed, preset.probe_images)
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "probes.json").write_text(json.dumps(scores, indent=2) + "\n")
    logging.info("pretrain: probes %s (%.0f s)", scores, time.time() - began)
    failed = probes.failed_gates(scores)
    if preset.gated and failed:
        raise SystemExit(
            f"pretrain: the generator does not see well enough, nothing written to {out}: "
            f"{'; '.join(failed)}. Scores in {state_dir}/probes.json; change the recipe "
            f"(g2e/demo/lessons.py, PRESETS) to train again."
        )
    hf_io.save_hf(model, tmp, dtype=np.float32)
    manifest |= {
        "command": f"{REGENERATE} --preset {preset_name}",
        "preset": preset_name,
        "settings": dataclasses.asdict(preset),
        "seeds": {
            "init": preset.seed,
            "lessons": [preset.seed, "phase", "step"],
            "probes": [preset.seed, 99],
        },
        "versions": _versions(),
        "loss": _phase_losses(losses, preset.phases),
        "probes": {k: round(v, 4) for k, v in scores.items()},
        "gates": {**probes.GATES, "colour_cosine_max": probes.MAX_COLOUR_COSINE},
        "weights_sha256": weights_sha256(tmp),
        "fingerprint": fingerprint(preset),
    }
    (tmp / "MANIFEST.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    shutil.rmtree(state_dir, ignore_errors=True)
    logging.info("pretrain: wrote %s in %.0f s", out, time.time() - began)
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ASSET_DIR), help="the asset directory to write")
    parser.add_argument("--preset", default="full", choices=sorted(PRESETS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    manifest = pretrain(pathlib.Path(args.out), args.preset)
    print(json.dumps({k: manifest[k] for k in ("probes", "loss", "weights_sha256")}, indent=2))


if __name__ == "__main__":
    main()
