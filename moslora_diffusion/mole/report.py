"""A picture of which expert each block chose: the gate weights as a heat map (blocks x experts), Pillow only."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..files.atomic import atomic_write

CELL_W, CELL_H, PAD = 64, 18, 6
LOW, HIGH = (255, 255, 255), (33, 102, 172)  # weight 0 white, weight 1 dark blue


def _colour(weight: float) -> tuple[int, int, int]:
    w = min(max(weight, 0.0), 1.0)
    return tuple(round(lo + (hi - lo) * w) for lo, hi in zip(LOW, HIGH, strict=True))


def render_gate_heatmap(report: Mapping[str, Sequence[float]], expert_names: Sequence[str],
                        title: str | None = None) -> Image.Image:
    """One row per block (as `MoLE.gate_report()` names them), one column per expert, each cell shaded by its
    weight in [0, 1] and labelled with it. Raises ValueError for an empty report or a row of the wrong length."""
    if not report:
        raise ValueError("the gate report is empty: generate (or run a forward) with MoLE attached first")
    for block, weights in report.items():
        if len(weights) != len(expert_names):
            raise ValueError(f"{block}: {len(weights)} weights for {len(expert_names)} experts")
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(int(probe.textlength(name, font=font)) for name in report) + 2 * PAD
    top = CELL_H * (2 if title else 1)
    width = label_w + CELL_W * len(expert_names) + PAD
    height = top + CELL_H * len(report) + PAD
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((PAD, 3), title, fill="black", font=font)
    for j, name in enumerate(expert_names):
        draw.text((label_w + j * CELL_W + 3, top - CELL_H + 3), name[:10], fill="black", font=font)
    for i, (block, weights) in enumerate(report.items()):
        y = top + i * CELL_H
        draw.text((PAD, y + 3), block, fill="black", font=font)
        for j, weight in enumerate(weights):
            x = label_w + j * CELL_W
            draw.rectangle((x, y, x + CELL_W - 2, y + CELL_H - 2), fill=_colour(float(weight)))
            draw.text((x + 4, y + 3), f"{float(weight):.2f}", fill="white" if weight > 0.55 else "black", font=font)
    return image


def save_gate_heatmap(report: Mapping[str, Sequence[float]], expert_names: Sequence[str], path: str | Path,
                      title: str | None = None) -> Path:
    """Writes the heat map as a PNG, atomically."""
    image = render_gate_heatmap(report, expert_names, title)
    return atomic_write(Path(path), lambda tmp: image.save(tmp, format="PNG"))
