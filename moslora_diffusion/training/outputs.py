"""The output folder: refuse to mix two runs, record the configuration, write the final files and model card."""

from __future__ import annotations

import json
import shutil
from dataclasses import fields
from pathlib import Path

from .._version import __version__
from ..files.atomic import atomic_write
from ..formats.lora import DIFFUSERS_WEIGHT_NAME, export_pipeline_loras
from ..moslora.native_file import save_adapter
from .config import TrainConfig

ADAPTER_FILE = "moslora.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"
CONFIG_FILE = "training_config.json"
CARD_FILE = "README.md"
VALIDATION_DIR = "validation"
PROGRESS_FILE = "progress.jsonl"  # one JSON line per step / validation, for the app's progress view
FINAL_FILES = (ADAPTER_FILE, DIFFUSERS_WEIGHT_NAME, KOHYA_FILE, CARD_FILE, CONFIG_FILE)


class OutputDirError(ValueError):
    """The output folder holds something this run must not overwrite."""


def _artifacts(config: TrainConfig) -> set[str]:
    """Top-level names a run writes into its output folder (besides checkpoint-N)."""
    return set(FINAL_FILES) | {VALIDATION_DIR, PROGRESS_FILE, Path(config.logging_dir).parts[0]}


def _is_artifact(name: str, config: TrainConfig) -> bool:
    return name in _artifacts(config) or name.startswith("checkpoint-")


def _is_class_dir(path: Path, config: TrainConfig) -> bool:
    """Class images kept inside the output folder belong to the run as well (and are kept on overwrite)."""
    return bool(config.with_prior_preservation and config.class_data_dir
                and Path(config.class_data_dir).resolve() == path.resolve())


def _stored_config(folder: Path) -> dict | None:
    try:
        return json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))["config"]
    except (FileNotFoundError, KeyError, TypeError, json.JSONDecodeError):
        return None


def check_output_dir(config: TrainConfig) -> None:
    """Raises unless the folder is new, empty, or holds this same run (which may then be resumed).

    Read-only: with --overwrite_output_dir the clean-up happens later, in prepare_output_dir, once every
    input has been checked.
    """
    folder = Path(config.output_dir)
    if folder.exists() and not folder.is_dir():
        raise OutputDirError(f"--output_dir {folder} is a file, not a folder")
    # Hidden files (.DS_Store, our own temporary files) and class images the run keeps inside its folder
    # (their generation may have been interrupted before anything else was written) do not count.
    entries = [p for p in folder.iterdir() if not (p.name.startswith(".") or _is_class_dir(p, config))
               ] if folder.is_dir() else []
    if config.overwrite_output_dir or not entries:
        return
    foreign = sorted(p.name for p in entries if not _is_artifact(p.name, config))
    if foreign:
        raise OutputDirError(f"--output_dir {folder} already holds other files ({', '.join(foreign[:5])}); choose "
                             "an empty folder or pass --overwrite_output_dir")
    stored = _stored_config(folder)
    if stored is None:
        raise OutputDirError(f"--output_dir {folder} holds training files but no readable {CONFIG_FILE}; choose "
                             "another folder or pass --overwrite_output_dir")
    ours = config.run_defining()
    # A setting newer than the stored run had its default there: a run started before an update still resumes.
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    stored = {k: stored.get(k, defaults[k]) for k in ours}
    differing = sorted(k for k in ours if stored[k] != ours[k])
    if differing:
        changes = ", ".join(f"{k}: {stored[k]!r} -> {ours[k]!r}" for k in differing[:5])
        raise OutputDirError(f"--output_dir {folder} holds a different run ({changes}); choose another folder, "
                             "or pass --overwrite_output_dir to replace it")


def prepare_output_dir(config: TrainConfig, plan: dict) -> None:
    """Creates the folder (clearing a previous run's files with --overwrite_output_dir) and records the config."""
    folder = Path(config.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if config.overwrite_output_dir:
        # Only what a run of ours wrote: a stale checkpoint would otherwise be resumed by `latest`.
        for path in folder.iterdir():
            if _is_artifact(path.name, config) and path.is_dir():
                shutil.rmtree(path)
            elif _is_artifact(path.name, config):
                path.unlink()
    write_config(config, plan)


def append_progress(output_dir: str | Path, records: list[dict]) -> None:
    """Appends {"step", "total", "loss"} / {"step", "validation_images"} lines (readers skip a partial line)."""
    # An append, not files/atomic.py: the app reads this file while the run grows it, rewriting it whole at every
    # logging interval would cost O(steps^2), and a kill can only cut the last line, which every reader skips.
    with open(Path(output_dir) / PROGRESS_FILE, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(record) + "\n" for record in records))


def write_config(config: TrainConfig, plan: dict, result: dict | None = None) -> Path:
    record = {"moslora_diffusion_version": __version__, "config": config.to_dict(), "plan": plan}
    if result is not None:
        record["result"] = result
    text = json.dumps(record, indent=2, sort_keys=True)
    return atomic_write(Path(config.output_dir) / CONFIG_FILE, lambda p: p.write_text(text, encoding="utf-8"))


def write_final_files(pipe, config: TrainConfig, plan: dict, result: dict,
                      validation_images: list[Path]) -> dict[str, Path]:
    """moslora.safetensors, the folded diffusers and kohya LoRAs, the model card and the config."""
    folder = Path(config.output_dir)
    info = {"base_model": config.pretrained_model_name_or_path, "instance_prompt": config.instance_prompt,
            "class_prompt": config.class_prompt if config.with_prior_preservation else None,
            "prediction_type": plan["prediction_type"], "resolution": plan["resolution"],
            "steps": result["steps"], "ema": config.use_ema}
    written = {"moslora": save_adapter(pipe, folder / ADAPTER_FILE, info)}
    exports = export_pipeline_loras(pipe, folder, folder / KOHYA_FILE, {"title": folder.name, **info})
    written.update(exports)
    written["config"] = write_config(config, plan, result)
    card = model_card(config, plan, result, [p.relative_to(folder).as_posix() for p in validation_images])
    written["card"] = atomic_write(folder / CARD_FILE, lambda p: p.write_text(card, encoding="utf-8"))
    return written


_PIPELINES = {"sdxl": "StableDiffusionXLPipeline"}


def _settings(config: TrainConfig, plan: dict, result: dict) -> dict:
    return {
        "base model": config.pretrained_model_name_or_path, "model family": plan["family"],
        "adapter": config.adapter, "rank": config.rank, "alpha": config.lora_alpha or config.rank,
        "mixer init": config.adapter_config.mixer_init, "UNet targets": ", ".join(config.unet_targets),
        "text encoder trained": config.train_text_encoder, "steps": result["steps"],
        "learning rate": config.learning_rate, "lr schedule": config.lr_scheduler,
        "batch (per step, all devices)": plan["effective_batch"], "resolution": plan["resolution"],
        "prior preservation": (f"yes ({config.class_prompt!r}, weight {config.prior_loss_weight})"
                               if config.with_prior_preservation else "no"),
        "Min-SNR gamma": config.snr_gamma, "mixed precision": config.mixed_precision,
        "EMA": f"yes ({config.ema_decay})" if config.use_ema else "no", "seed": config.seed,
    }


def model_card(config: TrainConfig, plan: dict, result: dict, images: list[str]) -> str:
    """A Hugging Face style README: what was trained, on what, how to use it everywhere."""
    pipeline = _PIPELINES.get(plan["family"], "StableDiffusionPipeline")
    base, prompt = config.pretrained_model_name_or_path, config.instance_prompt
    rows = "\n".join(f"| {k} | {v} |" for k, v in _settings(config, plan, result).items())
    gallery = "\n".join(f"![validation image]({path})" for path in images) or "(no validation prompt was given)"
    return f"""---
base_model: {json.dumps(base)}
instance_prompt: {json.dumps(prompt)}
tags: [stable-diffusion, text-to-image, diffusers, lora, moslora, dreambooth]
library_name: diffusers
---

# MoSLoRA DreamBooth adapter

Trained with moslora-diffusion {__version__} on `{base}` ({plan["family"]}).
Trigger prompt: **{prompt}**

## Settings

| setting | value |
|---|---|
{rows}

The full configuration is in `{CONFIG_FILE}`.

## Validation images

{gallery}

## Files

- `{ADAPTER_FILE}`: the native MoSLoRA adapter (A, mixer M, B), for moslora-diffusion.
- `{DIFFUSERS_WEIGHT_NAME}`: the same adapter folded exactly into a plain LoRA (B M A = (B M) A), diffusers format.
- `{KOHYA_FILE}`: the folded LoRA in kohya format, for AUTOMATIC1111 and ComfyUI.

## Use it

diffusers:

```python
import torch
from diffusers import {pipeline}

pipe = {pipeline}.from_pretrained("{base}", torch_dtype=torch.float16).to("cuda")
pipe.load_lora_weights("{config.output_dir}")
image = pipe({json.dumps(prompt)}).images[0]
```

moslora-diffusion (keeps the mixer as a separate matrix; the scale can be changed live):

```python
from moslora_diffusion import load_adapter
load_adapter(pipe, "{config.output_dir}/{ADAPTER_FILE}", scale=1.0)
```

AUTOMATIC1111: copy `{KOHYA_FILE}` into `models/Lora/` and add `<lora:lora_kohya:1>` to the prompt.

ComfyUI: copy `{KOHYA_FILE}` into `models/loras/` and load it with a *LoraLoader* node.
"""
