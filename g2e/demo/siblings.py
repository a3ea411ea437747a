"""Siblings: mini-MMEB scenes that differ from another in exactly one attribute.

A sibling keeps every object's cell and size and the canvas (size, background, placement
jitter) and changes one object's colour or shape. It is the hardest negative a scene can have:
its caption differs in one word, its crop in one attribute at the same place, so an embedder
that binds colours to shapes tells them apart and one that does not, cannot. Objects of one
scene keep distinct (shape, colour) pairs, so every label names one object.
"""

import dataclasses

import numpy as np
import PIL.Image

from g2e.demo import scenes

ATTRIBUTES = ("color", "shape")


def _pairs(objects: list[scenes.Obj]) -> set[tuple[str, str]]:
    return {(o.shape, o.color) for o in objects}


def changed(
    rng: np.random.Generator, objects: list[scenes.Obj], index: int | None = None
) -> list[scenes.Obj]:
    """`objects` with one object's colour or shape replaced (object `index`, or one drawn at
    random): a value that leaves the scene's (shape, colour) pairs distinct."""
    index = int(rng.integers(len(objects))) if index is None else index
    target, taken = objects[index], _pairs(objects)
    for attribute in scenes.pick(rng, ATTRIBUTES, len(ATTRIBUTES)):
        values = scenes.SHAPES if attribute == "shape" else list(scenes.COLORS)
        options = [
            v
            for v in values
            if v != getattr(target, attribute)
            and ((v, target.color) if attribute == "shape" else (target.shape, v)) not in taken
        ]
        if options:
            variant = list(objects)
            variant[index] = dataclasses.replace(target, **{attribute: scenes.pick(rng, options)})
            return variant
    raise ValueError(f"no sibling of {objects}: every colour and shape of object {index} is taken")


def distinct_siblings(
    rng: np.random.Generator,
    objects: list[scenes.Obj],
    count: int,
    index: int | None = None,
    avoid: tuple[list[scenes.Obj], ...] = (),
) -> list[list[scenes.Obj]]:
    """Up to `count` siblings of `objects`, no two alike and none equal to one of `avoid`
    (changing object `index`, or any object)."""
    found: list[list[scenes.Obj]] = []
    for _ in range(4 * count):
        if len(found) == count:
            break
        variant = changed(rng, objects, index)
        if variant not in found and variant not in avoid:
            found.append(variant)
    return found


def draw_alike(
    rng: np.random.Generator, variants: list[list[scenes.Obj]]
) -> list[tuple[PIL.Image.Image, list[tuple[int, int, int, int]]]]:
    """Draws each object list of `variants` (all of one length) on one canvas: same size,
    background and placement; returns (image, boxes) per variant."""
    state = rng.bit_generator.state
    drawn = []
    for objects in variants:
        rng.bit_generator.state = state  # scenes.draw draws the canvas from the rng
        drawn.append(scenes.draw(rng, objects))
    return drawn


def sharing_objects(rng: np.random.Generator, n: int) -> list[scenes.Obj]:
    """n objects in distinct cells with distinct (shape, colour) pairs, each attribute drawn
    on its own: in about half of the scenes of 3 objects two share a colour or a shape (a
    grounding scene whose other objects are near misses of its target)."""
    pairs: list[tuple[str, str]] = []
    while len(pairs) < n:
        pair = (scenes.pick(rng, scenes.SHAPES), scenes.pick(rng, scenes.COLORS))
        if pair not in pairs:
            pairs.append(pair)
    return scenes.objects(rng, n, shapes=[s for s, _ in pairs], colors=[c for _, c in pairs])
