"""Mini SugarCrepe and SugarCrepe++: drawn scenes and caption edits in the benchmarks' layouts.

  python -m g2e.demo.mini_sugarcrepe --out DIR [--seed N] [--examples 8]

Layout written (as g2e.evaluation.sugarcrepe reads the originals):
  DIR/sugarcrepe/<category>.json     {id: {"filename", "caption", "negative_caption"}} for
                                     replace_obj, replace_att, swap_att, add_obj, add_att
  DIR/sugarcrepe_pp/<category>.json  [{"id", "filename", "caption", "caption2",
                                     "negative_caption"}] for replace_obj, replace_att, swap_att
  DIR/images/<n>.jpg                 the scenes the files name (the image root of both)
Each scene (g2e.demo.scenes) holds one or two shapes; the caption names them, the negative
edits one word as the category says (another shape, another colour, the two colours swapped, an
object or an attribute added), and SugarCrepe++'s second positive says the same in other words.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from g2e.demo import scenes

SUGARCREPE = ("replace_obj", "replace_att", "swap_att", "add_obj", "add_att")
SUGARCREPE_PP = ("replace_obj", "replace_att", "swap_att")


def _other(rng: np.random.Generator, options, value: str) -> str:
    return scenes.pick(rng, [o for o in options if o != value])


def _edits(rng: np.random.Generator, objects: list[scenes.Obj]) -> dict[str, tuple[str, str, str]]:
    """category -> (caption, second positive, negative) of one scene."""
    first = objects[0]
    colour, shape = first.color, first.shape
    caption = f"a {colour} {shape}"
    edits = {
        "replace_obj": (
            caption,
            f"a {shape} that is {colour}",
            f"a {colour} {_other(rng, scenes.SHAPES, shape)}",
        ),
        "replace_att": (
            caption,
            f"a {shape} that is {colour}",
            f"a {_other(rng, scenes.COLORS, colour)} {shape}",
        ),
        "add_obj": (
            caption,
            f"a {shape} that is {colour}",
            f"a {colour} {shape} and a {_other(rng, scenes.SHAPES, shape)}",
        ),
        "add_att": (
            caption,
            f"a {shape} that is {colour}",
            f"a {colour} {shape} with {_other(rng, scenes.COLORS, colour)} stripes",
        ),
    }
    if len(objects) > 1:
        second = objects[1]
        edits["swap_att"] = (
            f"a {colour} {shape} and a {second.color} {second.shape}",
            f"a {second.color} {second.shape} and a {colour} {shape}",
            f"a {second.color} {shape} and a {colour} {second.shape}",
        )
    return edits


def build(out_dir: str, seed: int = 0, examples: int = 8) -> dict:
    """Writes the mini benchmarks to `out_dir`; returns {"sugarcrepe": dir, "sugarcrepe_pp":
    dir, "image_root": dir, "examples": per category}."""
    rng = np.random.default_rng(seed)
    folders = {
        name: os.path.join(out_dir, name) for name in ("sugarcrepe", "sugarcrepe_pp", "images")
    }
    for folder in folders.values():
        os.makedirs(folder, exist_ok=True)
    plain: dict[str, dict] = {c: {} for c in SUGARCREPE}
    plus: dict[str, list] = {c: [] for c in SUGARCREPE_PP}
    for number in range(examples):
        colours = scenes.pick(rng, scenes.COLORS, 2)
        objects = scenes.objects(rng, 2, shapes=scenes.pick(rng, scenes.SHAPES, 2), colors=colours)
        image, _ = scenes.draw(rng, objects)
        filename = f"{number:05d}.jpg"
        image.save(os.path.join(folders["images"], filename), quality=90)
        for category, (caption, caption2, negative) in _edits(rng, objects).items():
            plain[category][str(number)] = {
                "filename": filename,
                "caption": caption,
                "negative_caption": negative,
            }
            if category in plus:
                plus[category].append(
                    {
                        "id": number,
                        "filename": filename,
                        "caption": caption,
                        "caption2": caption2,
                        "negative_caption": negative,
                    }
                )
    _write(folders["sugarcrepe"], plain)
    _write(folders["sugarcrepe_pp"], plus)
    return {
        "sugarcrepe": folders["sugarcrepe"],
        "sugarcrepe_pp": folders["sugarcrepe_pp"],
        "image_root": folders["images"],
        "examples": examples,
    }


def _write(folder: str, by_category: dict) -> None:
    for category, content in by_category.items():
        with open(os.path.join(folder, f"{category}.json"), "w") as handle:
            json.dump(content, handle, indent=1)


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--examples", type=int, default=8)
    args = parser.parse_args(argv)
    print(json.dumps(build(args.out, seed=args.seed, examples=args.examples)))


if __name__ == "__main__":
    main()
