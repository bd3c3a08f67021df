"""Text-to-image generation with fused adapters: checked requests, schedulers, reproducible PNGs.

Everything here is plain Python (no Gradio), so tests drive it directly on tiny models.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..files.atomic import save_new_image
from .fusion import FusedAdapters

MAX_SIDE = 2048
MAX_STEPS = 150
MAX_IMAGES = 8
MAX_GUIDANCE = 30.0
MAX_SEED = 2**32 - 1
# Label shown to users (and written as A1111's "Sampler") -> diffusers scheduler class.
SCHEDULERS = {
    "DPM++ 2M": "DPMSolverMultistepScheduler",
    "Euler": "EulerDiscreteScheduler",
    "Euler a": "EulerAncestralDiscreteScheduler",
    "DDIM": "DDIMScheduler",
    "PNDM": "PNDMScheduler",
}

Progress = Callable[[int, int], None]  # (steps done, steps in total)


class GenerationError(ValueError):
    """A request the app refuses; the message is shown to the user as is."""


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    seed: int = 0  # -1: pick one at random
    steps: int = 25
    guidance: float = 7.5
    width: int = 512
    height: int = 512
    num_images: int = 1
    scheduler: str = "DPM++ 2M"
    scales: dict[str, float] = field(default_factory=dict)
    compare_with_base: bool = False


@dataclass
class GeneratedImage:
    image: Image.Image
    infotext: str  # A1111-style parameters: enough to reproduce the image
    label: str  # "base" or "adapted"
    seed: int


def _as_int(value, name: str, problems: list[str]) -> int:
    try:
        number = float(value)
        if number != int(number):
            raise ValueError
        return int(number)
    except (TypeError, ValueError, OverflowError):
        problems.append(f"{name} must be a whole number, got {value!r}")
        return 0


def _check_ranges(req: GenerationRequest, problems: list[str]) -> None:
    for name, side in (("width", req.width), ("height", req.height)):
        if not 64 <= side <= MAX_SIDE or side % 8:
            problems.append(f"{name} must be a multiple of 8 between 64 and {MAX_SIDE} px, got {side}")
    if not 1 <= req.steps <= MAX_STEPS:
        problems.append(f"steps must be between 1 and {MAX_STEPS}, got {req.steps}")
    if not 1 <= req.num_images <= MAX_IMAGES:
        problems.append(f"number of images must be between 1 and {MAX_IMAGES}, got {req.num_images}")
    if not -1 <= req.seed <= MAX_SEED:
        problems.append(f"seed must be between 0 and {MAX_SEED} (or -1 for random), got {req.seed}")
    if not 0.0 <= req.guidance <= MAX_GUIDANCE:
        problems.append(f"guidance (CFG scale) must be between 0 and {MAX_GUIDANCE:g}, got {req.guidance}")
    if req.scheduler not in SCHEDULERS:
        problems.append(f"unknown scheduler {req.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")


def validate_request(req: GenerationRequest, loaded: list[str] | None = None) -> GenerationRequest:
    """A cleaned copy of `req` (numbers as ints, a concrete seed); every problem named at once."""
    problems: list[str] = []
    prompt = (req.prompt or "").strip()
    if not prompt:
        problems.append("enter a prompt")
    ints = {name: _as_int(getattr(req, name), name, problems) for name in ("seed", "steps", "width", "height",
                                                                            "num_images")}
    try:
        guidance = float(req.guidance)
    except (TypeError, ValueError):
        problems.append(f"guidance must be a number, got {req.guidance!r}")
        guidance = 0.0
    clean = replace(req, prompt=prompt, negative_prompt=(req.negative_prompt or "").strip(), guidance=guidance,
                    scales={k: float(v) for k, v in (req.scales or {}).items()}, **ints)
    _check_ranges(clean, problems)
    unknown = sorted(set(clean.scales) - set(loaded if loaded is not None else clean.scales))
    if unknown:
        problems.append(f"no adapter loaded named {', '.join(unknown)}")
    if problems:
        raise GenerationError("; ".join(problems))
    if clean.seed == -1:
        clean.seed = random.randint(0, MAX_SEED)
    return clean


def make_scheduler(label: str, config):
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[label])
    # Stable Diffusion runs PNDM as PLMS only: the Runge-Kutta warm-up steps break at low step counts.
    extra = {"skip_prk_steps": True} if label == "PNDM" else {}
    return cls.from_config(config, **extra)


def scheduler_label(scheduler) -> str:
    """The label of a pipeline's own scheduler, or DPM++ 2M when it is none of ours."""
    names = {cls: label for label, cls in SCHEDULERS.items()}
    return names.get(type(scheduler).__name__, "DPM++ 2M")


def format_infotext(req: GenerationRequest, seed: int, scales: dict[str, float], model: str) -> str:
    """A1111's `parameters` text: prompt, negative prompt line, then `key: value` pairs."""
    lines = [req.prompt]
    if req.negative_prompt:
        lines.append(f"Negative prompt: {req.negative_prompt}")
    pairs = {"Steps": req.steps, "Sampler": req.scheduler, "CFG scale": f"{req.guidance:g}", "Seed": seed,
             "Size": f"{req.width}x{req.height}", "Model": model}
    if scales:
        text = ", ".join(f"{name}: {value:g}" for name, value in scales.items())
        pairs["Lora scales"] = f'"{text}"' if "," in text else text  # A1111 quotes values holding commas
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs.items()))
    return "\n".join(lines)


_PAIR = re.compile(r'\s*([\w ]+):\s*("(?:[^"\\]|\\.)*"|[^,]*)(?:,|$)')


def parse_infotext(text: str, loaded: list[str] | None = None) -> GenerationRequest:
    """The request a `parameters` text describes (the inverse of format_infotext)."""
    *head, last = text.strip().split("\n")
    negative = ""
    if head and head[-1].startswith("Negative prompt: "):
        negative = head.pop()[len("Negative prompt: "):]
    pairs = {k.strip(): v.strip().strip('"') for k, v in _PAIR.findall(last)}
    width, height = (int(x) for x in pairs["Size"].split("x"))
    scales = {}
    for item in filter(None, pairs.get("Lora scales", "").split(",")):
        name, _, value = item.rpartition(":")
        scales[name.strip()] = float(value)
    return GenerationRequest("\n".join(head), negative, int(pairs["Seed"]), int(pairs["Steps"]),
                             float(pairs["CFG scale"]), width, height, 1, pairs["Sampler"], scales)


def _run(pipe, req: GenerationRequest, progress: Callable[[], None] | None) -> list[Image.Image]:
    generators = [torch.Generator().manual_seed(req.seed + i) for i in range(req.num_images)]

    def on_step(_pipe, _step, _timestep, kwargs):
        if progress is not None:
            progress()
        return kwargs

    return pipe(req.prompt, negative_prompt=req.negative_prompt or None, num_inference_steps=req.steps,
                guidance_scale=req.guidance, width=req.width, height=req.height, num_images_per_prompt=req.num_images,
                generator=generators, callback_on_step_end=on_step).images


def generate(pipe, fusion: FusedAdapters, req: GenerationRequest, model_name: str, scheduler_config=None,
             progress: Progress | None = None) -> list[GeneratedImage]:
    """Images for a validated request; with compare_with_base, base (all scales 0) and adapted per seed.

    The fused weights are held steady (fusion lock) for the whole call, so concurrent callers queue.
    """
    req = validate_request(req, fusion.names())
    scales = {name: req.scales.get(name, fusion.scales[name]) for name in fusion.names()}
    runs = [("base", dict.fromkeys(scales, 0.0))] if req.compare_with_base else []
    runs.append(("adapted" if req.compare_with_base or any(scales.values()) else "base", scales))
    total, done = req.steps * len(runs), [0]

    def tick():
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    results: dict[str, list[Image.Image]] = {}
    with fusion.locked():
        pipe.scheduler = make_scheduler(req.scheduler, scheduler_config or pipe.scheduler.config)
        for label, run_scales in runs:
            fusion.set_scales(run_scales)
            results[label] = _run(pipe, req, tick)
    images = []
    for i in range(req.num_images):  # base and adapted of one seed next to each other
        for label, run_scales in runs:
            text = format_infotext(req, req.seed + i, run_scales, model_name)
            images.append(GeneratedImage(results[label][i], text, label, req.seed + i))
    return images


def save_png(item: GeneratedImage, folder: str | Path) -> Path:
    """Writes <folder>/<date>/<n>-<seed>-<label>.png with the `parameters` text chunk.

    Through the atomic writer (files/atomic.py): never overwrites, two savers never share a name, and a
    full disk or a kill leaves no partial or empty PNG behind.
    """
    folder = Path(folder) / datetime.now().strftime("%Y-%m-%d")
    meta = PngInfo()
    meta.add_text("parameters", item.infotext)
    first = len(list(folder.glob("*.png"))) if folder.is_dir() else 0
    names = (f"{n:05d}-{item.seed}-{item.label}.png" for n in itertools.count(first))
    return save_new_image(item.image, folder, names, "PNG", pnginfo=meta)
