"""The generative check of SaHa mining: the MLLM itself judges whether a candidate answers a query.

The yes/no prompt (g2e.data.prompts.judge_prompt) ends right after `<|im_start|>assistant\\n`;
the model's next-token logits at that last position, restricted to the answer tokens 'Yes' and
'No', give P(yes) = softmax([yes, no])[0]. One forward pass, no generation loop, and only the
two needed logits of the last position are ever formed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from g2e.data.preprocess import EmbedItem, Processor
from g2e.embedding import BatchRunner
from g2e.models.qwen2_vl import Qwen2VL


def yes_no_logits(model: Qwen2VL, batch: dict[str, jax.Array], yes_id: int, no_id: int
                  ) -> jax.Array:
    """Logits [B, 2] of the 'Yes' and 'No' tokens at each row's last (pooled) position."""
    last = model.pooled_hidden(batch)                                # [B, D]
    head = model.head_kernel()[:, jnp.array([yes_id, no_id])]         # [D, 2]
    return (last @ head.astype(last.dtype)).astype(jnp.float32)


class Judge(BatchRunner):
    """P(yes) that each candidate answers its query: `judge(pairs) -> float32 [N]`.

    `pairs` are (query EmbedItem, candidate EmbedItem); bad pairs follow the processor's
    on_bad_input policy (a skipped pair scores NaN, which never exceeds a threshold).
    """

    def __init__(self, model: Qwen2VL, processor: Processor, **kwargs: Any):
        yes_id, no_id = processor.judge_token_ids()

        def step(graphdef, state, batch):
            logits = yes_no_logits(nnx.merge(graphdef, state), batch, yes_id, no_id)
            return jax.nn.softmax(logits, axis=-1)[:, 0]

        super().__init__(model, processor, step, **kwargs)
        self.output_width = 1

    def __call__(self, pairs: Sequence[tuple[EmbedItem, EmbedItem]], *,
                 desc: str = "judge") -> np.ndarray:
        probabilities = self.run(pairs, lambda pair: self.processor.encode_judge(*pair),
                                 desc=desc)
        return probabilities.reshape(len(pairs))
