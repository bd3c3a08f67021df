"""Static export of MoLE: gates averaged per block over prompts, folded exactly into one standard LoRA.

With constant per-block weights w_i(b), every adapted layer of block b computes
W x + sum_i w_i(b) s_i up_i down_i x = W x + [w_1 s_1 up_1 | ... | w_N s_N up_N] [down_1; ...; down_N] x:
one LoRA of rank sum_i r_i, exact (formats/lora.py `combine` concatenates the ranks). It is written with the
project's own writers (kohya and diffusers LoRA, merged single file or diffusers folder through
formats/export_targets.py), so MoLE reaches A1111 and ComfyUI. Dynamic gates vary with the prompt, the
timestep and the sample; `static_gap` measures what averaging them costs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .._version import __version__
from ..formats.export_targets import DTYPES, TARGETS, ExportError, check_output, display_name, write_merged
from ..formats.lora import combine, save_diffusers_lora, save_kohya_lora
from ..generation.fusion import FusedAdapters
from ..models.families import detect_family
from ..moslora.folded import FoldedAdapter, FoldedLoRA
from .experts import MoLEError
from .gates import UNGATED
from .model import MoLE, attached_mole, detach_mole

Weights = Mapping[str, Sequence[float]]  # block name (and "ungated") -> N weights


def _prompts(mole: MoLE, prompts: Sequence[str] | None) -> list[str]:
    """The given prompts, else the experts' trigger prompts."""
    chosen = list(prompts) if prompts else list(dict.fromkeys(e.trigger_prompt for e in mole.experts
                                                              if e.trigger_prompt))
    if not chosen:
        raise MoLEError("no prompts to average the gates over: the experts record no trigger prompt; give some")
    return chosen


def _run(pipe, prompt: str, seed: int, steps: int, resolution: int | None) -> torch.Tensor:
    """Text encoder + `steps` UNet forwards on seeded random latents; no guidance (one prompt per sample)."""
    size = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    return pipe(prompt, num_inference_steps=steps, guidance_scale=1.0, height=size, width=size,
                output_type="latent", generator=torch.Generator().manual_seed(seed)).images


def average_gates(pipe, prompts: Sequence[str] | None = None, seeds: Sequence[int] = (0,), steps: int = 4,
                  resolution: int | None = None) -> dict[str, list[float]]:
    """{block: [w_1 .. w_N]}: the attached MoLE's gate weights averaged per block over prompts (default: the
    experts' trigger prompts), seeds, the `steps` denoising timesteps and the batch. Resets the gate report."""
    mole = _attached(pipe)
    prompts = _prompts(mole, prompts)
    mole.reset_report()
    runs = [(prompt, seed) for prompt in prompts for seed in seeds]
    for prompt, seed in tqdm(runs, desc="averaging the gates", unit="image", dynamic_ncols=True):
        _run(pipe, prompt, seed, steps, resolution)
    report = mole.gate_report()
    mole.reset_report()
    return report


def _attached(pipe) -> MoLE:
    mole = attached_mole(pipe)
    if mole is None:
        raise MoLEError("this pipeline has no MoLE attached")
    return mole


def _checked(mole: MoLE, weights: Weights) -> dict[str, list[float]]:
    needed = {b.name for b in mole.blocks} | ({UNGATED} if mole.has_ungated_layers else set())
    missing = sorted(needed - set(weights))
    if missing:
        raise MoLEError(f"static weights are missing blocks {missing[:3]}")
    out = {}
    for block in needed:
        values = [float(v) for v in weights[block]]
        if len(values) != len(mole.experts) or not all(math.isfinite(v) for v in values):
            raise MoLEError(f"{block}: static weights must be {len(mole.experts)} finite numbers, got {values}")
        out[block] = values
    return out


def static_fold(mole: MoLE, weights: Weights) -> dict[str, dict[str, FoldedLoRA]]:
    """component -> module -> one LoRA: down = cat_i down_i (rank sum r_i), up = cat_i w_i(b) s_i up_i.

    Exact for constant gates. weights: {block: N weights} for every block (and "ungated" when the experts adapt
    layers outside every block), e.g. `average_gates(...)` or `mole.gate_report()`. Zero-weight terms are left out.
    """
    weights = _checked(mole, weights)
    folds = []
    for i, expert in enumerate(mole.experts):
        fold: dict[str, dict[str, FoldedLoRA]] = {}
        for key, lora in expert.layers.items():
            factor = weights[mole.layer_blocks[key]][i] * float(mole.scales[i])
            if factor != 0.0:
                fold.setdefault(key[0], {})[key[1]] = lora.scaled(factor)
        folds.append(fold)
    folded = combine(folds)
    if not folded:
        raise MoLEError("every static weight is 0: nothing to export")
    return folded


def _record(mole: MoLE, weights: Weights, base: str, dtype: str, target: str) -> dict:
    """The export metadata, with export_targets.merge_record's keys (read by its modelspec writer)."""
    adapters = []
    for expert, scale in zip(mole.experts, mole.scales.tolist(), strict=True):
        entry = {"name": expert.name, "scale": scale, "kind": f"mole-expert ({expert.source_format})",
                 "rank": expert.rank, "sha256": expert.sha256}
        if expert.trigger_prompt:
            entry["instance_prompt"] = expert.trigger_prompt
        adapters.append(entry)
    return {"base": display_name(base), "adapters": adapters, "dtype": dtype, "target": target,
            "moslora_diffusion": __version__, "mole_static_weights": {k: list(v) for k, v in weights.items()}}


def export_static(pipe, weights: Weights, target: str, out: str | Path, dtype: str = "fp16",
                  overwrite: bool = False, base: str | None = None) -> Path:
    """Writes the static fold of the MoLE attached to `pipe` as `target` (export_targets.TARGETS).

    LoRA targets leave the pipeline as it was. Merged targets detach the MoLE and bake the fold into `pipe`'s
    weights for good (as the export command does). Raises ExportError / MoLEError before writing anything."""
    mole = _attached(pipe)
    if target not in TARGETS or dtype not in DTYPES:
        raise ExportError(f"unknown target {target!r} or dtype {dtype!r}; targets: {', '.join(TARGETS)}; "
                          f"dtypes: {', '.join(DTYPES)}")
    out = Path(out).expanduser()
    check_output(target, out, overwrite)
    folded = static_fold(mole, weights)
    base = str(base or getattr(pipe, "name_or_path", None) or "unknown base model")
    record = _record(mole, weights, base, dtype, target) | {"title": out.stem}
    if target == "lora-diffusers":
        return save_diffusers_lora(folded, out, record, DTYPES[dtype]).parent
    if target == "lora-kohya":
        return save_kohya_lora(folded, out, detect_family(pipe), dict(pipe.unet.config), record, DTYPES[dtype])
    detach_mole(pipe)
    layers = {(c, m): lora for c, modules in folded.items() for m, lora in modules.items()}
    FusedAdapters(pipe).add_folded(FoldedAdapter("mole-static", None, layers), scale=1.0)
    return write_merged(pipe, record, target, out, dtype, overwrite)


def _relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / a.float().norm().clamp_min(1e-12))


def static_gap(pipe, weights: Weights, prompts: Sequence[str] | None = None, seed: int = 0, steps: int = 4,
               resolution: int | None = None) -> dict:
    """How far the static export is from the dynamic gates, per prompt and on average:
    `unet_output_rel_l2` = ||eps_dyn - eps_static|| / ||eps_dyn|| of the first UNet forward (same latents; the
    prompt embedding differs when the text encoder is gated), `latents_rel_l2` the same for the final latents
    after `steps` denoising steps from the same seed. The static model is the MoLE with these fixed gates, which
    equals the exported fold to float precision (tests/test_mole_static.py)."""
    mole = _attached(pipe)
    prompts = _prompts(mole, prompts)
    previous = mole.fixed_weights_given
    first: list[torch.Tensor] = []

    def capture(module, args, output):
        if not first:
            first.append((output[0] if isinstance(output, tuple) else output.sample).detach().clone())

    handle = pipe.unet.register_forward_hook(capture)
    rows = []
    try:
        for prompt in prompts:
            outputs = []  # (first UNet output, final latents) with dynamic, then static gates
            for fixed in (None, weights):
                mole.set_fixed_gates(fixed)
                first.clear()
                latents = _run(pipe, prompt, seed, steps, resolution)
                outputs.append((first[0], latents))
            (eps_dynamic, dynamic), (eps_static, static) = outputs
            rows.append({"prompt": prompt, "unet_output_rel_l2": _relative_l2(eps_dynamic, eps_static),
                         "latents_rel_l2": _relative_l2(dynamic, static)})
    finally:
        handle.remove()
        mole.set_fixed_gates(previous)
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("unet_output_rel_l2", "latents_rel_l2")}
    return {**mean, "per_prompt": rows}
