"""A regional composition as the prompt of A1111's Regional Prompter extension in latent mode.

Regional Prompter (github.com/hako-mikan/sd-webui-regional-prompter, its README) splits the image into a grid:
`Divide mode: Horizontal` with `Divide ratio: 1,1` puts two regions side by side; `Vertical` stacks them; a ratio
with `;` is a 2-D grid in Horizontal mode (each `;`-part is one row: its height first, then its columns' widths),
whose prompt separates columns by ADDCOL and rows by ADDROW. Regions are the prompt's `BREAK`-separated parts, left
to right and top to bottom; one `<lora:name:weight>` in a region's part applies that LoRA there in latent mode only
(attention mode mixes LoRAs across regions). Boxes become the grid's cells; a cell no box covers gets the global
prompt without a LoRA. Masks and overlapping boxes have no grid: `regional_prompter_text` says so instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .regions import Region

NOTE = ("Regional Prompter must run in LATENT calculation mode (Generation mode: Latent): only latent mode "
        "keeps each LoRA in its region. Forge does not support latent mode; use A1111 (or the ComfyUI workflow).")


class NoGrid(ValueError):
    """The layout is no grid of boxes (a mask, or boxes that overlap)."""


def _row_cells(regions: Sequence[Region], y0: float, y1: float) -> list[tuple[float, Region | None]]:
    """(width fraction, the box covering the cell or None) for each column of the row band y0..y1."""
    inside = [r for r in regions if r.box[1] <= y0 and r.box[3] >= y1]
    xs = sorted({0.0, 1.0} | {float(v) for r in inside for v in (r.box[0], r.box[2])})
    cells = []
    for x0, x1 in zip(xs, xs[1:], strict=False):
        owners = [r for r in inside if r.box[0] <= x0 and r.box[2] >= x1]
        if len(owners) > 1:
            raise NoGrid(f"the boxes of {owners[0].expert} and {owners[1].expert} overlap")
        cells.append((x1 - x0, owners[0] if owners else None))
    return cells


def grid(regions: Sequence[Region]) -> list[tuple[float, list[tuple[float, Region | None]]]]:
    """Rows top to bottom: (height fraction, cells left to right). NoGrid for masks or overlapping boxes."""
    masked = [r.expert for r in regions if r.box is None]
    if masked:
        raise NoGrid(f"{masked[0]} has a mask, not a box")
    ys = sorted({0.0, 1.0} | {float(v) for r in regions for v in (r.box[1], r.box[3])})
    return [(y1 - y0, _row_cells(regions, y0, y1)) for y0, y1 in zip(ys, ys[1:], strict=False)]


def _part(cell: Region | None, prompt: str, loras: Mapping[str, tuple[str, float]]) -> str:
    if cell is None:
        return prompt
    name, weight = loras[cell.expert]
    return f"{cell.prompt or prompt} <lora:{name}:{weight:g}>"


def _pixels(fractions: Sequence[float], side: int) -> str:
    return ",".join(str(max(1, round(f * side))) for f in fractions)


def regional_prompter_text(regions: Sequence[Region], loras: Mapping[str, tuple[str, float]], prompt: str,
                           negative: str, width: int, height: int) -> str:
    """The settings and prompt to paste into Regional Prompter. loras: {expert: (LoRA file stem, weight)}.
    Ratios are in pixels of the (width, height) image, as its README advises for accuracy."""
    try:
        rows = grid(regions)
    except NoGrid as err:
        return (f"No Regional Prompter matrix for this layout ({err}): its divide ratios describe a grid of boxes. "
                "Use Regional Prompter's mask divide mode with the masks/ PNGs instead, or the ComfyUI workflow.\n\n"
                + NOTE + "\n")
    if len(rows) == 1:
        mode, ratio = "Horizontal (regions side by side, left to right)", _pixels([w for w, _ in rows[0][1]], width)
        text = " BREAK\n".join(_part(c, prompt, loras) for _, c in rows[0][1])
    elif all(len(cells) == 1 for _, cells in rows):
        mode, ratio = "Vertical (regions stacked, top to bottom)", _pixels([h for h, _ in rows], height)
        text = " BREAK\n".join(_part(cells[0][1], prompt, loras) for _, cells in rows)
    else:
        mode = "Horizontal (rows top to bottom, each split into columns)"
        ratio = ";".join(_pixels([h], height) + "," + _pixels([w for w, _ in cells], width) for h, cells in rows)
        text = " ADDROW\n".join(" ADDCOL\n".join(_part(c, prompt, loras) for _, c in cells) for _, cells in rows)
    return ("Regional Prompter settings\n"
            f"  Active: on\n  Generation mode: Latent\n  Divide mode: {mode}\n  Divide ratio: {ratio}\n"
            "  Use base prompt: off\n\n"
            f"Prompt:\n{text}\n\nNegative prompt:\n{negative}\n\n{NOTE}\n")
