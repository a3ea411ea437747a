"""The evaluation stages: `eval_plain`, `eval_zero_shot`, `eval`, `eval_random` and
`eval_plain_random` (MMEB), `eval_sugarcrepe` (SugarCrepe and SugarCrepe++), `eval_mmeb_v2`
(MMEB-V2's image, video and visual-document tasks) and `report`.

Each MMEB stage embeds with the Embedder of the model it names and writes
`<workdir>/<stage>/results.{json,md,png}` (g2e.evaluation.mmeb); `eval_sugarcrepe` evaluates the
model `eval` does (fine-tuned once trained, else zero-shot) into
`<workdir>/eval_sugarcrepe/results.{json,md}`; `report` collects them into one table, its
paired differences and its charts (g2e.evaluation.report).
"""

from __future__ import annotations

import logging
from typing import Any

from g2e import distributed, layout
from g2e.data import prompts
from g2e.embedding import Embedder
from g2e.evaluation import mmeb, mmeb_v2, report, sugarcrepe
from g2e.pipeline import Pipeline


def _evaluate(
    pipeline: Pipeline,
    stage: str,
    *,
    trained: bool,
    run: str = layout.TRAIN,
    prompt: prompts.PromptOptions | None = None,
) -> dict[str, Any]:
    config = pipeline.config
    model = pipeline.model(trained=trained, run=run, merged=True)
    processor = pipeline.processor(prompt=prompt)
    embedder = Embedder.for_stage(pipeline, model, processor, per_device=config.eval.batch_size)
    try:
        results = mmeb.evaluate_mmeb(
            embedder,
            data=config.data,
            out_dir=str(pipeline.stage_dir(stage)),
            subsets=config.data.eval_subsets,
            on_bad_input=config.data.on_bad_input,
            batch_size=embedder.call_size,
            fingerprint=pipeline.fingerprint(pipeline.model_key, processor.prompt),
            model_name=stage,
            write_outputs=distributed.is_primary(),
            cache_options=pipeline.embedding_cache_options(),
            host=embedder,
        )
    finally:
        embedder.close()
    logging.info(
        "%s: overall %s (IND %s, OOD %s); padding %s",
        stage,
        results["overall"],
        results["IND"],
        results["OOD"],
        processor.padding_report(),
    )
    return {"overall": results["overall"], "padding": processor.padding_share()}


def run_eval_plain(pipeline: Pipeline) -> dict[str, Any]:
    """Zero-shot MMEB with the plain prompt (the paper's zero-shot baseline)."""
    return _evaluate(pipeline, layout.EVAL_PLAIN, trained=False, prompt=prompts.PLAIN)


def run_eval_zero_shot(pipeline: Pipeline) -> dict[str, Any]:
    """Zero-shot MMEB with the configured (by default hierarchical) prompt."""
    return _evaluate(pipeline, layout.EVAL_ZERO_SHOT, trained=False)


def run_eval(pipeline: Pipeline) -> dict[str, Any]:
    """MMEB with the fine-tuned model."""
    return _evaluate(pipeline, layout.EVAL, trained=True)


def run_eval_random(pipeline: Pipeline) -> dict[str, Any]:
    """MMEB with the model `train_random` fine-tuned (random batches, the SaHa ablation)."""
    return _evaluate(pipeline, layout.EVAL_RANDOM, trained=True, run=layout.TRAIN_RANDOM)


def run_eval_plain_random(pipeline: Pipeline) -> dict[str, Any]:
    """MMEB, with the plain prompt it was trained with, of the model `train_plain_random`
    fine-tuned (random batches, plain prompt: the paper's in-batch baseline)."""
    return _evaluate(
        pipeline,
        layout.EVAL_PLAIN_RANDOM,
        trained=True,
        run=layout.TRAIN_PLAIN_RANDOM,
        prompt=prompts.PLAIN,
    )


def run_eval_sugarcrepe(pipeline: Pipeline) -> dict[str, Any]:
    """SugarCrepe and SugarCrepe++ (whichever of data.sugarcrepe_dir / sugarcrepe_pp_dir is set)
    of the fine-tuned model when the train stage wrote one, else of the zero-shot model."""
    config, data = pipeline.config, pipeline.config.data
    trained = pipeline.has_trained_model()
    embedder = Embedder.for_stage(
        pipeline,
        pipeline.model(trained=trained, merged=True),
        pipeline.processor(),
        per_device=config.eval.batch_size,
    )
    common = dict(
        image_root=data.sugarcrepe_image_root,
        on_bad_input=data.on_bad_input,
        batch_size=embedder.call_size,
        progress=False,
    )
    results: dict[str, Any] = {"model": "fine-tuned" if trained else "zero-shot"}
    if data.sugarcrepe_dir:
        results["sugarcrepe"] = sugarcrepe.evaluate_sugarcrepe(
            embedder, data_dir=data.sugarcrepe_dir, **common
        )
    if data.sugarcrepe_pp_dir:
        results["sugarcrepe_pp"] = sugarcrepe.evaluate_sugarcrepe_pp(
            embedder, data_dir=data.sugarcrepe_pp_dir, **common
        )
    embedder.close()
    if distributed.is_primary():
        report.write_sugarcrepe(pipeline.stage_dir(layout.EVAL_SUGARCREPE), results)
    logging.info("eval_sugarcrepe (%s): %s", results["model"], report.sugarcrepe_scores(results))
    return {"model": results["model"], **report.sugarcrepe_scores(results)}


def run_eval_mmeb_v2(pipeline: Pipeline) -> dict[str, Any]:
    """MMEB-V2 (data.mmeb_v2_dir, data.mmeb_v2_tasks) of the fine-tuned model when the train
    stage wrote one, else of the zero-shot model: <workdir>/eval_mmeb_v2/results.{json,md}."""
    config = pipeline.config
    trained = pipeline.has_trained_model()
    model_name = "fine-tuned" if trained else "zero-shot"
    processor = pipeline.processor()
    embedder = Embedder.for_stage(
        pipeline,
        pipeline.model(trained=trained, merged=True),
        processor,
        per_device=config.eval.batch_size,
    )
    try:
        results = mmeb_v2.evaluate_mmeb_v2(
            embedder,
            data_dir=config.data.mmeb_v2_dir,
            out_dir=str(pipeline.stage_dir(layout.EVAL_MMEB_V2)),
            tasks=config.data.mmeb_v2_tasks,
            batch_size=embedder.call_size,
            fingerprint=pipeline.fingerprint(
                pipeline.model_key, processor.prompt, f"video_frames={config.data.video_frames}"
            ),
            model_name=model_name,
            write_outputs=distributed.is_primary(),
            cache_options=pipeline.embedding_cache_options(),
            host=embedder,
        )
    finally:
        embedder.close()
    logging.info(
        "eval_mmeb_v2: overall %s, modalities %s", results["overall"], results["modalities"]
    )
    return {
        "model": model_name,
        "overall": results["overall"],
        **results["modalities"],
        "padding": processor.padding_share(),
    }


def run_report(pipeline: Pipeline) -> dict[str, Any]:
    """One table of every evaluation that ran, with paired differences and charts:
    <workdir>/report.md, report.json, report.png and train.png."""
    if not distributed.is_primary():
        return {}
    return report.write_report(pipeline.workdir)
