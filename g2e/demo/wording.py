"""Words of the mini-MMEB: the canonical form of an answer, and other words that say the same.

Evaluation rows say every label and caption in its canonical words (a label of the vocabulary,
a caption as `scenes.caption` writes it), so no evaluation query has two right candidates.
Training rows may say it otherwise, as real training data does: a label paraphrased
(`red` / `red colour` / `a red one`, `two` / `2` / `two of them`), a caption with its parts in
another order or other articles (`a red circle and two blue stars` / `2 blue stars and one
red circle`). Such a positive is a different candidate that answers the same queries: the
false negatives SaHa's judge is there to catch. `canonical` maps all of them to one meaning,
so the truth (`mini_mmeb.answers`) follows the meaning, not the words.
"""

from collections.abc import Hashable

import numpy as np

from g2e.demo import scenes

# The forms of a label, per vocabulary; the first is the canonical one.
LABEL_FORMS = {
    "shape": ("{word}", "a {word}", "{word} shape"),
    "color": ("{word}", "{word} colour", "a {word} one"),
    "number": ("{word}", "{digit}", "{word} of them"),
}
VOCABULARIES = {
    "shape": scenes.SHAPES,
    "color": tuple(scenes.COLORS),
    "number": scenes.NUMBERS,
}


def label_forms(label: str) -> tuple[str, ...]:
    """Every form of `label` (a shape, colour or number word), the canonical first; a label
    of no vocabulary (a position) has only itself."""
    for kind, vocabulary in VOCABULARIES.items():
        if label in vocabulary:
            digit = str(vocabulary.index(label) + 1)
            return tuple(form.format(word=label, digit=digit) for form in LABEL_FORMS[kind])
    return (label,)


_LABEL_OF = {
    form: label for v in VOCABULARIES.values() for label in v for form in label_forms(label)
}
_COUNT_WORDS = {"a": 1, "an": 1, **{w: i + 1 for i, w in enumerate(scenes.NUMBERS)}}
_COUNT_WORDS.update({str(i + 1): i + 1 for i in range(len(scenes.NUMBERS))})
_SHAPE_OF = {scenes.plural(s, n): s for s in scenes.SHAPES for n in (1, 2)}


def paraphrase(label: str, rng: np.random.Generator, share: float) -> str:
    """`label` in another form with probability `share` (each form alike), else itself."""
    forms = label_forms(label)
    if len(forms) == 1 or rng.random() >= share:
        return label
    return scenes.pick(rng, forms[1:])


def canonical(text: str) -> Hashable:
    """What `text` means, whatever its words: a label form -> its label ('a red one' -> 'red');
    a caption -> the frozenset of its (count, colour, shape) groups, in any order and with any
    article or count form ('2 blue stars and a red circle' -> {(2, 'blue', 'star'), (1, 'red',
    'circle')}); anything else -> the text, stripped."""
    text = text.strip()
    if text in _LABEL_OF:
        return _LABEL_OF[text]
    groups = []
    for part in _parts(text):
        words = part.split()
        if len(words) != 3 or words[0] not in _COUNT_WORDS or words[2] not in _SHAPE_OF:
            return text
        if words[1] not in scenes.COLORS:
            return text
        groups.append((_COUNT_WORDS[words[0]], words[1], _SHAPE_OF[words[2]]))
    return frozenset(groups)


def _parts(caption: str) -> list[str]:
    return [part.strip() for part in caption.replace(" and ", ", ").split(", ")]


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def reworded(caption: str, rng: np.random.Generator) -> str:
    """The caption's groups in other words: parts in another order (when it has several)
    and, at random or when the order cannot change, other articles or count forms ('a' <->
    'one', 'two' <-> '2'). The result always differs from `caption`."""
    parts = _parts(caption)
    if len(parts) > 1:
        shift = int(rng.integers(1, len(parts)))
        parts = parts[shift:] + parts[:shift]
    if len(parts) == 1 or rng.random() < 0.5:
        parts = [_other_count_word(part) for part in parts]
    return _join(parts)


def _other_count_word(part: str) -> str:
    count, rest = part.split(" ", 1)
    if count in ("a", "an"):
        return f"one {rest}"
    if count == "one":
        return f"{'an' if rest[0] in 'aeiou' else 'a'} {rest}"
    if count.isdigit():
        return f"{scenes.NUMBERS[int(count) - 1]} {rest}"
    return f"{scenes.NUMBERS.index(count) + 1} {rest}"
