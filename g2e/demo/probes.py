"""Probes of the demo generator: does it see? (g2e.demo.pretrain's gate, and its test.)

On fresh draws of their own seed stream: greedy answers to "what colour", "what shape" (of a
large centred object) and "how many", exact-match scored; the judge's balanced accuracy
(Yes-vs-No logits at the end of g2e.data.prompts' judge prompt) on fresh matching pairs; and
the mean cosine between hierarchical-prompt embeddings (docs/method.md §1: last token's
hidden state, L2-normalised) of ColorCls queries whose colours differ, which collapses to about
1 in a generator that does not see.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from g2e.data import prompts
from g2e.data.batching import Encoded
from g2e.data.preprocess import EmbedItem, Processor
from g2e.demo import lessons, mini_mmeb
from g2e.models.qwen2_vl import Qwen2VL

# The probes a written asset must pass (the full preset); the cosine is an upper bound.
GATES = {"colour": 0.95, "shape": 0.75, "count": 0.70, "judge_balanced": 0.80}
MAX_COLOUR_COSINE = 0.9
PROBE_BATCH = 32


class Programs:
    """The probes' jitted programs for one model, each compiled once (batches of a fixed
    shape: PROBE_BATCH rows, the largest length and patch buckets)."""

    def __init__(self, model: Qwen2VL, processor: Processor):
        self.processor = processor
        graphdef, self.state = nnx.split(model)
        yes, no = processor.judge_token_ids()

        def last_logits(state, batch):
            model = nnx.merge(graphdef, state)
            return model.logits_at(model(batch), batch["last_index"])

        self.next_tokens = jax.jit(lambda s, b: jnp.argmax(last_logits(s, b), axis=-1))
        self.yes_margin = jax.jit(lambda s, b: (lambda x: x[:, yes] - x[:, no])(last_logits(s, b)))
        self.embed = jax.jit(lambda s, b: nnx.merge(graphdef, s).embed(b))

    def run(self, program, items: Sequence[Encoded]) -> np.ndarray:
        """`program` over `items`, PROBE_BATCH at a time; its outputs for the items, in order."""
        outputs = []
        for start in range(0, len(items), PROBE_BATCH):
            chunk = items[start : start + PROBE_BATCH]
            batch = self.processor.batcher.collate(
                chunk,
                pad_to_batch=PROBE_BATCH,
                length=self.processor.batcher.length_buckets[-1],
                num_patches=self.processor.batcher.patch_buckets[-1],
            )
            outputs.append(np.asarray(program(self.state, batch))[: len(chunk)])
        return np.concatenate(outputs)


def greedy_answers(programs: Programs, items: Sequence[Encoded], *, max_new: int = 6) -> list[str]:
    """Greedy generation: each prompt's answer up to `<|im_end|>` (or `max_new` tokens)."""
    tokenizer = programs.processor.tokenizer
    end = tokenizer.convert_tokens_to_ids(prompts.IM_END)
    items, produced = list(items), [[] for _ in items]
    for _ in range(max_new):
        open_rows = [i for i, p in enumerate(produced) if not p or p[-1] != end]
        if not open_rows:
            break
        tokens = programs.run(programs.next_tokens, [items[i] for i in open_rows])
        for row, token in zip(open_rows, tokens):
            produced[row].append(int(token))
            ids = np.append(items[row].input_ids, np.int32(token))
            items[row] = dataclasses.replace(items[row], input_ids=ids)
    return [tokenizer.decode(p[: p.index(end)] if end in p else p).strip() for p in produced]


def accuracy(programs: Programs, draw_lesson, rng: np.random.Generator, count: int) -> float:
    """Exact-match accuracy of greedy answers to `count` lessons drawn by `draw_lesson(rng)`."""
    drawn = [draw_lesson(rng) for _ in range(count)]
    items = [lessons.encode(programs.processor, lesson, answer=False) for lesson in drawn]
    answers = greedy_answers(programs, items)
    return float(np.mean([a == lesson.answer for a, lesson in zip(answers, drawn)]))


def judge_balancedaccuracy(programs: Programs, rng, count: int) -> float:
    """Balanced accuracy of Yes-vs-No logits at the judge prompt's end on fresh pairs."""
    drawn = [lessons.matching_lesson(rng) for _ in range(count)]
    items = [lessons.encode(programs.processor, lesson, answer=False) for lesson in drawn]
    said_yes = programs.run(programs.yes_margin, items) > 0
    truth = np.array([lesson.answer == "Yes" for lesson in drawn])
    if truth.all() or not truth.any():
        return float(np.mean(said_yes == truth))
    return float((said_yes[truth].mean() + (~said_yes[~truth]).mean()) / 2)


def colour_embedding_cosine(programs: Programs, seed: int, count: int) -> float:
    """Mean cosine between hierarchical-prompt embeddings (last token, L2-normalised) of fresh
    ColorCls queries whose colours differ."""
    rows = mini_mmeb.draw_examples("ColorCls", seed, count)
    encode = programs.processor.encode
    items = [encode(EmbedItem(q, image, "query", "ColorCls")) for q, image, _, _ in rows]
    vectors = programs.run(programs.embed, items)
    colours = np.array([label for _, _, label, _ in rows])
    differ = colours[:, None] != colours[None, :]
    return float((vectors @ vectors.T)[differ].mean())


def probe(model: Qwen2VL, processor: Processor, seed: int, count: int) -> dict[str, float]:
    """The probe scores on fresh draws of the stream [seed, 99, ...] (see the module doc)."""
    rng = lambda kind: np.random.default_rng([seed, 99, kind])  # noqa: E731
    programs = Programs(model, processor)
    return {
        "colour": accuracy(programs, lessons.colour_lesson, rng(0), count),
        "shape": accuracy(programs, lessons.shape_lesson, rng(1), count),
        "count": accuracy(programs, lessons.count_lesson, rng(2), count),
        "judge_balanced": judge_balancedaccuracy(programs, rng(3), count),
        "colour_cosine": colour_embedding_cosine(programs, seed + 99, count),
    }


def failed_gates(scores: dict[str, float]) -> list[str]:
    """The probes below their gate (and a colour cosine above its bound), as readable lines."""
    failed = [f"{k} {scores[k]:.3f} < {v}" for k, v in GATES.items() if scores[k] < v]
    if scores["colour_cosine"] > MAX_COLOUR_COSINE:
        failed.append(f"colour_cosine {scores['colour_cosine']:.3f} > {MAX_COLOUR_COSINE}")
    return failed
