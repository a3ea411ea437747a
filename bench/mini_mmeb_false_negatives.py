"""How many of the pairs SaHa's judge is asked about are true false negatives, on the mini-MMEB.

  python bench/mini_mmeb_false_negatives.py [--seed 0] [--rows 200] [--judge truth|never]
      [--noise 0.5] [--answer_weight 1.0] [--pairs_per_call 16]

Draws the training rows of the demo's mini-MMEB (configs/demo.py: demo.train_rows x
demo.scale rows per training subset, exactly the rows `mini_mmeb.build` writes for demo.seed),
embeds them with a stand-in embedder and runs SaHa mining (g2e.mining.mine_clusters with the
demo's mine.top_k and mine.pool_mult) with a judge that records every pair it is asked about.
Prints, per training subset, the pairs judged and the share that `mini_mmeb.answers` calls
true (a distinct positive that answers the anchor's query too), twice: `walk_*` for the pairs
the walk judges (the sequential judge: what the clusters rest on), `asked_*` for the pairs the
mine stage's batched, speculative judge is asked (mine.judge_batch_size pairs per call),
guesses included: the pairs the demo's judge_quality stage counts (the judge's cache), whose
true share is the base rate it measures the real judge's precision against.

The stand-in is good but imperfect, as an embedder that sees the scenes would be: an item is a
bag of words (one random unit vector per word) plus Gaussian noise (`--noise`). A text's words
are its meaning (`wording.canonical`: a label, or each caption group's colour, shape and
colour-shape pair), so paraphrases embed alike, or else its words (a question); an image's
words are each object's colour, shape, colour-shape pair and cell, so siblings are near; a
query whose positive is a text adds `--answer_weight` times that positive's vector (an
embedder that answers what it is asked). The judge answers with the truth (`--judge truth`:
dropped owners make the walk ask for more) or says no to every pair (`--judge never`).
"""

import argparse
import json
import types
import zlib

import numpy as np

from g2e import mining
from g2e.demo import mini_mmeb, scenes, wording

DIM = 64


def _word_vector(word: str) -> np.ndarray:
    vector = np.random.default_rng(zlib.crc32(word.encode())).normal(size=DIM)
    return vector / np.linalg.norm(vector)


def image_words(objects) -> list[str]:
    """The words of a scene: each object's colour, shape, colour-shape pair and where it is."""
    return [
        w
        for o in objects
        for w in (o.color, o.shape, f"{o.color} {o.shape}", f"{o.color} {o.shape} @{o.cell}")
    ]


def text_words(text: str) -> list[str]:
    """The words of a text's meaning: a label; each caption group's colour, shape and pair;
    else its words, shapes in the singular (a question, a grounding label)."""
    meaning = wording.canonical(text)
    if isinstance(meaning, frozenset):
        return [w for _, color, shape in meaning for w in (color, shape, f"{color} {shape}")]
    if meaning != text.strip():
        return [meaning]
    singular = {scenes.plural(s, 2): s for s in scenes.SHAPES}
    words = text.lower().replace("?", " ").replace(":", " ").split()
    return [singular.get(w, w) for w in words]


def _unit(words: list[str]) -> np.ndarray:
    vector = sum((_word_vector(w) for w in words), np.zeros(DIM))
    return vector / max(np.linalg.norm(vector), 1e-6)


def _noisy(signal: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    vector = signal / np.linalg.norm(signal) + rng.normal(size=DIM) * noise / np.sqrt(DIM)
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def stand_in_embeddings(
    examples, rng: np.random.Generator, noise: float = 0.5, answer_weight: float = 1.0
):
    """(query embeddings, positive embeddings), float32 [N, DIM], of drawn mini-MMEB rows
    (see the module docstring): a query is its image's and its question's words, plus
    `answer_weight` times a text positive's (an embedder that answers what it is asked)."""
    queries, positives = [], []
    for ex in examples:
        if ex.pos_image is None:
            positive = _unit(text_words(ex.pos_text))
        else:
            positive = _unit(image_words(ex.pos_shows))
        query = _unit(image_words(ex.qry_shows) + text_words(ex.question))
        if ex.pos_image is None:
            query = query + answer_weight * positive
        queries.append(_noisy(query, rng, noise))
        positives.append(_noisy(positive, rng, noise))
    return np.stack(queries), np.stack(positives)


def as_rows(name: str, examples) -> list[types.SimpleNamespace]:
    """The rows as the mine stage reads them (texts; images stand for their files)."""
    instruction = mini_mmeb.SUBSETS[name][2][0]
    return [
        types.SimpleNamespace(
            qry_text=mini_mmeb.query_text(instruction, ex),
            qry_image=ex.qry_image,
            pos_text=ex.pos_text,
            pos_image=ex.pos_image,
        )
        for ex in examples
    ]


class RecordingJudge:
    """A judge over drawn rows that answers every pair with the truth (`mini_mmeb.answers`),
    or "no" to all, and records each pair it is asked about, keyed as the judge's cache keys
    it (anchor query, owner positive). Called as the sequential judge (`sequential`, one
    anchor's round at a time: exactly the pairs the walk consults) or as the mine stage's
    batched, speculative one (mining.PairJudge: also pairs it guesses the walk will need)."""

    def __init__(self, rows, query_keys, positive_keys, pairs_per_call: int, says_truth: bool):
        self.rows, self.query_keys, self.positive_keys = rows, query_keys, positive_keys
        self.pairs_per_call, self.says_truth = pairs_per_call, says_truth
        self.asked: dict[tuple, bool] = {}

    def _answer(self, anchor_rows, owner_rows) -> np.ndarray:
        truth = []
        for anchor, owner in zip(anchor_rows, owner_rows):
            truth.append(mini_mmeb.answers(self.rows[anchor], self.rows[owner]))
            self.asked[(self.query_keys[anchor], self.positive_keys[owner])] = truth[-1]
        return np.asarray(truth, np.float64) if self.says_truth else np.zeros(len(truth))

    def sequential(self, anchor_row: int, owner_rows: np.ndarray) -> np.ndarray:
        return self._answer([anchor_row] * owner_rows.size, owner_rows.tolist())

    def __call__(self, anchor_rows: np.ndarray, owner_rows: np.ndarray) -> mining.PairAnswers:
        p_yes = self._answer(anchor_rows.tolist(), owner_rows.tolist())
        calls = -(-p_yes.size // self.pairs_per_call)
        return mining.PairAnswers(p_yes, np.full(p_yes.size, mining.JUDGED), p_yes.size, calls)

    def figures(self, prefix: str) -> dict:
        pairs, true = len(self.asked), sum(self.asked.values())
        share = round(100.0 * true / pairs, 1) if pairs else None
        return {f"{prefix}_pairs": pairs, f"{prefix}_true": true, f"{prefix}_share": share}


def judged_pairs(
    name: str,
    examples,
    *,
    top_k: int,
    pool_mult: int,
    pairs_per_call: int,
    judge: str = "truth",
    noise: float = 0.5,
    answer_weight: float = 1.0,
    seed: int = 0,
) -> dict:
    """Runs SaHa mining over one subset's drawn training rows, with the sequential and with
    the batched RecordingJudge; returns the rows, the pairs the walk judged (`walk_*`: how
    many, how many true, the true share in %), the pairs the batched judge was asked
    (`asked_*`: what the demo's judge_quality counts), clusters and the retrieval's hit@1."""
    rows = as_rows(name, examples)
    image_key = lambda image: None if image is None else id(image)  # noqa: E731 (one file each)
    query_keys = [(r.qry_text, image_key(r.qry_image)) for r in rows]
    positive_keys = [(r.pos_text, image_key(r.pos_image)) for r in rows]
    query_embeddings, positive_embeddings = stand_in_embeddings(
        examples, np.random.default_rng([seed, 99]), noise, answer_weight
    )
    figures = {"rows": len(rows)}
    for prefix in ("walk", "asked"):
        recorder = RecordingJudge(rows, query_keys, positive_keys, pairs_per_call, judge == "truth")
        result = mining.mine_clusters(
            query_keys,
            positive_keys,
            query_embeddings,
            positive_embeddings,
            top_k=top_k,
            pool_mult=pool_mult,
            keep_retrieval_order=mini_mmeb.SUBSETS[name][0] == "classification",
            judge=recorder.sequential if prefix == "walk" else None,
            pair_judge=recorder if prefix == "asked" else None,
            subset=name,
        )
        figures.update(recorder.figures(prefix))
    # Both judges give the same clusters (the speculative walk commits only on answers).
    figures["clusters"] = len(result.clusters)
    figures["hit@1"] = round(result.report["retrieval"]["hit@1"], 2)
    return figures


def main() -> None:
    from configs import demo as demo_config  # the demo's sizes; the test imports only the rest

    config = demo_config.get_config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=config.demo.seed)
    parser.add_argument(
        "--rows", type=int, default=max(16, round(config.demo.train_rows * config.demo.scale))
    )
    parser.add_argument("--judge", choices=("truth", "never"), default="truth")
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument(
        "--pairs_per_call",
        type=int,
        default=config.mine.judge_batch_size,
        help="the judge's pairs per device call (the demo's: mine.judge_batch_size on 1 device)",
    )
    parser.add_argument("--answer_weight", type=float, default=1.0)
    args = parser.parse_args()
    figures = {}
    for name, (_, group, _) in mini_mmeb.SUBSETS.items():
        if group != "IND":
            continue
        rng = mini_mmeb.subset_rng(args.seed, name, mini_mmeb.TRAIN_PART)
        examples = mini_mmeb.draw_rows(name, rng, args.rows, train=True)
        figures[name] = judged_pairs(
            name,
            examples,
            top_k=config.mine.top_k,
            pool_mult=config.mine.pool_mult,
            pairs_per_call=args.pairs_per_call,
            judge=args.judge,
            noise=args.noise,
            answer_weight=args.answer_weight,
            seed=args.seed,
        )
        print(f"{name:18s} {json.dumps(figures[name])}", flush=True)
    print(json.dumps({"args": vars(args), "subsets": figures}))


if __name__ == "__main__":
    main()
