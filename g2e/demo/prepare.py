"""The demo's `prepare_demo` stage: a mini-MMEB and a tiny Qwen2-VL trained as a *generator*.

The method starts from a generative MLLM. The demo has none to download, so it makes one: a
tiny Qwen2-VL-architecture model (random init) trained by next-token prediction to answer the
mini-MMEB's questions, name its labels and caption its images — a generator, never trained on
embeddings. It is saved as a Hugging Face checkpoint (config.json, safetensors, tokenizer,
preprocessor config) and every later stage loads it like a downloaded Qwen2-VL.

Layout under <workdir>/prepare_demo/: mini_mmeb/ (train/, eval/, images/, subsets.json) and
model/ (the checkpoint). Each is built under a temporary name and renamed when complete.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from flax import nnx

from g2e import atomic, distributed, layout
from g2e.data import mmeb, prompts
from g2e.data.preprocess import Encoded, Processor
from g2e.demo import mini_mmeb, scenes, tiny
from g2e.models import hf_io
from g2e.models.config import Qwen2VLConfig
from g2e.models.qwen2_vl import Qwen2VL
from g2e.pipeline import Pipeline

GENERATOR_QUESTION = "What does the image show?"
ONE_WORD_IMAGE = "Summarize the image in one word."
ONE_WORD_TEXT = "Describe the text in one word."
YES_NO = "Is there a {} in the image? Answer Yes or No."


@dataclasses.dataclass(frozen=True)
class DemoPaths:
    """Where prepare_demo writes the mini-MMEB (data, images) and the generator checkpoint."""

    data_dir: pathlib.Path
    train_dir: pathlib.Path
    eval_dir: pathlib.Path
    image_root: pathlib.Path
    model_dir: pathlib.Path


def demo_paths(out: pathlib.Path) -> DemoPaths:
    """The demo's folders under `out` (prepare_demo's output folder)."""
    data = out / "mini_mmeb"
    return DemoPaths(data, data / "train", data / "eval", data, out / "model")


def run(pipeline: Pipeline) -> dict[str, Any]:
    """The `prepare_demo` stage: builds what `point_at_demo` pointed the config at."""
    # The primary alone writes (the processes share the workdir, and prepare replaces
    # directories); the others wait, then read its files.
    summary = {}
    if distributed.is_primary():
        summary = prepare(pipeline.config, pipeline.workdir / "prepare_demo")
    distributed.barrier("prepare_demo")
    return summary


def point_at_demo(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """Points model_dir and the data keys at what prepare_demo writes under `workdir`.

    g2e.main calls it before validating the config, so the demo's config is checked as it
    will run; the folders need not exist yet (prepare_demo builds them first).
    """
    paths = demo_paths(layout.stage_dir(workdir, layout.PREPARE_DEMO))
    config.model_dir = str(paths.model_dir)
    config.data.train_dir = str(paths.train_dir)
    config.data.train_image_root = str(paths.image_root)
    config.data.eval_dir = str(paths.eval_dir)
    config.data.eval_image_root = str(paths.image_root)


def _one_word(text: str) -> str | None:
    """The first shape named in a mini-MMEB caption, its one-word summary (None if none)."""
    words = [w.strip(".,") for w in text.lower().split()]
    return next((w for w in words if w in scenes.SHAPES), None)


@dataclasses.dataclass(frozen=True)
class Lesson:
    """One example the generator learns from: a chat turn and the answer it must produce.

    `user` may hold `<|image_1|>` placeholders for `images` (paths or PIL images, in order);
    `suffix` follows it inside the user turn; `system` is the system turn (None: none)."""

    user: str
    images: tuple
    answer: str
    system: str | None = None
    suffix: str = ""


def generator_lessons(
    train_dir: pathlib.Path, image_root: pathlib.Path, *, matching_per_subset: int, seed: int
) -> list[Lesson]:
    """The generator's instruction data: what an instruction-tuned MLLM has learnt to do.

    From the mini-MMEB's training rows: a row whose positive is text teaches the model to
    answer its query with it (labels, answers, captions); a row whose positive is an image
    teaches it to caption that image with the query's caption; every caption also gives a
    one-word summary task, of the image and of the caption text (the first shape named), and a
    yes/no question about the image (is a given shape in it?). And, from freshly drawn rows
    of each training subset (`matching_per_subset`, their own seed: never the rows mining will
    judge), matching questions in the judge's own words: does this candidate answer or match
    this query? The truth is `mini_mmeb.answers`; half the pairs are a row with its own
    positive or another row's that answers it too, half another row's that does not.
    """
    lessons = []
    for subset in mmeb.list_subsets(str(train_dir)):
        for row in mmeb.read_train_subset(str(train_dir), subset, "original", str(image_root)):
            lessons += _row_lessons(row)
        lessons += _matching_lessons(subset, matching_per_subset, seed)
    return lessons


def _row_lessons(row: mmeb.TrainRow) -> list[Lesson]:
    images = lambda image: (image,) if image else ()  # noqa: E731
    lessons = []
    if row.pos_image is None:
        lessons.append(Lesson(row.qry_text, images(row.qry_image), row.pos_text))
        caption, image = row.pos_text, row.qry_image
    elif row.qry_image is None and row.qry_text:
        caption, image = row.qry_text.rsplit(": ", 1)[-1].strip(), row.pos_image
        lessons.append(Lesson(GENERATOR_QUESTION, images(image), caption))
    else:
        return lessons
    word = _one_word(caption)
    if word and len(caption.split()) > 1:
        lessons.append(Lesson(ONE_WORD_IMAGE, images(image), word))
        lessons.append(Lesson(f"{caption}\n{ONE_WORD_TEXT}", (), word))
        # The same one-word summaries asked as a system turn does (an instruction-tuned MLLM
        # follows its system prompt): the hierarchical prompt's words, with or without its
        # query suffix, as queries and candidates see it.
        suffix = row.index % 2 == 0
        lessons.append(
            Lesson(
                "<|image_1|>",
                images(image),
                word,
                system=prompts.SYSTEM_PROMPT,
                suffix=prompts.query_suffix(True) if suffix else "",
            )
        )
        lessons.append(
            Lesson(
                caption,
                (),
                word,
                system=prompts.SYSTEM_PROMPT,
                suffix="" if suffix else prompts.query_suffix(False),
            )
        )
        asked = scenes.SHAPES[(row.index + len(caption)) % len(scenes.SHAPES)]
        answer = "Yes" if asked in caption.split() or asked + "s" in caption else "No"
        lessons.append(Lesson(YES_NO.format(asked), images(image), answer))
    return lessons


def _matching_lessons(subset: str, count: int, seed: int) -> list[Lesson]:
    """Judge-format yes/no pairs of freshly drawn rows of `subset` (see generator_lessons).

    Per anchor one "Yes" (its own positive, another row's that answers it too, or, for a
    caption, the same objects named in another order) and one "No" (half the time the
    non-answering row sharing the most words with it: the hard negatives mining meets)."""
    rows = [_Drawn(*pair) for pair in mini_mmeb.draw_examples(subset, seed, count)]
    rng = np.random.default_rng([seed, len(subset), 7])
    lessons = []
    for anchor in rows:
        others = [o for o in rows if not mini_mmeb.answers(anchor, o) and o is not anchor]
        pairs = [(*_yes_pair(anchor, rows, rng), "Yes")]
        if others:
            pairs.append((anchor, _no_owner(anchor, others, rng), "No"))
        for query_row, owner, answer in pairs:
            images = tuple(image for image in (query_row.qry_image, owner.pos_image) if image)
            query = prompts.place_images(query_row.qry_text, int(query_row.qry_image is not None))
            candidate = prompts.place_images(owner.pos_text, int(owner.pos_image is not None))
            lessons.append(
                Lesson(
                    f"{prompts.JUDGE_QUERY_LABEL}{query}{prompts.JUDGE_CANDIDATE_LABEL}{candidate}",
                    images,
                    answer,
                    system=prompts.JUDGE_SYSTEM_PROMPT,
                    suffix=prompts.JUDGE_QUESTION,
                )
            )
    return lessons


def _yes_pair(
    anchor: _Drawn, rows: list[_Drawn], rng: np.random.Generator
) -> tuple[_Drawn, _Drawn]:
    """(query row, owner) where the owner's positive answers the query."""
    choices = [(anchor, anchor)]
    choices += [(anchor, o) for o in rows if o is not anchor and mini_mmeb.answers(anchor, o)]
    if anchor.pos_image is None and len(_parts(anchor.pos_text)) > 1:  # a caption, reordered
        choices.append((anchor, dataclasses.replace(anchor, pos_text=_reorder(anchor.pos_text))))
    head, _, caption = anchor.qry_text.rpartition(": ")
    if anchor.qry_image is None and head and len(_parts(caption)) > 1:
        choices.append(
            (dataclasses.replace(anchor, qry_text=f"{head}: {_reorder(caption)}"), anchor)
        )
    return choices[int(rng.integers(len(choices)))]


def _no_owner(anchor: _Drawn, others: list[_Drawn], rng: np.random.Generator) -> _Drawn:
    """A row whose positive does not answer the anchor: random, or the most similar one."""
    if rng.random() < 0.5:
        return others[int(rng.integers(len(others)))]
    words = lambda row: set(f"{row.qry_text.rpartition(': ')[2]} {row.pos_text}".split())  # noqa: E731
    overlap = np.array([len(words(anchor) & words(o)) for o in others])
    best = np.flatnonzero(overlap == overlap.max())
    return others[int(rng.choice(best))]


def _parts(caption: str) -> list[str]:
    return caption.strip().replace(" and ", ", ").split(", ")


def _reorder(caption: str) -> str:
    """The same caption's parts in another order (a caption of one part stays as it is)."""
    parts = _parts(caption)
    parts = parts[1:] + parts[:1]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


@dataclasses.dataclass(frozen=True, eq=False)
class _Drawn:
    """A freshly drawn row (images in memory), as `mini_mmeb.answers` reads rows."""

    qry_text: str
    qry_image: Any
    pos_text: str
    pos_image: Any


def _lm_loss(params: nnx.State, graphdef: nnx.GraphDef, batch: dict[str, jax.Array]):
    """Next-token cross-entropy over the answer tokens (target_mask) of a batch."""
    model = nnx.merge(graphdef, params)
    hidden = model(batch)
    length = batch["input_ids"].shape[1]
    positions = jnp.broadcast_to(jnp.arange(length - 1), (hidden.shape[0], length - 1))
    logits = model.logits_at(hidden, positions).astype(jnp.float32)  # [B, L-1, V]
    targets = batch["input_ids"][:, 1:]
    mask = batch["target_mask"][:, 1:].astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def train_generator(
    model: Qwen2VL,
    processor: Processor,
    lessons: list[Lesson],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> list[float]:
    """Next-token training of `model` in place on the lessons' answers; the losses."""
    encoded: list[Encoded] = []
    for lesson in lessons:
        item = processor.encode_chat(
            lesson.system,
            lesson.user,
            list(lesson.images),
            user_suffix=lesson.suffix,
            answer=lesson.answer,
        )
        if item is not None:
            encoded.append(item)
    if len(encoded) < batch_size:
        raise ValueError(
            f"demo: only {len(encoded)} generator examples for a batch of "
            f"{batch_size}; raise demo.scale"
        )
    graphdef, params = nnx.split(model, nnx.Param)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 20, 1), steps, lr / 20)
    optimizer = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(schedule, 0.9, 0.98, weight_decay=0.01)
    )
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(_lm_loss)(params, graphdef, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    # Examples with and without images are batched apart, so few shapes are compiled.
    groups = [[e for e in encoded if e.num_patches], [e for e in encoded if not e.num_patches]]
    groups = [g for g in groups if len(g) >= batch_size]
    rng = np.random.default_rng(seed)
    losses = []
    bar = tqdm.trange(steps, desc="generator", unit="step", dynamic_ncols=True)
    for index in bar:
        # Three image batches to one text batch: seeing is what the tiny model learns slowest.
        group = groups[0 if len(groups) == 1 or index % 4 else 1]
        chosen = rng.choice(len(group), batch_size, replace=False)
        batch = processor.collate([group[i] for i in chosen])
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(float(loss))
        if index % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    nnx.update(model, params)
    return losses


def prepare(config: ml_collections.ConfigDict, out: pathlib.Path) -> dict[str, Any]:
    """Builds the demo's data and generator checkpoint under `out` (see the module docstring)."""
    demo = config.demo
    paths = demo_paths(out)
    summary: dict[str, Any] = {}
    if not (paths.data_dir / "subsets.json").is_file():

        def build_data(tmp: pathlib.Path) -> None:
            summary["mini_mmeb"] = mini_mmeb.build(
                str(tmp),
                seed=demo.seed,
                train_rows=max(16, round(demo.train_rows * demo.scale)),
                eval_queries=max(4, round(demo.eval_queries * demo.scale)),
                candidates=12,
            )

        atomic.replace_directory(paths.data_dir, build_data)
        logging.info("demo: mini-MMEB in %s (%s)", paths.data_dir, summary["mini_mmeb"])
    if not (paths.model_dir / "config.json").is_file():
        start = time.time()
        summary["generator"] = {}
        atomic.replace_directory(
            paths.model_dir,
            lambda tmp: summary["generator"].update(build_generator(config, paths, tmp)),
        )
        summary["generator"]["seconds"] = round(time.time() - start, 1)
        logging.info("demo: generator checkpoint in %s (%s)", paths.model_dir, summary["generator"])
    return summary


def build_generator(
    config: ml_collections.ConfigDict, paths: DemoPaths, out: pathlib.Path
) -> dict[str, Any]:
    """Writes the tiny generator checkpoint, trained on the mini-MMEB, into `out`."""
    demo = config.demo
    lessons = generator_lessons(
        paths.train_dir, paths.image_root, matching_per_subset=demo.matching_lessons, seed=demo.seed
    )
    texts = [text for lesson in lessons for text in (lesson.user, lesson.answer)]
    tiny.write_assets(
        out,
        texts=texts,
        vocab_size=demo.vocab_size,
        hidden_size=demo.hidden_size,
        intermediate_size=2 * demo.hidden_size,
        layers=demo.num_layers,
        heads=demo.heads,
        kv_heads=demo.kv_heads,
        vision_width=demo.vision_width,
        vision_heads=demo.heads,
        vision_layers=demo.num_layers,
        tie_word_embeddings=True,
    )
    model = Qwen2VL(
        Qwen2VLConfig.from_dir(out),
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs=nnx.Rngs(demo.seed),
    )
    processor = Processor.from_dir(
        out,
        max_length=config.data.train_max_length,
        image_resolution="processor",
        length_buckets=tuple(config.data.length_buckets),
        patch_buckets=tuple(config.data.patch_buckets),
    )
    losses = train_generator(
        model,
        processor,
        lessons,
        steps=demo.generator_steps,
        lr=demo.generator_lr,
        batch_size=demo.generator_batch_size,
        seed=demo.seed,
    )
    hf_io.save_hf(model, out, dtype=np.float32)
    return {
        "lessons": len(lessons),
        "steps": demo.generator_steps,
        "first_loss": round(float(np.mean(losses[:10])), 4),
        "last_loss": round(float(np.mean(losses[-10:])), 4),
    }
