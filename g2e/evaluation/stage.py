"""The evaluation stages: `eval_plain`, `eval_zero_shot` and `eval` (MMEB), and `report`.

Each MMEB stage embeds with the Embedder of the model it names and writes
`<workdir>/<stage>/results.{json,md,png}` (g2e.evaluation.mmeb); `report` collects them into
one table (g2e.evaluation.report).
"""

from __future__ import annotations

import logging
from typing import Any

from g2e import distributed
from g2e.data import prompts
from g2e.embedding import Embedder
from g2e.evaluation import mmeb, report
from g2e.pipeline import Pipeline


def _evaluate(pipeline: Pipeline, stage: str, *, trained: bool,
              prompt: prompts.PromptOptions | None = None) -> dict[str, Any]:
    config = pipeline.config
    model = pipeline.model(trained=trained)
    processor = pipeline.processor(prompt=prompt)
    embedder = Embedder(model, processor, mesh=pipeline.mesh, rules=pipeline.rules,
                        batch_size=config.eval.batch_size, progress=False,
                        workers=pipeline.workers)
    results = mmeb.evaluate_mmeb(
        embedder, data=config.data,
        out_dir=str(pipeline.workdir / stage), subsets=config.data.eval_subsets,
        on_bad_input=config.data.on_bad_input, batch_size=8 * embedder.batch_size,
        fingerprint=pipeline.fingerprint(pipeline.model_key, processor.prompt),
        model_name=stage, write_outputs=distributed.is_primary(),
        cache_options=pipeline.embedding_cache_options())
    logging.info("%s: overall %s (IND %s, OOD %s); padding %s", stage, results["overall"],
                 results["IND"], results["OOD"], processor.padding_report())
    return {"overall": results["overall"]}


def run_eval_plain(pipeline: Pipeline) -> dict[str, Any]:
    """Zero-shot MMEB with the plain prompt: no system turn, no suffix (the paper's baseline)."""
    return _evaluate(pipeline, "eval_plain", trained=False,
                     prompt=prompts.PromptOptions(system=False, suffix=False))


def run_eval_zero_shot(pipeline: Pipeline) -> dict[str, Any]:
    """Zero-shot MMEB with the configured (by default hierarchical) prompt."""
    return _evaluate(pipeline, "eval_zero_shot", trained=False)


def run_eval(pipeline: Pipeline) -> dict[str, Any]:
    """MMEB with the fine-tuned model."""
    return _evaluate(pipeline, "eval", trained=True)


def run_report(pipeline: Pipeline) -> dict[str, Any]:
    """One table of every evaluation that ran: <workdir>/report.md and report.json."""
    if not distributed.is_primary():
        return {}
    return report.write_report(pipeline.workdir)
