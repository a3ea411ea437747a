"""Every prompt string of g2e, and the hierarchical embedding prompt (docs/method.md §1).

A prompt is built as a `ChatPrompt`: `head` (chat template up to the user's own text), `body`
(the data's text, the only part truncation may shorten), `tail` (the query suffix and the chat
template's end, which always survive) and optionally `answer` (assistant text a generator is
trained on). `ChatPrompt.text` is the full string handed to the tokenizer.

Video (g2e's extension, not the paper's; docs/method.md §1): an input with a video gets the
same two-level prompt with the video named where the image is: the system turn
`VIDEO_SYSTEM_PROMPT` and the query suffix `QUERY_SUFFIX_WITH_VIDEO`. Its placeholder is
`<|video_pad|>` (the data may write `<|video_1|>`), expanded to the clip's merged-patch count;
with no placeholder in the text the video goes first, as images do. Inputs without a video keep
the paper's prompt unchanged.

Image placeholders: the data writes `<|image_1|>` (`<|image_2|>`, ...); Qwen2-VL reads
`<|image_pad|>`, which the preprocessor expands to the image's merged-patch count. No
`<|vision_start|>`/`<|vision_end|>` are added. When an input has images but its text has no
placeholder, the images go first, each followed by a newline.
"""

from __future__ import annotations

import dataclasses
import re

from g2e.data.errors import BadInput

# Level 1 (system turn), the same for queries and candidates.
SYSTEM_PROMPT = (
    "Given an image, summarize the provided image in one word. "
    "Given only text, describe the text in one word."
)
# Level 2 suffixes, appended to the user's text of queries (and of Matching candidates).
QUERY_SUFFIX_WITH_IMAGE = "\nRepresent the given text/image in one word."
QUERY_SUFFIX_TEXT_ONLY = "\nRepresent the given text in one word."
# The video clause of both levels (g2e's extension), for inputs that carry a video.
VIDEO_SYSTEM_PROMPT = (
    "Given a video, summarize the provided video in one word. "
    "Given only text, describe the text in one word."
)
QUERY_SUFFIX_WITH_VIDEO = "\nRepresent the given text/video in one word."

VIDEO_PAD = "<|video_pad|>"
_VIDEO_PLACEHOLDER = re.compile(r"<\|video_\d+\|>|<\|video_pad\|>")

IMAGE_PAD = "<|image_pad|>"
# `<|image_1|>`, `<|image_2|>`, ... as MMEB writes them, and Qwen's own pad token.
_PLACEHOLDER = re.compile(r"<\|image_\d+\|>|<\|image_pad\|>")

# Chat template pieces (Qwen2 ChatML).
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ASSISTANT_HEADER = f"{IM_START}assistant\n"

# SugarCrepe: captions are queries with this prefix; images are candidates with text IMAGE_PAD.
SUGARCREPE_CAPTION_PREFIX = "Find me an image that matches the given caption: "
SUGARCREPE_IMAGE_TEXT = IMAGE_PAD

# Generative check of the mining stage: the model answers Yes/No right after the assistant
# header; the stage compares the logits of these two tokens at the last position.
JUDGE_SYSTEM_PROMPT = (
    "You are a careful judge. Decide whether a candidate is a correct match for a query: "
    "the right answer to its question, or the item it asks for or describes."
)
JUDGE_QUESTION = "\nDoes the candidate correctly answer or match the query? Answer Yes or No."
JUDGE_QUERY_LABEL = "Query: "
JUDGE_CANDIDATE_LABEL = "\nCandidate: "
JUDGE_YES = "Yes"
JUDGE_NO = "No"

ROLES = ("query", "candidate")


@dataclasses.dataclass(frozen=True)
class PromptOptions:
    """Ablations of the hierarchical prompt: `system` turn on/off, query `suffix` on/off."""

    system: bool = True
    suffix: bool = True


# No system turn, no suffix: the paper's baseline prompt (the eval_plain and
# train_plain_random stages).
PLAIN = PromptOptions(system=False, suffix=False)


@dataclasses.dataclass(frozen=True)
class ChatPrompt:
    """A chat prompt in parts; see the module docstring."""

    head: str
    body: str
    tail: str
    answer: str = ""

    @property
    def text(self) -> str:
        """The full prompt string."""
        return self.head + self.body + self.tail + self.answer


def count_placeholders(text: str) -> int:
    """Number of image placeholders (`<|image_N|>` or `<|image_pad|>`) in `text`."""
    return len(_PLACEHOLDER.findall(text))


def place_images(text: str, num_images: int) -> str:
    """Turns the data's placeholders into `<|image_pad|>`; puts images first when text has none.

    Raises:
      BadInput: the text has placeholders but not exactly `num_images` of them.
    """
    return _place(text, num_images, _PLACEHOLDER, IMAGE_PAD, "image")


def place_videos(text: str, num_videos: int) -> str:
    """Turns the data's video placeholders into `<|video_pad|>`; puts videos first when the
    text has none.

    Raises:
      BadInput: the text has video placeholders but not exactly `num_videos` of them.
    """
    return _place(text, num_videos, _VIDEO_PLACEHOLDER, VIDEO_PAD, "video")


def _place(text: str, count: int, placeholder: re.Pattern, pad: str, what: str) -> str:
    """`count` inputs of kind `what` placed in `text`: at its `placeholder`s, else first."""
    found = len(placeholder.findall(text))
    if found == 0 and count:
        return "\n".join([pad] * count) + ("\n" + text if text else "")
    if found != count:
        noun = "placeholder(s)" if what == "image" else f"{what} placeholder(s)"
        raise BadInput(
            f"{what} placeholders do not match {what}s",
            detail=f"text has {found} {noun}, the input has {count} {what}(s)",
            hint=f"give the row its {what}, or remove the <|{what}_1|> placeholder from its text",
        )
    return placeholder.sub(pad, text)


def query_suffix(has_image: bool, has_video: bool = False) -> str:
    """The level-2 suffix of a query: depends only on whether the input has a video or an
    image."""
    if has_video:
        return QUERY_SUFFIX_WITH_VIDEO
    return QUERY_SUFFIX_WITH_IMAGE if has_image else QUERY_SUFFIX_TEXT_ONLY


def uses_suffix(role: str, subset: str) -> bool:
    """Queries get the suffix; candidates only in Matching subsets (e.g. RefCOCO-Matching)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return role == "query" or "Matching" in subset


def chat_prompt(
    system: str | None, user: str, *, user_suffix: str = "", answer: str | None = None
) -> ChatPrompt:
    """Wraps a user text in Qwen's chat template.

    `user` is the truncatable body, `user_suffix` follows it inside the user turn and is kept.
    With `answer`, the assistant turn is `answer<|im_end|>` (the tokens a generator learns);
    without it the prompt ends right after `<|im_start|>assistant\\n`.
    """
    head = ""
    if system is not None:
        head += f"{IM_START}system\n{system}{IM_END}\n"
    head += f"{IM_START}user\n"
    tail = f"{user_suffix}{IM_END}\n{ASSISTANT_HEADER}"
    return ChatPrompt(
        head=head, body=user, tail=tail, answer="" if answer is None else answer + IM_END
    )


def embedding_prompt(
    text: str,
    *,
    has_image: bool,
    role: str,
    subset: str = "",
    options: PromptOptions = PromptOptions(),
    has_video: bool = False,
) -> ChatPrompt:
    """The hierarchical embedding prompt of docs/method.md §1 for one query or candidate.

    Args:
      text: the data's text with its task instruction (may hold `<|image_1|>`; may be empty
        when there is an image).
      has_image: whether the input carries an image.
      role: 'query' or 'candidate'.
      subset: the MMEB subset name (candidates of '*Matching*' subsets are formatted as queries).
      options: ablations (no system turn, no suffix).
      has_video: whether the input carries a video (the video clause: module docstring).
    Raises:
      BadInput: empty text without an image or video, or placeholders that do not match.
    """
    if not text.strip() and not has_image and not has_video:
        raise BadInput(
            "empty text and no image", subset=subset, hint="drop the row or fill in its text"
        )
    body = place_videos(place_images(text, 1 if has_image else 0), 1 if has_video else 0)
    suffix = ""
    if options.suffix and uses_suffix(role, subset):
        suffix = query_suffix(has_image, has_video)
    system = (VIDEO_SYSTEM_PROMPT if has_video else SYSTEM_PROMPT) if options.system else None
    return chat_prompt(system, body, user_suffix=suffix)


def embedding_prompt_text(
    text: str,
    *,
    has_image: bool,
    role: str,
    subset: str = "",
    options: PromptOptions = PromptOptions(),
    has_video: bool = False,
) -> str:
    """The full string of `embedding_prompt` (before `<|image_pad|>` expansion)."""
    return embedding_prompt(
        text, has_image=has_image, role=role, subset=subset, options=options, has_video=has_video
    ).text


def sugarcrepe_caption(caption: str) -> str:
    """A SugarCrepe caption as query text (encode it with role='query', no image)."""
    return SUGARCREPE_CAPTION_PREFIX + caption


def judge_prompt(
    query_text: str, query_has_image: bool, candidate_text: str, candidate_has_image: bool
) -> ChatPrompt:
    """The Yes/No prompt of the mining stage's generative check.

    The images, if any, are given in the order (query image, candidate image). The prompt ends
    right after `<|im_start|>assistant\\n`; read the logits of `JUDGE_YES` / `JUDGE_NO` there.
    """
    query = place_images(query_text, 1 if query_has_image else 0)
    candidate = place_images(candidate_text, 1 if candidate_has_image else 0)
    body = f"{JUDGE_QUERY_LABEL}{query}{JUDGE_CANDIDATE_LABEL}{candidate}"
    return chat_prompt(JUDGE_SYSTEM_PROMPT, body, user_suffix=JUDGE_QUESTION)
