"""The generative check of SaHa mining: the MLLM itself judges whether a candidate answers a query.

The yes/no prompt (g2e.data.prompts.judge_prompt) ends right after `<|im_start|>assistant\\n`;
the model's next-token logits at that last position, restricted to the answer tokens 'Yes' and
'No', give P(yes) = softmax([yes, no])[0]. One forward pass, no generation loop, and only the
two needed logits of the last position are ever formed.

Batches: `batch_size` is pairs per device and step; a step spans every device of the mesh's
batch axes (8 devices x 16 = 128 pairs per device call).

Images: each process that encodes pairs (the judge's workers) loads and resizes a distinct
image by the processor's image policy once, not once per pair (an anchor's image serves all
its pairs), and keeps it in a small least-recently-used memo across calls (by
`images.image_key`, up to `image_memo_bytes`), so the later rounds of a block find it again. The pixels are exactly those the processor's own
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
import uuid
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from g2e import distributed
from g2e.data import images as images_lib
from g2e.data import workers as workers_lib
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


@dataclasses.dataclass
class PairEncoding:
    """A pair's encoding (None: not judged), its status, and the BadInput behind an UNJUDGED
    status (`over_length`: the over-length policy's, else a bad input for on_bad_input)."""

    encoded: Encoded | None
    status: int
    error: BadInput | None = None
    over_length: bool = False


# Per process (each worker, or the main one) and judge: policy-resized images kept between pairs
# and calls.
_IMAGE_MEMO: dict[str, _ImageMemo] = {}


@dataclasses.dataclass(frozen=True)
class PairEncoder:
    """(query, candidate) -> PairEncoding: a picklable function of the pair, run in the judge's
    worker pool.

    loader: the stage's processor (its image policy loads and resizes each image once);
    encoder: a copy that encodes images as given and raises every BadInput, so the over-length
    policy can act on it; image_memo_bytes: the budget of resized images each process keeps,
    in a memo of its own per judge (`memo_name`: images resized by one judge's policy).
    """

    loader: Processor
    encoder: Processor
    image_memo_bytes: int
    memo_name: str

    def __call__(self, pair: tuple[EmbedItem, EmbedItem]) -> PairEncoding:
        query, candidate = pair
        try:
            loaded = [self._image(item) for item in (query, candidate)]
        except BadInput as error:
            return PairEncoding(None, UNJUDGED, error)
        for step in range(DOWNSCALE_STEPS + 1):
            scaled = loaded if step == 0 else [_downscale(image, 0.5**step) for image in loaded]
            try:
                encoded = self.encoder.encode_judge(
                    dataclasses.replace(query, image=scaled[0]),
                    dataclasses.replace(candidate, image=scaled[1]),
                )
                return PairEncoding(encoded, JUDGED if step == 0 else DOWNSCALED)
            except BadInput as error:
                if error.reason not in (TOO_MANY_IMAGE_TOKENS, TEXT_FAR_OVER):
                    return PairEncoding(None, UNJUDGED, error)
                if (
                    error.reason == TEXT_FAR_OVER
                    or step == DOWNSCALE_STEPS
                    or not any(image is not None for image in loaded)
                ):
                    return PairEncoding(None, UNJUDGED, error, over_length=True)
        raise AssertionError("unreachable")

    def _image(self, item: EmbedItem) -> Image.Image | None:
        """The item's image loaded and resized by the policy, or None without one."""
        source = item.image
        if source is None or (isinstance(source, str) and not source):
            return None
        if isinstance(source, Image.Image):  # no cheap stable key: loaded for this pair
            return self.loader.load_images([source])[0]
        memo = _IMAGE_MEMO.get(self.memo_name)
        if memo is None:
            memo = _IMAGE_MEMO[self.memo_name] = _ImageMemo(self.image_memo_bytes)
        return memo.get(images_lib.image_key(source), lambda: self.loader.load_images([source])[0])


class Judge(BatchRunner):
    """P(yes) that each candidate answers its query: `judge(pairs) -> float32 [N]`.

    `pairs` are (query EmbedItem, candidate EmbedItem); an item's image may be a path, bytes,
    an ImageRef or a PIL image. `judge.judge(pairs)` also returns each pair's status and the
    device calls (JudgeResult); over-length and bad pairs follow the module docstring's
    policy (an UNJUDGED pair scores 0.0 here). Pairs are encoded by `PairEncoder` in the
    runner's worker pool (`workers`), the policy applied here as their encodings arrive.

    Args:
      model, processor, mesh, rules, progress, workers, pool: as BatchRunner's.
      batch_size: pairs per device and step.
      image_memo_bytes: the budget of loaded images each encoding process keeps between calls.
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
        workers: int = 0,
        pool: workers_lib.Pool | None = None,
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
            workers=workers,
            pool=pool,
        )
        self.output_width = 1
        encoder = copy.copy(processor)
        encoder.image_resolution = "processor"
        encoder.report = BadInputReport("error")
        self.pair_encoder = PairEncoder(processor, encoder, image_memo_bytes, uuid.uuid4().hex)
        self._status = np.zeros(0, np.int8)
        self._pairs: Sequence[tuple[EmbedItem, EmbedItem]] = ()
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
        pairs = list(pairs)
        count = len(pairs)
        share = distributed.host_slice(count)
        self._pairs, self._status = pairs[share], np.zeros(share.stop - share.start, np.int8)
        steps_before = self.processor.batcher.stats["batches"]
        p_yes = self.run(pairs, self.pair_encoder, desc=desc).reshape(count)
        device_calls = self.processor.batcher.stats["batches"] - steps_before
        status = distributed.gather_in_order(self._status, count)
        p_yes = np.where(status == UNJUDGED, 0.0, p_yes).astype(np.float32)
        return JudgeResult(p_yes, status, device_calls)

    def _received(self, index: int, value: Any) -> Encoded | None:
        """Records local pair `index`'s status and applies the policy to its error."""
        self._status[index] = value.status
        if value.error is not None:
            query = self._pairs[index][0]
            error = value.error.with_context(subset=query.subset, row=query.row)
            if value.over_length:
                self._log_unjudged(error)
            else:  # raises under on_bad_input='error'; counts it under 'skip'
                self.processor.report.handle(error)
        return value.encoded

    def _log_unjudged(self, error: BadInput) -> None:
        if self._unjudged_logged < LOGGED_UNJUDGED:
            self._unjudged_logged += 1
            logging.warning("judge: pair not judged, its owner is kept (%s)", error)


def _downscale(image: Image.Image | None, pixel_fraction: float) -> Image.Image | None:
    """The image at about `pixel_fraction` of its pixels (same aspect ratio), or None."""
    if image is None:
        return None
    side = pixel_fraction**0.5
    size = (max(1, round(image.width * side)), max(1, round(image.height * side)))
    return image.resize(size, Image.Resampling.LANCZOS)
