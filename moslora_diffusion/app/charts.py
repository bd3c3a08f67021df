"""Training charts drawn with PIL alone (no plotting library needed on the server): the loss curve (with the
held-out validation loss when the run has one) and the validation scores, each against the step."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw

BACKGROUND, AXIS, RAW, SMOOTH, HELD_OUT = (255, 255, 255), (120, 120, 120), (190, 205, 235), (31, 90, 200), \
    (220, 110, 20)
# One colour per score series, in the order the series first appear (metric names sorted).
SERIES_COLOURS = ((31, 90, 200), (220, 110, 20), (40, 150, 70), (180, 40, 60), (120, 70, 170), (20, 150, 160))
WIDTH, HEIGHT = 520, 220


def smooth(values: list[float], weight: float = 0.8) -> list[float]:
    """TensorBoard-style exponential moving average, debiased so the curve starts at the first value."""
    out, ema = [], 0.0
    for i, value in enumerate(values, start=1):
        ema = weight * ema + (1 - weight) * value
        out.append(ema / (1 - weight**i))
    return out


class _Axes:
    """A framed plot area mapping (step, value) to pixels over the given points' ranges, with min/max labels."""

    def __init__(self, draw: ImageDraw.ImageDraw, width: int, height: int, points: list[tuple[int, float]]):
        self.draw = draw
        self.left, self.top, self.right, self.bottom = 56, 12, width - 12, height - 28
        steps, values = [s for s, _ in points], [v for _, v in points]
        self.lo, self.hi = min(values), max(values)
        self.hi = self.hi if self.hi > self.lo else self.lo + 1e-6
        self.first, self.last_step = min(steps), max(steps)
        self.last = max(self.last_step, self.first + 1)

    def xy(self, step: float, value: float) -> tuple[float, float]:
        x = self.left + (self.right - self.left) * (step - self.first) / (self.last - self.first)
        return x, self.bottom - (self.bottom - self.top) * (value - self.lo) / (self.hi - self.lo)

    def series(self, points: list[tuple[int, float]], colour: tuple, width: int = 2, dots: bool = False) -> None:
        coords = [self.xy(s, v) for s, v in points]
        if len(coords) > 1:
            self.draw.line(coords, fill=colour, width=width)
        if dots or len(coords) == 1:  # a single point, or few sparse ones (validations), stays visible
            for x, y in coords:
                self.draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)

    def labels(self) -> None:
        self.draw.text((4, self.top), f"{self.hi:.4g}", fill=AXIS)
        self.draw.text((4, self.bottom - 10), f"{self.lo:.4g}", fill=AXIS)
        self.draw.text((self.left, self.bottom + 8), f"step {self.first}", fill=AXIS)
        self.draw.text((self.right - 70, self.bottom + 8), f"step {self.last_step}", fill=AXIS)


def _canvas(width: int, height: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.rectangle([56, 12, width - 12, height - 28], outline=AXIS)
    return image, draw


def _finite(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    return [(s, v) for s, v in points if math.isfinite(v)]


def loss_curve_image(points: list[tuple[int, float]], held_out: list[tuple[int, float]] | None = None,
                     width: int = WIDTH, height: int = HEIGHT) -> Image.Image:
    """Raw losses (light) and their moving average (dark) against the step, with min/max labels; `held_out`
    (step, val_loss) points (orange, dotted line) share the axis: the same MSE, on photos never trained on."""
    image, draw = _canvas(width, height)
    points, held_out = _finite(points), _finite(held_out or [])
    if not points and not held_out:
        draw.text((66, 22), "no loss reported yet", fill=AXIS)
        return image
    axes = _Axes(draw, width, height, points + held_out)
    if points:
        steps = [s for s, _ in points]
        axes.series(points, RAW, width=1)
        axes.series(list(zip(steps, smooth([v for _, v in points]), strict=True)), SMOOTH)
    if held_out:
        axes.series(held_out, HELD_OUT, dots=True)
        draw.text((axes.left + 6, axes.top + 4), "held-out loss", fill=HELD_OUT)
    axes.labels()
    return image


def scores_chart_image(scores: list[tuple[int, dict[str, float]]], width: int = WIDTH,
                       height: int = HEIGHT) -> Image.Image:
    """Each validation score (--validation_metrics: dino, clip_i, clip_t or toy_subject, toy_prompt) against the
    step, one colour per metric with its name and latest value; a placeholder text while there are none."""
    image, draw = _canvas(width, height)
    names = sorted({name for _, record in scores for name in record})
    series = {name: _finite([(s, float(r[name])) for s, r in scores if name in r]) for name in names}
    series = {name: points for name, points in series.items() if points}
    if not series:
        draw.text((66, 22), "no validation scores yet", fill=AXIS)
        return image
    axes = _Axes(draw, width, height, [p for points in series.values() for p in points])
    for i, (name, points) in enumerate(series.items()):
        colour = SERIES_COLOURS[i % len(SERIES_COLOURS)]
        axes.series(points, colour, dots=True)
        draw.text((axes.left + 6, axes.top + 4 + 12 * i), f"{name} {points[-1][1]:.3f}", fill=colour)
    axes.labels()
    return image
