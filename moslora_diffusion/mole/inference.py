"""Images from a pipeline with MoLE attached: the app's checked requests and reproducible PNGs, plus the MoLE
settings (file, masked experts, extra scales) in the PNG's `parameters` text and the gate report of the call."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..generation.text_to_image import (
    GeneratedImage,
    GenerationRequest,
    format_infotext,
    make_scheduler,
    run_pipeline,
    validate_request,
)
from .model import MoLE


def mole_infotext(mole: MoLE, mole_name: str) -> dict[str, str]:
    """The MoLE pairs of a `parameters` text: which file, which experts masked, each expert's extra scale."""
    masked = [name for name, keep in zip(mole.expert_names, mole.keep.tolist(), strict=True) if not keep]
    pairs = {"MoLE": mole_name,
             "MoLE scales": ", ".join(f"{n}: {s:g}" for n, s in zip(mole.expert_names, mole.scales.tolist(),
                                                                     strict=True))}
    if masked:
        pairs["MoLE mask"] = " | ".join(masked)
    return pairs


def configure(mole: MoLE, masked: Sequence[str] = (), scales: Mapping[str, float] | None = None) -> None:
    """Masks experts (the others' gates renormalised) and sets extra scales; MoLEError names a wrong expert."""
    mole.set_mask(list(masked))
    mole.set_scales(dict.fromkeys(mole.expert_names, 1.0) | dict(scales or {}))


def generate_mole(pipe, mole: MoLE, req: GenerationRequest, model_name: str, mole_name: str
                  ) -> tuple[list[GeneratedImage], dict[str, list[float]]]:
    """Images for a validated request with the learned gates, and {block: mean gate weights} over the call
    (denoising steps, batch, and the guidance's unconditional half included)."""
    req = validate_request(req, [])
    pipe.scheduler = make_scheduler(req.scheduler, pipe.scheduler.config)
    mole.reset_report()
    images = run_pipeline(pipe, req, None)
    report = mole.gate_report()
    extra = mole_infotext(mole, mole_name)
    return [GeneratedImage(image, format_infotext(req, req.seed + i, {}, model_name, extra), "mole", req.seed + i)
            for i, image in enumerate(images)], report
