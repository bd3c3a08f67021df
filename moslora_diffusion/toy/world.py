"""A deterministic procedural toy world: one coloured shape on a (textured) background, with a caption.

    scene = sample_scene(np.random.default_rng(0))
    render(scene)            # 64x64 PIL image, antialiased (drawn at 4x, box-downsampled)
    caption(scene)           # "a photo of a small red star on the left, on a blue striped background"
    caption(scene, rng)      # the same with some attributes left out at random (the model learns defaults)

Every shape is drawn to fill a square box of `scene.size_px` pixels centred at the scene's anchor, so the
checker can recognise a class by rendering the same template at a detected bounding box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

RESOLUTION = 64
SUPERSAMPLE = 4

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (245, 220, 40), "green": (50, 170, 60),
    "blue": (40, 80, 220), "purple": (140, 60, 190), "pink": (245, 130, 190), "white": (245, 245, 245),
    "black": (25, 25, 25), "gray": (128, 128, 128),
}
OBJECT_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "white")
BACKGROUND_COLOURS = tuple(COLOURS)
CLASSES = ("circle", "square", "triangle", "star", "heart", "cross", "ring", "diamond")
SIZES = {"small": 18, "large": 30}  # box side in pixels at 64 px
POSITIONS = {  # anchor (x, y) of the box centre, and how a caption says it
    "left": ((19, 32), "on the left"), "right": ((45, 32), "on the right"), "top": ((32, 19), "at the top"),
    "bottom": ((32, 45), "at the bottom"), "center": ((32, 32), "in the center"),
}
TEXTURES = {"plain": "plain", "stripes": "striped", "dots": "dotted", "checker": "checkered"}
# The background concept's texture (toy/concepts.py): horizontal zigzag bands of a fixed colour (green) over
# the background colour (blue in every concept photo), a pair no world texture has. Pretraining never draws
# it, so it is not in TEXTURES.
ZIGZAG = "zigzag"
ZIGZAG_COLOURS = ("blue", "green")
ZIGZAG_PERIOD = 16  # px: a band pair's height and a tooth's width at 64 px
ZIGZAG_AMPLITUDE = 4  # px: how far a band edge rises and falls
JITTER = 2  # pixels of random offset around an anchor
MIN_OBJECT_BG_DISTANCE = 100.0  # RGB distance: object vs background, so the checker can segment it
MIN_OBJECT_SHADE_DISTANCE = 80.0  # object vs the texture's second colour


@dataclass(frozen=True)
class Fill:
    """A patterned object fill (the toy subjects, and VAE training variety): two colours in diagonal stripes
    (with an optional centre dot) or, with kind "checker", in an axis-aligned checkerboard."""

    stripes: tuple[tuple[int, int, int], tuple[int, int, int]]  # the pattern's two colours
    dot: tuple[int, int, int] | None = None
    period: float = 0.45  # stripe period, or a checker cell's side, as a fraction of the box side
    kind: str = "stripes"  # "stripes" | "checker"


@dataclass(frozen=True)
class Scene:
    cls: str
    colour: str
    size: str
    position: str
    background: str
    texture: str
    dx: int = 0
    dy: int = 0
    size_px: int | None = None  # None: the size word's box side
    fill: Fill | None = None

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the shape's square box in 64 px coordinates."""
        (cx, cy), _ = POSITIONS[self.position]
        side = self.size_px or SIZES[self.size]
        cx, cy = cx + self.dx, cy + self.dy
        return cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2


def inside_frame(scene: Scene, margin: int = 2) -> bool:
    """Whether the scene's box keeps `margin` px off every image edge (the checker reads the background
    from a 2 px border; every `sample_scene` box does)."""
    return min(scene.box) >= margin and max(scene.box) <= RESOLUTION - margin


def vocabulary() -> tuple[str, ...]:
    """Every word a caption can contain (each becomes a single token of the toy tokenizer)."""
    words = ["a", "an", "photo", "of", "on", "the", "at", "in", "background", *SIZES, *OBJECT_COLOURS,
             *BACKGROUND_COLOURS, *CLASSES, *TEXTURES.values()]
    for _, phrase in POSITIONS.values():
        words += phrase.split()
    return tuple(dict.fromkeys(words))


def shade(background: str) -> tuple[int, int, int]:
    """The second colour of a textured background: the background pushed 30% towards white or black."""
    rgb = np.array(COLOURS[background], dtype=float)
    target = 0.0 if rgb.mean() > 128 else 255.0
    return tuple(int(round(v)) for v in rgb + 0.3 * (target - rgb))


def second_colour(background: str, texture: str) -> tuple[int, int, int]:
    """The texture's second colour: the zigzag's fixed one, every other texture's shade of the background."""
    return COLOURS[ZIGZAG_COLOURS[1]] if texture == ZIGZAG else shade(background)


def colour_distance(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)))


def compatible(colour: str, background: str) -> bool:
    """Whether an object of `colour` stands out from `background` and its texture shade."""
    return (colour_distance(COLOURS[colour], COLOURS[background]) >= MIN_OBJECT_BG_DISTANCE
            and colour_distance(COLOURS[colour], shade(background)) >= MIN_OBJECT_SHADE_DISTANCE)


def is_held_out(scene: Scene) -> bool:
    """About 1 in 9 (class, colour, background) combinations never appear in pretraining, for evaluation."""
    key = CLASSES.index(scene.cls) * 3 + OBJECT_COLOURS.index(scene.colour) * 5 + BACKGROUND_COLOURS.index(
        scene.background) * 7
    return key % 9 == 0


def sample_scene(rng: np.random.Generator, split: str = "all") -> Scene:
    """A random scene; split "train" excludes held-out combinations, "heldout" draws only those."""
    while True:
        colour = OBJECT_COLOURS[rng.integers(len(OBJECT_COLOURS))]
        background = BACKGROUND_COLOURS[rng.integers(len(BACKGROUND_COLOURS))]
        scene = Scene(
            cls=CLASSES[rng.integers(len(CLASSES))], colour=colour, size=tuple(SIZES)[rng.integers(len(SIZES))],
            position=tuple(POSITIONS)[rng.integers(len(POSITIONS))], background=background,
            texture=tuple(TEXTURES)[rng.integers(len(TEXTURES))],
            dx=int(rng.integers(-JITTER, JITTER + 1)), dy=int(rng.integers(-JITTER, JITTER + 1)),
        )
        if not compatible(colour, background):
            continue
        if split == "all" or (split == "heldout") == is_held_out(scene):
            return scene


def caption(scene: Scene, rng: np.random.Generator | None = None, omit: float = 0.3) -> str:
    """The scene's caption; with `rng`, each of size, colour, position and background is left out with
    probability `omit` (colour half as often) and the texture word ("plain" always) more often."""

    def keep(p: float) -> bool:
        return rng is None or rng.random() >= p

    words = [scene.size] if keep(omit) else []
    words += [scene.colour] if keep(omit / 2) else []
    noun = " ".join(words + [scene.cls])
    article = "an" if noun[0] in "aeiou" else "a"
    text = f"a photo of {article} {noun}"
    if keep(omit):
        text += " " + POSITIONS[scene.position][1]
    if keep(omit):
        text += background_phrase(scene.background, scene.texture, keep, omit)
    return text


def background_phrase(background: str, texture: str, keep, omit: float) -> str:
    """", on a blue striped background"; `keep(p)` says whether a word left out with probability p stays
    (the texture word: "plain" more often left out)."""
    show_texture = keep(0.6) if texture == "plain" else keep(omit)
    bg = f"{background} {TEXTURES[texture]}" if show_texture else background
    return f", on {'an' if bg[0] in 'aeiou' else 'a'} {bg} background"


# ---- rendering -------------------------------------------------------------------------------------------

def _star(points: int = 5, inner: float = 0.4) -> list[tuple[float, float]]:
    return [(math.cos(math.pi * k / points - math.pi / 2) * (1 if k % 2 == 0 else inner),
             math.sin(math.pi * k / points - math.pi / 2) * (1 if k % 2 == 0 else inner)) for k in range(2 * points)]


def _heart(n: int = 96) -> list[tuple[float, float]]:
    ts = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return [(16 * math.sin(t) ** 3, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)))
            for t in ts]


def _normalise(points) -> list[tuple[float, float]]:
    """Scales a polygon to touch all four sides of the unit box."""
    pts = np.asarray(points, dtype=float)
    lo, hi = pts.min(0), pts.max(0)
    return [tuple(p) for p in (pts - lo) / (hi - lo)]


def _ellipse(n: int = 96, r: float = 1.0) -> list[tuple[float, float]]:
    ts = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return [(0.5 + 0.5 * r * math.cos(t), 0.5 + 0.5 * r * math.sin(t)) for t in ts]


ARM = 0.36  # width of the cross's arms, as a fraction of the box
SHAPES: dict[str, list[list[tuple[float, float]]]] = {  # polygons in the unit box; a ring's second one is the hole
    "circle": [_ellipse()],
    "square": [[(0, 0), (1, 0), (1, 1), (0, 1)]],
    "triangle": [[(0.5, 0), (1, 1), (0, 1)]],
    "star": [_normalise(_star())],
    "heart": [_normalise(_heart())],
    "cross": [[(a, b) for a, b in ((0.5 - ARM / 2, 0), (0.5 + ARM / 2, 0), (0.5 + ARM / 2, 0.5 - ARM / 2),
                                   (1, 0.5 - ARM / 2), (1, 0.5 + ARM / 2), (0.5 + ARM / 2, 0.5 + ARM / 2),
                                   (0.5 + ARM / 2, 1), (0.5 - ARM / 2, 1), (0.5 - ARM / 2, 0.5 + ARM / 2),
                                   (0, 0.5 + ARM / 2), (0, 0.5 - ARM / 2), (0.5 - ARM / 2, 0.5 - ARM / 2))]],
    "ring": [_ellipse(), _ellipse(r=0.55)],
    "diamond": [[(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)]],
}


def shape_mask(cls: str, box: tuple[float, float, float, float], size: tuple[int, int], scale: int = 1) -> Image.Image:
    """An "L" mask of `cls` filling `box` (coordinates in 1x pixels) on a canvas of `size` * `scale`."""
    x0, y0, x1, y1 = box
    mask = Image.new("L", (size[0] * scale, size[1] * scale), 0)
    draw = ImageDraw.Draw(mask)
    for i, poly in enumerate(SHAPES[cls]):
        pts = [((x0 + u * (x1 - x0)) * scale, (y0 + v * (y1 - y0)) * scale) for u, v in poly]
        draw.polygon(pts, fill=0 if i else 255)  # later polygons cut holes
    return mask


@lru_cache(maxsize=64)
def _background(background: str, texture: str) -> Image.Image:
    s = SUPERSAMPLE
    img = Image.new("RGB", (RESOLUTION * s, RESOLUTION * s), COLOURS[background])
    draw, second = ImageDraw.Draw(img), second_colour(background, texture)
    n = RESOLUTION * s
    if texture == ZIGZAG:
        _zigzag(draw, n, second)
    elif texture == "stripes":  # diagonal bands, 6 px wide every 12 px
        for k in range(-n, n, 12 * s):
            draw.polygon([(k, 0), (k + 6 * s, 0), (k + 6 * s + n, n), (k + n, n)], fill=second)
    elif texture == "dots":  # the grid starts on the image edge, so the border shows both colours
        for y in range(0, n + 1, 10 * s):
            for x in range(0, n + 1, 10 * s):
                draw.ellipse([x - 2 * s, y - 2 * s, x + 2 * s, y + 2 * s], fill=second)
    elif texture == "checker":
        _checker(draw, n, (0, 0), 8 * s, second)
    return img


def _zigzag(draw: ImageDraw.ImageDraw, n: int, colour) -> None:
    """Bands of `colour` half a period high whose edges rise and fall by the amplitude every half tooth."""
    s, period, amp = n // RESOLUTION, ZIGZAG_PERIOD, ZIGZAG_AMPLITUDE
    xs = np.arange(0, RESOLUTION + period, period / 2)
    wave = [(x * s, (amp if i % 2 else -amp) * s) for i, x in enumerate(xs)]
    for top in range(-period, RESOLUTION + period, period):
        upper = [(x, top * s + dy) for x, dy in wave]
        lower = [(x, (top + period / 2) * s + dy) for x, dy in reversed(wave)]
        draw.polygon(upper + lower, fill=colour)


def _checker(draw: ImageDraw.ImageDraw, n: int, origin: tuple[float, float], cell: float, colour) -> None:
    """Cells of `colour` on every other square of a grid of side `cell` whose corner is `origin` (px)."""
    x0, y0 = origin
    first_col, first_row = math.floor(-x0 / cell), math.floor(-y0 / cell)
    for row in range(first_row, first_row + int(n / cell) + 2):
        for col in range(first_col, first_col + int(n / cell) + 2):
            if (row + col) % 2:
                x, y = x0 + col * cell, y0 + row * cell
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=colour)


def _fill_image(fill: Fill, box, scale: int) -> Image.Image:
    """The patterned fill over the whole canvas, its stripe phase tied to the box (so it moves with the object)."""
    n = RESOLUTION * scale
    img = Image.new("RGB", (n, n), fill.stripes[0])
    draw = ImageDraw.Draw(img)
    x0, y0, x1, _ = box
    period = fill.period * (x1 - x0) * scale
    if fill.kind == "checker":  # the grid starts at the box corner, so the pattern moves with the object
        _checker(draw, n, (x0 * scale, y0 * scale), period, fill.stripes[1])
        return img
    start = (x0 - y0) * scale - 2 * n
    for k in np.arange(start, 2 * n, period):  # bands where (x - y) - k in [period/2, period), as the background's
        a = k + period / 2
        draw.polygon([(a, 0), (a + period / 2, 0), (a + period / 2 + n, n), (a + n, n)], fill=fill.stripes[1])
    if fill.dot is not None:
        cx, cy, r = (x0 + x1) / 2 * scale, (y0 + box[3]) / 2 * scale, 0.12 * (x1 - x0) * scale
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill.dot)
    return img


def render(scene: Scene) -> Image.Image:
    """The scene as a 64x64 RGB image: drawn at 4x and box-downsampled, so edges are antialiased."""
    return render_objects(scene.background, scene.texture, [scene])


def render_objects(background: str, texture: str, objects) -> Image.Image:
    """Every scene of `objects` (their own background fields ignored) drawn in turn on one background: the
    64x64 image of a one- or two-object scene (pairs.py)."""
    s = SUPERSAMPLE
    img = _background(background, texture).copy()
    for scene in objects:
        mask = shape_mask(scene.cls, scene.box, (RESOLUTION, RESOLUTION), scale=s)
        top = _fill_image(scene.fill, scene.box, s) if scene.fill else Image.new("RGB", img.size, COLOURS[scene.colour])
        img.paste(top, (0, 0), mask)
    return img.reduce(s)


def render_mask(scene: Scene) -> Image.Image:
    """The object's pixels of `render(scene)` as a 64x64 "L" mask (255 = object), antialiased the same way: the
    subject mask of a toy photo for --masked_loss."""
    s = SUPERSAMPLE
    return shape_mask(scene.cls, scene.box, (RESOLUTION, RESOLUTION), scale=s).reduce(s)


def with_fill(scene: Scene, fill: Fill | None) -> Scene:
    return replace(scene, fill=fill)
