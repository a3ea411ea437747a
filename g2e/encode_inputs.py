"""What `Embedder.encode` takes, turned into `EmbedItem`s (sentence-transformers' conventions).

One input is any of:
- a `str`: a text (always a text, never read as a file name);
- an image: a PIL image, encoded image bytes, or a `pathlib.Path` to an image file;
- a `(text, image)` pair (either may be None);
- a dict with the keys of an embed command line, `{"text", "image", "video", "role"}`, all
  optional: `image` a path string, PIL image or bytes; `video` a list of frames; `role`
  'query' or 'candidate' overrides the call's role for that input.

A single input gives one item and `single=True` (encode returns a 1-D vector); a list (or any
other sequence that is not itself one input) gives one item per element.

Roles follow sentence-transformers' prompt names: `prompt_name='query'` is g2e's query role
(the one-word suffix, docs/method.md §1); 'document', 'passage', 'corpus' and 'candidate' are
the candidate role. `prompt`, as in sentence-transformers, is text put before each input's
text (a task instruction such as MMEB's).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from PIL import Image

from g2e.data import prompts
from g2e.data.preprocess import EmbedItem

# sentence-transformers' prompt names (and g2e's own roles) -> g2e's role.
PROMPT_NAMES = {
    "query": "query",
    "candidate": "candidate",
    "document": "candidate",
    "passage": "candidate",
    "corpus": "candidate",
}
DICT_KEYS = ("text", "image", "video", "role")
_IMAGE_TYPES = (Image.Image, bytes, pathlib.PurePath)


def call_role(role: str | None, prompt_name: str | None) -> str:
    """The role of a call: `role` ('query' / 'candidate'), or the one `prompt_name` maps to
    (PROMPT_NAMES), or 'query' when neither is given.

    Raises:
      ValueError: an unknown role or prompt name, or the two disagree.
    """
    if prompt_name is not None and prompt_name not in PROMPT_NAMES:
        raise ValueError(
            f"Embedder.encode: prompt_name {prompt_name!r} is not one of "
            f"{sorted(PROMPT_NAMES)}; g2e's prompts are the query and candidate roles"
        )
    if role is not None and role not in prompts.ROLES:
        raise ValueError(f"Embedder.encode: role {role!r} is not one of {prompts.ROLES}")
    named = PROMPT_NAMES.get(prompt_name) if prompt_name is not None else None
    if role is not None and named is not None and role != named:
        raise ValueError(
            f"Embedder.encode: role={role!r} and prompt_name={prompt_name!r} disagree; give one"
        )
    return role or named or "query"


def is_single(inputs: Any) -> bool:
    """Whether `inputs` is one input (not a list of them)."""
    return isinstance(inputs, (str, dict, tuple, *_IMAGE_TYPES))


def to_items(
    inputs: Any, *, role: str, prompt: str | None = None, subset: str = ""
) -> tuple[list[EmbedItem], bool]:
    """(one EmbedItem per input, whether `inputs` was a single input).

    Raises:
      ValueError / TypeError: an input of no known form (names its index and what to give).
      NotImplementedError: a `video` where this build's EmbedItem has no video field.
    """
    single = is_single(inputs)
    try:
        listed = [inputs] if single else list(inputs)
    except TypeError:
        raise TypeError(
            f"Embedder.encode: cannot encode a {type(inputs).__name__}; give one input or a list"
        ) from None
    items = [
        _item(value, index, role=role, prompt=prompt, subset=subset)
        for index, value in enumerate(listed)
    ]
    return items, single


def _item(value: Any, index: int, *, role: str, prompt: str | None, subset: str) -> EmbedItem:
    fields = _fields(value, index)
    text = fields.get("text") or ""
    if not isinstance(text, str):
        raise TypeError(f"Embedder.encode: input {index}: 'text' must be a str, got {text!r}")
    if prompt:
        text = prompt + text
    image = fields.get("image")
    if isinstance(image, pathlib.PurePath):
        image = str(image)
    item_role = fields.get("role") or role
    if item_role not in prompts.ROLES:
        raise ValueError(
            f"Embedder.encode: input {index}: role {item_role!r}; use 'query' or 'candidate'"
        )
    extra = {}
    if fields.get("video") is not None:
        if "video" not in {field.name for field in dataclasses.fields(EmbedItem)}:
            raise NotImplementedError(
                f"Embedder.encode: input {index} has a 'video', but this g2e's EmbedItem "
                "(g2e/data/preprocess.py) has no video field yet; embed its frames as images"
            )
        extra["video"] = fields["video"]
    return EmbedItem(text, image, item_role, subset, row=index, **extra)


def _fields(value: Any, index: int) -> dict[str, Any]:
    """One input as a dict of DICT_KEYS."""
    if isinstance(value, str):
        return {"text": value}
    if isinstance(value, _IMAGE_TYPES):
        return {"image": value}
    if isinstance(value, tuple):
        if len(value) != 2:
            raise ValueError(
                f"Embedder.encode: input {index} is a tuple of {len(value)}; a pair is "
                "(text, image)"
            )
        return {"text": value[0], "image": value[1]}
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(DICT_KEYS))
        if unknown:
            raise ValueError(
                f"Embedder.encode: input {index} has unknown keys {unknown}; use {DICT_KEYS}"
            )
        return value
    raise TypeError(
        f"Embedder.encode: input {index} is a {type(value).__name__}; give a str (text), a "
        "PIL image, image bytes or a pathlib.Path (image), a (text, image) pair, or a dict "
        f"with keys {DICT_KEYS}"
    )
