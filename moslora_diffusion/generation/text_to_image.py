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

from ..checks import MAX_SEED, SCALE, Range, number_problems
from ..files.atomic import save_new_image
from ..models.families import native_size  # noqa: F401  (its callers import it from here too)
from .fusion import FusedAdapters
from .long_prompts import warn_long_prompts

MAX_SIDE = 2048
MAX_STEPS = 150
MAX_IMAGES = 8
MAX_GUIDANCE = 30.0
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
class MoLESettings:
    """A MoLE composition as a request and a `parameters` text give it (the pairs mole/inference.py writes:
    `MoLE`, `MoLE scales`, `MoLE mask`)."""

    file: str  # the MoLE file's name (the app's: its training folder's name, else the file's stem)
    scales: dict[str, float] = field(default_factory=dict)  # expert -> extra scale s_i (default 1)
    masked: list[str] = field(default_factory=list)  # experts left out; the others' gates renormalised


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
    mole: MoLESettings | None = None  # a MoLE generation's composition (None: weighted sum of `scales`)


@dataclass
class GeneratedImage:
    image: Image.Image
    infotext: str  # A1111-style parameters: enough to reproduce the image
    label: str  # "base" or "adapted"
    seed: int


# Every number of a request, with where it may lie (checked in one place, validate_request).
REQUEST_RANGES = {
    "seed": Range(-1, MAX_SEED, integer=True),  # -1: a random seed
    "steps": Range(1, MAX_STEPS, integer=True),
    "width": Range(64, MAX_SIDE, integer=True, multiple_of=8),
    "height": Range(64, MAX_SIDE, integer=True, multiple_of=8),
    "num_images": Range(1, MAX_IMAGES, integer=True, label="number of images"),
    "guidance": Range(0.0, MAX_GUIDANCE, label="guidance (CFG scale)"),
}

# What a request's problem says, as the command lines name it (their flags; the app shows its own labels).
COMMAND_FLAGS = (("enter a prompt", "--prompt is empty: enter a prompt"), ("steps ", "--steps "),
                 ("guidance (CFG scale) ", "--guidance "), ("width ", "--size "), ("height ", "--size "),
                 ("seed ", "--seeds: seed "), ("unknown scheduler ", "--sampler: unknown scheduler "))


def command_line_problems(message: str) -> str:
    """A GenerationError's message with each problem named by its command-line flag: "--steps must be ...", not
    "steps must be ..." (the setting's name in the app). Problems of no flag stay as they are."""
    problems = message.split("; ")
    for i, problem in enumerate(problems):
        for said, flag in COMMAND_FLAGS:
            if problem.startswith(said):
                problems[i] = flag + problem[len(said):]
                break
    return "; ".join(dict.fromkeys(problems))  # --size sets both sides: one problem, said once


def validate_request(req: GenerationRequest, loaded: list[str] | None = None) -> GenerationRequest:
    """A cleaned copy of `req` (numbers as ints, a concrete seed); every problem named at once.

    Raises GenerationError (one line) for an empty prompt, a number that is not finite or out of range
    (REQUEST_RANGES; adapter scales within SCALE_MIN..SCALE_MAX), an unknown scheduler or adapter.
    """
    problems: list[str] = []
    prompt = (req.prompt or "").strip()
    if not prompt:
        problems.append("enter a prompt")
    numbers = {name: getattr(req, name) for name in REQUEST_RANGES}
    problems += number_problems(numbers, REQUEST_RANGES)
    scales = dict(req.scales or {})
    problems += number_problems(scales, dict.fromkeys(scales, SCALE), "scale of {!r}")
    mole = replace(req.mole, scales=dict(req.mole.scales), masked=list(req.mole.masked)) if req.mole else None
    if mole is not None:  # the experts' extra scales take the range of every adapter scale
        problems += number_problems(mole.scales, dict.fromkeys(mole.scales, SCALE), "scale of expert {!r}")
    if req.scheduler not in SCHEDULERS:
        problems.append(f"unknown scheduler {req.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    unknown = sorted(set(scales) - set(loaded if loaded is not None else scales))
    if unknown:
        problems.append(f"no adapter loaded named {', '.join(unknown)}")
    if problems:
        raise GenerationError("; ".join(problems))
    if mole is not None:
        mole.scales = {k: SCALE.clean(v) for k, v in mole.scales.items()}
    clean = replace(req, prompt=prompt, negative_prompt=(req.negative_prompt or "").strip(),
                    scales={k: SCALE.clean(v) for k, v in scales.items()}, mole=mole,
                    **{name: REQUEST_RANGES[name].clean(value) for name, value in numbers.items()})
    if clean.seed == -1:
        clean.seed = random.randint(0, MAX_SEED)
    return clean


def validate_command_request(req: GenerationRequest, loaded: list[str] | None = None) -> GenerationRequest:
    """validate_request for the command lines: a problem names its flag (command_line_problems)."""
    try:
        return validate_request(req, loaded)
    except GenerationError as err:
        raise GenerationError(command_line_problems(str(err))) from None


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


def format_infotext(req: GenerationRequest, seed: int, scales: dict[str, float], model: str,
                    extra: dict[str, str] | None = None) -> str:
    """A1111's `parameters` text: prompt, negative prompt line, then `key: value` pairs (`extra` last: e.g. the
    MoLE file, mask and expert scales of a MoLE image)."""
    lines = [req.prompt]
    if req.negative_prompt:
        lines.append(f"Negative prompt: {req.negative_prompt}")
    pairs = {"Steps": req.steps, "Sampler": req.scheduler, "CFG scale": f"{req.guidance:g}", "Seed": seed,
             "Size": f"{req.width}x{req.height}", "Model": model}
    if scales:
        text = ", ".join(f"{name}: {value:g}" for name, value in scales.items())
        pairs["Lora scales"] = f'"{text}"' if "," in text else text  # A1111 quotes values holding commas
    for key, text in (extra or {}).items():
        pairs[key] = f'"{text}"' if "," in text else text
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs.items()))
    return "\n".join(lines)


_PAIR = re.compile(r'\s*([\w ]+):\s*("(?:[^"\\]|\\.)*"|[^,]*)(?:,|$)')


def _named_scales(text: str) -> dict[str, float]:
    """`name: 1.2, other: 0.8` -> {name: 1.2, other: 0.8}."""
    scales = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.rpartition(":")
        scales[name.strip()] = float(value)
    return scales


def parse_infotext(text: str, loaded: list[str] | None = None) -> GenerationRequest:
    """The request a `parameters` text describes (the inverse of format_infotext, MoLE pairs included)."""
    *head, last = text.strip().split("\n")
    negative = ""
    if head and head[-1].startswith("Negative prompt: "):
        negative = head.pop()[len("Negative prompt: "):]
    pairs = {k.strip(): v.strip().strip('"') for k, v in _PAIR.findall(last)}
    width, height = (int(x) for x in pairs["Size"].split("x"))
    mole = None
    if pairs.get("MoLE"):
        mole = MoLESettings(pairs["MoLE"], _named_scales(pairs.get("MoLE scales", "")),
                            [n.strip() for n in pairs.get("MoLE mask", "").split("|") if n.strip()])
    return GenerationRequest("\n".join(head), negative, int(pairs["Seed"]), int(pairs["Steps"]),
                             float(pairs["CFG scale"]), width, height, 1, pairs["Sampler"],
                             _named_scales(pairs.get("Lora scales", "")), mole=mole)


def run_pipeline(pipe, req: GenerationRequest, progress: Callable[[], None] | None,
                 embeddings: dict | None = None,
                 step_latents: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> list[Image.Image]:
    """The request's images, one generator per image (seed, seed + 1, ...). embeddings: the prompt already encoded
    (`prompt_embeds`, `negative_prompt_embeds`, SDXL's pooled ones, batch 1) instead of the prompt texts.
    step_latents(step, latents) -> latents: runs after every denoising step (0-based) on the (B, C, h, w) latents
    and returns the ones the next step continues from (composition's inpaint blend)."""
    generators = [torch.Generator().manual_seed(req.seed + i) for i in range(req.num_images)]

    def on_step(_pipe, step, _timestep, kwargs):
        if step_latents is not None:
            kwargs["latents"] = step_latents(step, kwargs["latents"])
        if progress is not None:
            progress()
        return kwargs

    texts = {"prompt": req.prompt, "negative_prompt": req.negative_prompt or None} if embeddings is None else {}
    warn_long_prompts(getattr(pipe, "tokenizer", None), texts)
    return pipe(**texts, **(embeddings or {}), num_inference_steps=req.steps, guidance_scale=req.guidance,
                width=req.width, height=req.height, num_images_per_prompt=req.num_images, generator=generators,
                callback_on_step_end=on_step,
                callback_on_step_end_tensor_inputs=["latents"]).images


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
            results[label] = run_pipeline(pipe, req, tick)
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
    # The next number after the highest: a composition's mask pictures (<n>-<seed>-<label>-mask-<expert>.png) share
    # their image's number, so counting files made the numbers skip one per mask.
    numbers = [int(p.name[:5]) for p in folder.glob("*.png") if p.name[:5].isdigit()] if folder.is_dir() else []
    first = max(numbers, default=-1) + 1
    names = (f"{n:05d}-{item.seed}-{item.label}.png" for n in itertools.count(first))
    return save_new_image(item.image, folder, names, "PNG", pnginfo=meta)
