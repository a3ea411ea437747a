"""Prompt strings of docs/method.md §1, §2 and §4, character for character."""

import pytest

from g2e.data import prompts
from g2e.data.errors import BadInput

SYSTEM = (
    "Given an image, summarize the provided image in one word. "
    "Given only text, describe the text in one word."
)
HEAD = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
TAIL = "<|im_end|>\n<|im_start|>assistant\n"
IMAGE_SUFFIX = "\nRepresent the given text/image in one word."
TEXT_SUFFIX = "\nRepresent the given text in one word."
VQA = "<|image_1|>\nRepresent the given image with the following question: What is on the table?"
VQA_QWEN = (
    "<|image_pad|>\nRepresent the given image with the following question: What is on the table?"
)


def build(text, has_image, role, subset="", **options):
    return prompts.embedding_prompt_text(
        text,
        has_image=has_image,
        role=role,
        subset=subset,
        options=prompts.PromptOptions(**options),
    )


def test_constants_match_spec():
    assert prompts.SYSTEM_PROMPT == SYSTEM
    assert prompts.QUERY_SUFFIX_WITH_IMAGE == IMAGE_SUFFIX
    assert prompts.QUERY_SUFFIX_TEXT_ONLY == TEXT_SUFFIX
    assert prompts.SUGARCREPE_CAPTION_PREFIX == "Find me an image that matches the given caption: "
    assert prompts.JUDGE_YES == "Yes" and prompts.JUDGE_NO == "No"


def test_query_with_image():
    assert build(VQA, True, "query", "OK-VQA") == HEAD + VQA_QWEN + IMAGE_SUFFIX + TAIL


def test_query_text_only():
    text = "Find me an everyday image that matches the given caption: A dog runs."
    assert build(text, False, "query", "MSCOCO_t2i") == HEAD + text + TEXT_SUFFIX + TAIL


def test_candidates_have_no_suffix():
    assert build("A dog runs.", False, "candidate", "MSCOCO_i2t") == HEAD + "A dog runs." + TAIL
    image_text = "<|image_1|>\nRepresent the given image."
    assert build(image_text, True, "candidate", "MSCOCO_t2i") == (
        HEAD + "<|image_pad|>\nRepresent the given image." + TAIL
    )


def test_matching_candidates_are_formatted_as_queries():
    image_text = "<|image_1|>\nSelect the portion of the image that follows the expression."
    expected = (
        HEAD + "<|image_pad|>\nSelect the portion of the image that follows the "
        "expression." + IMAGE_SUFFIX + TAIL
    )
    assert build(image_text, True, "candidate", "RefCOCO-Matching") == expected
    assert build("a red car", False, "candidate", "RefCOCO-Matching") == (
        HEAD + "a red car" + TEXT_SUFFIX + TAIL
    )
    # The plain RefCOCO subset keeps suffix-less candidates.
    assert build("a red car", False, "candidate", "RefCOCO") == HEAD + "a red car" + TAIL


def test_ablations():
    plain_head = "<|im_start|>user\n"
    assert build(VQA, True, "query", system=False) == plain_head + VQA_QWEN + IMAGE_SUFFIX + TAIL
    assert build(VQA, True, "query", suffix=False) == HEAD + VQA_QWEN + TAIL
    assert build(VQA, True, "query", system=False, suffix=False) == plain_head + VQA_QWEN + TAIL
    assert build("a cat", False, "candidate", system=False, suffix=False) == (
        plain_head + "a cat" + TAIL
    )


def test_image_goes_first_without_placeholder():
    assert build("What is this?", True, "query") == (
        HEAD + "<|image_pad|>\nWhat is this?" + IMAGE_SUFFIX + TAIL
    )
    assert build("", True, "candidate") == HEAD + "<|image_pad|>" + TAIL
    assert prompts.place_images("compare", 2) == "<|image_pad|>\n<|image_pad|>\ncompare"


def test_sugarcrepe_prompts():
    caption = prompts.sugarcrepe_caption("A man rides a horse.")
    assert build(caption, False, "query") == (
        HEAD
        + "Find me an image that matches the given caption: A man rides a horse."
        + TEXT_SUFFIX
        + TAIL
    )
    assert build(prompts.SUGARCREPE_IMAGE_TEXT, True, "candidate") == (
        HEAD + "<|image_pad|>" + TAIL
    )


def test_judge_prompt():
    prompt = prompts.judge_prompt(VQA, True, "a vase of flowers", False)
    assert prompt.text == (
        "<|im_start|>system\nYou are a careful judge. Decide whether a candidate is a correct "
        "match for a query: the right answer to its question, or the item it asks for or "
        "describes.<|im_end|>\n<|im_start|>user\nQuery: "
        + VQA_QWEN
        + "\nCandidate: a vase of flowers\nDoes the candidate correctly answer or match the "
        "query? Answer Yes or No.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompt.text.endswith("<|im_start|>assistant\n")
    both = prompts.judge_prompt("A red car.", False, "", True)
    assert both.body == "Query: A red car.\nCandidate: <|image_pad|>"


def test_chat_prompt_with_answer():
    prompt = prompts.chat_prompt(None, "What colour?", answer="Red")
    assert prompt.text == (
        "<|im_start|>user\nWhat colour?<|im_end|>\n<|im_start|>assistant\nRed<|im_end|>"
    )
    assert prompt.answer == "Red<|im_end|>"


def test_prompt_parts_concatenate():
    prompt = prompts.embedding_prompt(VQA, has_image=True, role="query")
    assert prompt.head == HEAD
    assert prompt.body == VQA_QWEN
    assert prompt.tail == IMAGE_SUFFIX + TAIL


def test_bad_prompts():
    with pytest.raises(BadInput, match="empty text and no image"):
        build("   ", False, "query", "MSCOCO_t2i")
    with pytest.raises(BadInput, match="placeholders do not match"):
        build(VQA, False, "query", "OK-VQA")
    with pytest.raises(ValueError, match="role"):
        build("a cat", False, "document")
