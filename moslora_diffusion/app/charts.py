"""A loss curve drawn with PIL alone (no plotting library needed on the server)."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw

BACKGROUND, AXIS, RAW, SMOOTH = (255, 255, 255), (120, 120, 120), (190, 205, 235), (31, 90, 200)


def smooth(values: list[float], weight: float = 0.8) -> list[float]:
    """TensorBoard-style exponential moving average, debiased so the curve starts at the first value."""
    out, ema = [], 0.0
    for i, value in enumerate(values, start=1):
        ema = weight * ema + (1 - weight) * value
        out.append(ema / (1 - weight**i))
    return out


def loss_curve_image(points: list[tuple[int, float]], width: int = 520, height: int = 220) -> Image.Image:
    """Raw losses (light) and their moving average (dark) against the step, with min/max labels."""
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 56, 12, width - 12, height - 28
    draw.rectangle([left, top, right, bottom], outline=AXIS)
    points = [(s, v) for s, v in points if math.isfinite(v)]
    if not points:
        draw.text((left + 10, top + 10), "no loss reported yet", fill=AXIS)
        return image
    steps, losses = [s for s, _ in points], [v for _, v in points]
    lo, hi = min(losses), max(losses)
    hi = hi if hi > lo else lo + 1e-6
    first, last = steps[0], max(steps[-1], steps[0] + 1)

    def xy(step: float, value: float) -> tuple[float, float]:
        x = left + (right - left) * (step - first) / (last - first)
        return x, bottom - (bottom - top) * (value - lo) / (hi - lo)

    for series, colour, line_width in ((losses, RAW, 1), (smooth(losses), SMOOTH, 2)):
        coords = [xy(s, v) for s, v in zip(steps, series, strict=True)]
        if len(coords) == 1:
            x, y = coords[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        else:
            draw.line(coords, fill=colour, width=line_width)
    draw.text((4, top), f"{hi:.4g}", fill=AXIS)
    draw.text((4, bottom - 10), f"{lo:.4g}", fill=AXIS)
    draw.text((left, bottom + 8), f"step {first}", fill=AXIS)
    draw.text((right - 70, bottom + 8), f"step {steps[-1]}", fill=AXIS)
    return image
