"""g2e's `Embedder` behind MTEB's encoder protocol (`mteb.models.EncoderProtocol`).

    import mteb
    from g2e import Embedder
    from g2e.mteb_adapter import MTEBEncoder

    model = MTEBEncoder(Embedder.from_pretrained("Qwen/Qwen2-VL-2B-Instruct"))
    mteb.evaluate(model, mteb.get_tasks(tasks=["SciFact"]))

MTEB (2.x) calls `encode(inputs, *, task_metadata, hf_split, hf_subset, prompt_type)` with a
DataLoader of batches, each a dict of columns (`text`, `image`, ...); MTEB 1.x called
`encode(sentences, *, task_name, prompt_type)` with a list of strings. Both work here:
- prompt_type 'query' embeds in g2e's query role (the one-word suffix, docs/method.md §1),
  'document' in the candidate role; no prompt_type (symmetric tasks: STS, clustering,
  classification) in the query role, so both sides of a pair are embedded alike;
- the task's instruction (`instructions[task name]` given here, else the task metadata's
  `prompt`, per prompt type when it is a dict) goes before the text as `"{instruction}: "`,
  as MMEB's rows carry theirs; a str prompt applies to queries and symmetric tasks only;
- `similarity` is the cosine (g2e's embeddings are L2-normalised).

mteb itself is imported only for `mteb_model_meta`, so this module loads without it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from g2e.embedding import Embedder, unit_rows

# A batch's columns this adapter reads; MTEB's others (id, title, body, query) are folded into
# `text` by MTEB already.
COLUMNS = ("text", "image", "video")


class MTEBEncoder:
    """An Embedder as an MTEB encoder.

    Args:
      embedder: the g2e Embedder (`Embedder.from_pretrained(...)`).
      name: the model name MTEB records results under (ORG/NAME).
      revision: the revision MTEB records.
      instructions: {task name: instruction} overriding the tasks' own prompts.
    """

    def __init__(
        self,
        embedder: Embedder,
        name: str = "g2e/embedder",
        revision: str = "local",
        *,
        instructions: Mapping[str, str] | None = None,
    ):
        self.embedder = embedder
        self.name = name
        self.revision = revision
        self.instructions = dict(instructions or {})

    def encode(
        self,
        inputs: Iterable[Any],
        *,
        task_metadata: Any = None,
        hf_split: str = "",
        hf_subset: str = "",
        prompt_type: Any = None,
        task_name: str | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """float32 [N, D] embeddings of every row of `inputs` (a DataLoader of column
        batches, or a list of strings / g2e inputs), in order.

        Raises:
          NotImplementedError: a column this adapter cannot pass to g2e (audio, ...).
        """
        del hf_split, hf_subset  # g2e's prompts do not depend on them
        kind = getattr(prompt_type, "value", prompt_type)  # PromptType or its str
        role = "candidate" if kind == "document" else "query"
        instruction = self._instruction(task_metadata, task_name, kind)
        rows = list(_rows(inputs))
        if not rows:
            return np.zeros((0, self.embedder.output_width), np.float32)
        return self.embedder.encode(
            rows,
            role=role,
            prompt=f"{instruction}: " if instruction else None,
            batch_size=kwargs.get("batch_size"),
            show_progress_bar=kwargs.get("show_progress_bar"),
        )

    def _instruction(self, task_metadata: Any, task_name: str | None, kind: str | None) -> str:
        """The task's instruction for this prompt type ('' for none)."""
        name = task_name or getattr(task_metadata, "name", None)
        if name in self.instructions:
            return self.instructions[name]
        prompt = getattr(task_metadata, "prompt", None)
        if isinstance(prompt, Mapping):
            return prompt.get(kind, "") if kind else ""
        return prompt if prompt and kind != "document" else ""

    @staticmethod
    def similarity(embeddings1: Any, embeddings2: Any) -> np.ndarray:
        """Cosine similarity [N1, N2]."""
        return Embedder.similarity(np.asarray(embeddings1), np.asarray(embeddings2))

    @staticmethod
    def similarity_pairwise(embeddings1: Any, embeddings2: Any) -> np.ndarray:
        """Cosine similarity of each pair [N]."""
        return np.sum(unit_rows(embeddings1) * unit_rows(embeddings2), axis=-1)

    @property
    def mteb_model_meta(self):
        """MTEB's ModelMeta of this model (needs the mteb package)."""
        from mteb.models import ModelMeta

        return ModelMeta.create_empty(
            overwrites=dict(
                name=self.name,
                revision=self.revision,
                modalities=["text", "image"],
                similarity_fn_name="cosine",
            )
        )


def _rows(inputs: Iterable[Any]):
    """One g2e input per row: a dict of a batch's COLUMNS, or the list's own elements."""
    for batch in inputs:
        if not isinstance(batch, Mapping):
            yield batch
            continue
        unknown = {"audio"} & set(batch)
        if unknown:
            raise NotImplementedError(
                f"MTEBEncoder: g2e cannot embed the {sorted(unknown)} column of this task"
            )
        columns = {key: batch[key] for key in COLUMNS if key in batch}
        count = len(next(iter(columns.values())))
        for index in range(count):
            yield {key: values[index] for key, values in columns.items()}
