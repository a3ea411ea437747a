"""The eval_sugarcrepe stage on the generated mini SugarCrepe: scores equal a hand computation."""

import json

import numpy as np

from g2e import configuration
from g2e.data import prompts
from g2e.data.preprocess import EmbedItem
from g2e.demo import mini_sugarcrepe
from g2e.embedding import Embedder
from g2e.evaluation import stage as evaluation_stage
from g2e.evaluation import sugarcrepe
from g2e.pipeline import Pipeline
from tests import assets


def test_eval_sugarcrepe_stage_equals_a_hand_computation(tmp_path):
    _, checkpoint = assets.tiny_checkpoint(tmp_path / "model", seed=2)
    data = mini_sugarcrepe.build(str(tmp_path / "mini_sugarcrepe"), seed=0, examples=6)
    config = configuration.base_config()
    config.model_dir = str(checkpoint)
    config.model.dtype = config.model.param_dtype = "float32"
    config.data.update(
        sugarcrepe_dir=data["sugarcrepe"],
        sugarcrepe_pp_dir=data["sugarcrepe_pp"],
        sugarcrepe_image_root=data["image_root"],
        workers=0,
        max_length=256,
        length_buckets=(128, 256),
        patch_buckets=(0, 64),
        image_resolution="processor",
    )
    config.eval.batch_size = 1  # per device: 8 a step on 8 devices
    configuration.validate_settings(config, ["eval_sugarcrepe"])
    pipeline = Pipeline(config, tmp_path / "work")
    summary = evaluation_stage.run_eval_sugarcrepe(pipeline)
    written = json.loads((tmp_path / "work" / "eval_sugarcrepe" / "results.json").read_text())
    assert written["model"] == summary["model"] == "zero-shot"
    assert "SugarCrepe" in (tmp_path / "work" / "eval_sugarcrepe" / "results.md").read_text()

    # By hand: embed each image (candidate, text <|image_pad|>) and caption (query) alone.
    embedder = Embedder(
        pipeline.model(trained=False), pipeline.processor(), mesh=None, batch_size=8, progress=False
    )

    def image(filename):
        item = EmbedItem(prompts.IMAGE_PAD, f"{data['image_root']}/{filename}", "candidate")
        return embedder([item])[0]

    def caption(text):
        return embedder([EmbedItem(prompts.sugarcrepe_caption(text), None, "query")])[0]

    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    for category in mini_sugarcrepe.SUGARCREPE:
        examples = json.loads(open(f"{data['sugarcrepe']}/{category}.json").read()).values()
        right = [
            cos(image(e["filename"]), caption(e["caption"]))
            > cos(image(e["filename"]), caption(e["negative_caption"]))
            for e in examples
        ]
        np.testing.assert_allclose(
            written["sugarcrepe"]["categories"][category]["accuracy"],
            100.0 * np.mean(right),
            atol=1e-9,
        )
    for category in mini_sugarcrepe.SUGARCREPE_PP:
        examples = json.loads(open(f"{data['sugarcrepe_pp']}/{category}.json").read())
        itt, tot = [], []
        for e in examples:
            picture = image(e["filename"])
            first, second = caption(e["caption"]), caption(e["caption2"])
            negative = caption(e["negative_caption"])
            itt.append(
                cos(picture, first) > cos(picture, negative)
                and cos(picture, second) > cos(picture, negative)
            )
            tot.append(cos(first, second) > max(cos(first, negative), cos(second, negative)))
        scores = written["sugarcrepe_pp"]["categories"][category]
        np.testing.assert_allclose(scores["image_to_text"], 100.0 * np.mean(itt), atol=1e-9)
        np.testing.assert_allclose(scores["text_only"], 100.0 * np.mean(tot), atol=1e-9)
    assert set(written["sugarcrepe"]["categories"]) == set(sugarcrepe.SUGARCREPE_CATEGORIES) - {
        "replace_rel",
        "swap_obj",
    }
