"""Scenes of the mini-MMEB: coloured shapes on a 3x3 grid, drawn with PIL, and their captions.

Images are small (84-112 px sides: at most 8x8 patches of 14 px, 16 merged tokens) pale
backgrounds with up to six objects; every object has a shape, a colour, a grid cell and a size,
and `draw` returns each object's bounding box so grounding subsets can crop single objects.

Sizes: an object spans SIZE_RANGE of the image's shorter side (18-36 px), so even the smallest
covers more than one 14-px patch; `centred` gives a classification image's single object in the
middle cell.
"""

import dataclasses

import numpy as np
import PIL.Image
import PIL.ImageDraw

MIN_SIDE, MAX_SIDE = 84, 112
# An object's width as a fraction of the image's shorter side (its cell is a third of it).
SIZE_RANGE = (0.22, 0.32)
CENTRE_CELL = 4

SHAPES = ("circle", "triangle", "square", "diamond", "pentagon", "hexagon", "star", "cross")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "orange": (245, 130, 20),
    "purple": (140, 40, 180),
    "black": (20, 20, 20),
    "pink": (240, 110, 180),
}
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
NUMBERS = ("one", "two", "three", "four", "five", "six")


@dataclasses.dataclass(frozen=True)
class Obj:
    """One drawn object: shape, colour name, grid cell (0..8, row-major) and width as a
    fraction of the image's shorter side."""

    shape: str
    color: str
    cell: int
    size: float


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a star or cross centred on (cx, cy) with outer radius r."""
    if shape == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        return [(cx + rr * np.cos(a), cy - rr * np.sin(a)) for a, rr in zip(angles, radii)]
    t = 0.35 * r  # half-width of the cross's bars
    pts = [
        (t, r),
        (t, t),
        (r, t),
        (r, -t),
        (t, -t),
        (t, -r),
        (-t, -r),
        (-t, -t),
        (-r, -t),
        (-r, t),
        (-t, t),
        (-t, r),
    ]
    return [(cx + x, cy + y) for x, y in pts]


def draw(
    rng: np.random.Generator,
    objects: list[Obj],
) -> tuple[PIL.Image.Image, list[tuple[int, int, int, int]]]:
    """Draws `objects` on a pale background of random size; returns the image and each
    object's bounding box (x0, y0, x1, y1)."""
    w, h = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
    grey = int(rng.integers(205, 246))
    image = PIL.Image.new("RGB", (w, h), (grey, grey, grey))
    canvas = PIL.ImageDraw.Draw(image)
    boxes = []
    for obj in objects:
        row, col = divmod(obj.cell, 3)
        r = obj.size * min(w, h) / 2
        # A small jitter inside the cell: neighbours of the largest size overlap by 2% at most.
        cx = (col + 0.5) * w / 3 + rng.uniform(-0.05, 0.05) * w / 3
        cy = (row + 0.5) * h / 3 + rng.uniform(-0.05, 0.05) * h / 3
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            canvas.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif obj.shape in ("star", "cross"):
            canvas.polygon(_polygon(obj.shape, cx, cy, r), fill=fill)
        else:
            sides = {"triangle": 3, "square": 4, "diamond": 4, "pentagon": 5, "hexagon": 6}
            rotation = {"diamond": 45}.get(obj.shape, 0)  # PIL draws a 4-gon axis-aligned
            canvas.regular_polygon((cx, cy, r), sides[obj.shape], rotation=rotation, fill=fill)
        boxes.append(
            (
                max(0, int(cx - r) - 2),
                max(0, int(cy - r) - 2),
                min(w, int(cx + r) + 3),
                min(h, int(cy + r) + 3),
            )
        )
    return image, boxes


def objects(rng: np.random.Generator, n: int, shapes=None, colors=None) -> list[Obj]:
    """n objects in distinct cells; shapes/colors fix them, else they are drawn at random."""
    cells = rng.choice(9, size=n, replace=False)
    shapes = shapes or [SHAPES[i] for i in rng.integers(0, len(SHAPES), size=n)]
    colors = colors or [list(COLORS)[i] for i in rng.integers(0, len(COLORS), size=n)]
    return [
        Obj(s, c, int(cell), float(rng.uniform(*SIZE_RANGE)))
        for s, c, cell in zip(shapes, colors, cells)
    ]


def centred(
    rng: np.random.Generator,
    shape: str | None = None,
    color: str | None = None,
    size_range: tuple[float, float] = SIZE_RANGE,
) -> Obj:
    """One object in the centre cell (a classification image's); shape/color as `objects`,
    its width drawn from `size_range` (fractions of the shorter side)."""
    shape = shape or SHAPES[int(rng.integers(0, len(SHAPES)))]
    color = color or list(COLORS)[int(rng.integers(0, len(COLORS)))]
    return Obj(shape, color, CENTRE_CELL, float(rng.uniform(*size_range)))


def pick(rng: np.random.Generator, items, k: int | None = None):
    """One item (k=None) or k distinct items of `items`, drawn at random."""
    items = list(items)
    if k is None:
        return items[int(rng.integers(0, len(items)))]
    return [items[i] for i in rng.choice(len(items), size=k, replace=False)]


def plural(shape: str, count: int) -> str:
    if count == 1:
        return shape
    return shape + ("es" if shape == "cross" else "s")


def caption(objects: list[Obj]) -> str:
    """'two red circles and a blue star': objects grouped by colour and shape."""
    groups: dict[tuple[str, str], int] = {}
    for o in sorted(objects, key=lambda o: o.cell):
        groups[(o.color, o.shape)] = groups.get((o.color, o.shape), 0) + 1
    article = lambda color: "an" if color[0] in "aeiou" else "a"
    parts = [
        f"{article(color) if n == 1 else NUMBERS[n - 1]} {color} {plural(shape, n)}"
        for (color, shape), n in groups.items()
    ]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def crop(image: PIL.Image.Image, box) -> PIL.Image.Image:
    return image.crop(box)
