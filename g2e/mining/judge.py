"""The generative check of SaHa mining: the MLLM itself judges whether a candidate answers a query.

The yes/no prompt (g2e.data.prompts.judge_prompt) ends right after `<|im_start|>assistant\\n`;
the model's next-token logits at that last position, restricted to the answer tokens 'Yes' and
'No', give P(yes) = softmax([yes, no])[0]. One forward pass, no generation loop, and only the
two needed logits of the last position are ever formed.

Batches: `batch_size` is pairs per device and step; a step spans every device of the mesh's
batch axes (8 devices x 16 = 128 pairs per device call).

Images: each distinct image of a call is loaded and resized by the processor's image policy
once, not once per pair (an anchor's image serves all its pairs), and kept in a small
least-recently-used memo across calls (by `images.image_key`, up to `image_memo_bytes`), so
the later rounds of a block find it again. The pixels are exactly those the processor's own
`encode_judge` would make.

Over-length pairs, the policy (it never stops the stage, under on_bad_input=error or skip,
and no pair scores NaN):
  * a pair whose prompt does not fit the max length even with its text cut (two ~992^2
    images under `random` make ~2,450 tokens, over the judge's 2048) is judged again with
    both images at 1/2, then 1/4, then 1/8 of their pixels (LANCZOS): status DOWNSCALED;
  * a pair that still does not fit, or whose two texts together are far over the max
    length (texts are not scaled), is not judged: status UNJUDGED, P(yes) = 0.0, so the
    walk keeps the owner, as it would without a judge.
Both are counted (the mine report's judge_downscaled / judge_unjudged) and the first few
unjudged pairs are logged. Any other bad input in a pair follows on_bad_input: 'error' stops
the stage with the processor's BadInput, 'skip' counts it in the processor's report and
leaves the pair UNJUDGED.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from g2e import distributed
from g2e.data import images as images_lib
from g2e.data.batching import Encoded
from g2e.data.errors import BadInput, BadInputReport
from g2e.data.preprocess import EmbedItem, Processor
from g2e.embedding import BatchRunner
from g2e.mining.walk import DOWNSCALED, JUDGED, UNJUDGED
from g2e.models import sharding
from g2e.models.qwen2_vl import Qwen2VL

# The processor's BadInput reasons for a prompt over the max length (g2e.data.preprocess).
TOO_MANY_IMAGE_TOKENS = "prompt does not fit max_length even with its text removed"
TEXT_FAR_OVER = "text far over max_length"
# Retries of an over-length pair, each at half the previous pixels (so half the image tokens).
DOWNSCALE_STEPS = 3
LOGGED_UNJUDGED = 5


def yes_no_logits(
    model: Qwen2VL, batch: dict[str, jax.Array], yes_id: int, no_id: int
) -> jax.Array:
    """Logits [B, 2] of the 'Yes' and 'No' tokens at each row's last (pooled) position."""
    last = model.pooled_hidden(batch)  # [B, D]
    head = model.head_kernel()[:, jnp.array([yes_id, no_id])]  # [D, 2]
    return (last @ head.astype(last.dtype)).astype(jnp.float32)


@dataclasses.dataclass
class JudgeResult:
    """P(yes) float32 [N] (0.0 for an UNJUDGED pair), status int8 [N] (JUDGED, DOWNSCALED,
    UNJUDGED of g2e.mining.walk) and the device calls of the judge program it took."""

    p_yes: np.ndarray
    status: np.ndarray
    device_calls: int


class _ImageMemo:
    """Policy-resized images by key; the least recently used go past a byte budget."""

    def __init__(self, budget: int):
        self.budget, self.size = budget, 0
        self.images: collections.OrderedDict[str, Image.Image] = collections.OrderedDict()

    def get(self, key: str, load) -> Image.Image:
        if key in self.images:
            self.images.move_to_end(key)
            return self.images[key]
        image = load()
        self.images[key] = image
        self.size += 3 * image.width * image.height
        while self.size > self.budget and len(self.images) > 1:
            _, old = self.images.popitem(last=False)
            self.size -= 3 * old.width * old.height
        return image


class Judge(BatchRunner):
    """P(yes) that each candidate answers its query: `judge(pairs) -> float32 [N]`.

    `pairs` are (query EmbedItem, candidate EmbedItem); an item's image may be a path, bytes,
    an ImageRef or a PIL image. `judge.judge(pairs)` also returns each pair's status and the
    device calls (JudgeResult); over-length and bad pairs follow the module docstring's
    policy (an UNJUDGED pair scores 0.0 here).

    Args:
      model, processor, mesh, rules, progress: as BatchRunner's.
      batch_size: pairs per device and step.
      image_memo_bytes: the budget of loaded images kept between calls.
    """

    def __init__(
        self,
        model: Qwen2VL,
        processor: Processor,
        *,
        mesh: jax.sharding.Mesh | None = None,
        rules: sharding.Rules | None = None,
        batch_size: int = 16,
        progress: bool = True,
        image_memo_bytes: int = 1 << 30,
    ):
        yes_id, no_id = processor.judge_token_ids()

        def step(graphdef, state, batch):
            logits = yes_no_logits(nnx.merge(graphdef, state), batch, yes_id, no_id)
            return jax.nn.softmax(logits, axis=-1)[:, 0]

        super().__init__(
            model,
            processor,
            step,
            mesh=mesh,
            rules=rules,
            batch_size=batch_size * sharding.batch_devices(mesh, rules, per_process=True),
            progress=progress,
        )
        self.output_width = 1
        # Encodes images already resized by the policy (once per image, not per pair) and
        # raises every BadInput, so the over-length policy can act on it.
        self._encoder = copy.copy(processor)
        self._encoder.image_resolution = "processor"
        self._encoder.report = BadInputReport("error")
        self._images = _ImageMemo(image_memo_bytes)
        self._unjudged_logged = 0

    @property
    def pairs_per_call(self) -> int:
        """Pairs in one device call, over all processes."""
        return self.batch_size * jax.process_count()

    def __call__(
        self, pairs: Sequence[tuple[EmbedItem, EmbedItem]], *, desc: str = "judge"
    ) -> np.ndarray:
        return self.judge(pairs, desc=desc).p_yes

    def judge(
        self, pairs: Sequence[tuple[EmbedItem, EmbedItem]], *, desc: str = "judge"
    ) -> JudgeResult:
        """P(yes), status and device calls of `pairs` (see the module docstring).

        Raises:
          BadInput: a pair's input is bad (not merely over-length) and on_bad_input='error'.
        """
        count = len(pairs)
        share = distributed.host_slice(count)
        status = np.zeros(share.stop - share.start, np.int8)
        call_images: dict[int, tuple[Any, Image.Image]] = {}

        def encode(indexed: tuple[int, tuple[EmbedItem, EmbedItem]]) -> Encoded | None:
            index, (query, candidate) = indexed
            encoded, status[index - share.start] = self._encode_pair(query, candidate, call_images)
            return encoded

        steps_before = self.processor.stats["batches"]
        p_yes = self.run(list(enumerate(pairs)), encode, desc=desc).reshape(count)
        device_calls = self.processor.stats["batches"] - steps_before
        status = distributed.gather_in_order(status, count)
        p_yes = np.where(status == UNJUDGED, 0.0, p_yes).astype(np.float32)
        return JudgeResult(p_yes, status, device_calls)

    # ---- one pair ------------------------------------------------------------------------

    def _encode_pair(
        self, query: EmbedItem, candidate: EmbedItem, call_images: dict
    ) -> tuple[Encoded | None, int]:
        try:
            loaded = [self._image(item, call_images) for item in (query, candidate)]
        except BadInput as error:
            return self._bad(error, query), UNJUDGED
        for step in range(DOWNSCALE_STEPS + 1):
            scaled = loaded if step == 0 else [_downscale(image, 0.5**step) for image in loaded]
            try:
                encoded = self._encoder.encode_judge(
                    dataclasses.replace(query, image=scaled[0]),
                    dataclasses.replace(candidate, image=scaled[1]),
                )
                return encoded, JUDGED if step == 0 else DOWNSCALED
            except BadInput as error:
                over = error.reason in (TOO_MANY_IMAGE_TOKENS, TEXT_FAR_OVER)
                if not over:
                    return self._bad(error, query), UNJUDGED
                if (
                    error.reason == TEXT_FAR_OVER
                    or step == DOWNSCALE_STEPS
                    or not any(image is not None for image in loaded)
                ):
                    self._log_unjudged(error, query)
                    return None, UNJUDGED
        raise AssertionError("unreachable")

    def _image(self, item: EmbedItem, call_images: dict) -> Image.Image | None:
        """The item's image loaded and resized by the policy, or None without one."""
        source = item.image
        if source is None or (isinstance(source, str) and not source):
            return None
        if isinstance(source, Image.Image):
            # A PIL image has no cheap stable key: shared within this call only (by object).
            if id(source) not in call_images:
                call_images[id(source)] = (source, self.processor.load_images([source])[0])
            return call_images[id(source)][1]
        return self._images.get(
            images_lib.image_key(source), lambda: self.processor.load_images([source])[0]
        )

    def _bad(self, error: BadInput, query: EmbedItem) -> None:
        """Applies on_bad_input: raises under 'error'; counts it under 'skip'."""
        self.processor.report.handle(error.with_context(subset=query.subset, row=query.row))

    def _log_unjudged(self, error: BadInput, query: EmbedItem) -> None:
        if self._unjudged_logged < LOGGED_UNJUDGED:
            self._unjudged_logged += 1
            logging.warning(
                "judge: pair not judged, its owner is kept (%s)",
                error.with_context(subset=query.subset, row=query.row),
            )


def _downscale(image: Image.Image | None, pixel_fraction: float) -> Image.Image | None:
    """The image at about `pixel_fraction` of its pixels (same aspect ratio), or None."""
    if image is None:
        return None
    side = pixel_fraction**0.5
    size = (max(1, round(image.width * side)), max(1, round(image.height * side)))
    return image.resize(size, Image.Resampling.LANCZOS)
