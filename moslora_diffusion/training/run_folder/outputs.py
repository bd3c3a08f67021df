"""The output folder: refuse to mix two runs or to touch files that are not ours, record the configuration
and what the run wrote (the manifest), write the final files and the model card."""

from __future__ import annotations

import json
import shlex
import shutil
import warnings
from dataclasses import fields
from pathlib import Path

from ..._version import __version__
from ...files.atomic import atomic_write
from ...formats.embedding_files import embedding_file_for, embedding_file_name, save_embedding_file
from ...formats.lora import DIFFUSERS_WEIGHT_NAME, export_pipeline_loras
from ...formats.ui_files import export_files, markdown_table
from ...moslora.native_file import save_adapter
from ..settings.config import PRIOR_SOURCE_NAMES, TrainConfig, uses_class_images
from .checkpoints import CHECKPOINT_NAME, list_checkpoints
from .identity import PATH_SETTINGS, input_record, resolve_path_setting, same_setting, stored_path
from .leftovers import remove_tracker_logs, remove_validation_images
from .manifest import owns, read_manifest, record_written, write_manifest
from .output_location import OutputDirError, check_logging_dir, check_room, check_writable

ADAPTER_FILE = "moslora.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"
CONFIG_FILE = "training_config.json"
CARD_FILE = "README.md"
VALIDATION_DIR = "validation"
BEST_FILE = "moslora_best.safetensors"  # --keep_best: trainer/validation_scores.py
PROGRESS_FILE = "progress.jsonl"  # one JSON line per step / validation, for the app's progress view
FINAL_FILES = (ADAPTER_FILE, DIFFUSERS_WEIGHT_NAME, KOHYA_FILE, CARD_FILE, CONFIG_FILE)


def validation_image_name(step: int, index: int) -> str:
    """validation/step-NNNNNN-i.png: the name of the index-th validation image of a step."""
    return f"step-{step:06d}-{index}.png"


def _logs_name(logging_dir: str) -> str | None:
    """The top-level entry --logging_dir creates inside the output folder (None: it lies elsewhere)."""
    parts = Path(logging_dir).parts
    return parts[0] if parts and not Path(logging_dir).is_absolute() and parts[0] != ".." else None


def _run_names(logging_dir: str) -> set[str]:
    """Fixed top-level names a run writes (besides checkpoint-N)."""
    return {*FINAL_FILES, VALIDATION_DIR, PROGRESS_FILE, BEST_FILE} | ({_logs_name(logging_dir)} - {None})


def _is_run_name(name: str, logging_dir: str) -> bool:
    base = name.removesuffix(".tmp").removesuffix(".old")
    return name in _run_names(logging_dir) or bool(CHECKPOINT_NAME.match(base))


def _is_class_dir(path: Path, config: TrainConfig) -> bool:
    """Class images kept inside the output folder belong to the run as well (and are kept on overwrite)."""
    return bool(uses_class_images(config) and config.class_data_dir
                and Path(config.class_data_dir).resolve() == path.resolve())


def read_record(folder: str | Path) -> dict | None:
    """The folder's training_config.json when it is one of ours ({"config", "plan", "inputs"?, ...}), else None."""
    try:
        record = json.loads((Path(folder) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(record, dict) and "moslora_diffusion_version" in record and isinstance(record.get("config"), dict):
        return record
    return None


def _run_files(folder: Path, record: dict | None) -> set[str]:
    """The entries of `folder` that a run of ours wrote: its manifest, or, for a run written before runs kept
    one (a readable training_config.json of ours and no manifest), the entries under the names a run writes."""
    listed = read_manifest(folder)
    if listed is None and record is not None:
        logging_dir = record["config"].get("logging_dir") or "logs"
        listed = {p.name for p in folder.iterdir() if _is_run_name(p.name, logging_dir)}
    return {p.name for p in folder.iterdir() if owns(p.name, listed)} if listed else set()


def _entries(folder: Path, config: TrainConfig) -> list[str]:
    # Hidden files (.DS_Store, the manifest, our temporary files) and class images the run keeps inside its
    # folder (their generation may have been interrupted before anything else was written) do not count.
    return sorted(p.name for p in folder.iterdir() if not (p.name.startswith(".") or _is_class_dir(p, config))
                  ) if folder.is_dir() else []


def check_output_dir(config: TrainConfig) -> None:
    """Raises OutputDirError unless the folder can be written and is new, empty, or holds this same run (which
    may then be resumed); with --overwrite_output_dir, unless every file whose name a run writes is a run's.

    Read-only: with --overwrite_output_dir the clean-up happens later, in prepare_output_dir, once every
    input has been checked. Files that no run of ours wrote are never deleted nor overwritten.
    """
    check_writable(config.output_dir)
    check_logging_dir(config)
    check_room(config)
    folder = Path(config.output_dir)
    entries = _entries(folder, config)
    if not entries:
        return
    record = read_record(folder)
    ours = _run_files(folder, record)
    foreign = [name for name in entries if name not in ours]
    clashing = [name for name in foreign if _is_run_name(name, config.logging_dir)]
    if clashing:
        raise OutputDirError(f"--output_dir {folder} holds {', '.join(clashing[:5])}, which no run of ours wrote "
                             "but this run would write; choose another --output_dir (files that are not a run's "
                             "are never deleted or overwritten, not even with --overwrite_output_dir)")
    if not ours:
        if not config.overwrite_output_dir:
            raise OutputDirError(f"--output_dir {folder} already holds other files ({', '.join(foreign[:5])}); "
                                 "choose an empty folder, or pass --overwrite_output_dir to train beside them "
                                 "(it deletes only what an earlier run wrote)")
        return
    if config.overwrite_output_dir:
        return
    if record is None:
        raise OutputDirError(f"--output_dir {folder} holds a run without a readable {CONFIG_FILE}; choose another "
                             "--output_dir, or pass --overwrite_output_dir to delete that run's files (checkpoints "
                             "included)")
    _check_same_run(folder, record, config)
    _check_not_restarting(folder, record, config)


def _checkpoints(folder: Path) -> list:
    """The folder's complete checkpoints, oldest first, without a word (an incomplete one is reported when the run
    resumes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list_checkpoints(folder)


def _check_not_restarting(folder: Path, record: dict, config: TrainConfig) -> None:
    """This same run's folder where training would start again from step 0 and replace what the run made (its
    adapter at the end, its checkpoints as it passes their steps), without a word: checkpoints and no
    --resume_from_checkpoint, or a finished run without checkpoints (where `latest` finds none and starts at 0).
    A folder with neither (stopped before its first checkpoint) holds nothing to lose and starts again."""
    checkpoints = _checkpoints(folder)
    if checkpoints:
        if config.resume_from_checkpoint:
            return  # continued from a checkpoint: what the run made is carried on, not replaced
        raise OutputDirError(f"--output_dir {folder} holds this run up to checkpoint-{checkpoints[-1].step}: add "
                             "--resume_from_checkpoint latest to continue it, or pass --overwrite_output_dir to "
                             "start again from step 0 (it deletes that run's files)")
    finished = (record.get("result") or {}).get("steps")
    if finished is not None:  # `latest` finds no checkpoint here and started again from step 0 just the same
        raise OutputDirError(f"--output_dir {folder} holds this run, finished at step {finished} and keeping no "
                             "checkpoint to continue from: training again would replace what it wrote; choose another "
                             "--output_dir, or pass --overwrite_output_dir to train it again from step 0")


def _as_flag(name: str, value) -> str:
    """The command-line form of a setting's value."""
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no-{name}"
    if isinstance(value, list | tuple):  # MoLE's --experts a b c
        return f"--{name} " + " ".join(shlex.quote(str(v)) for v in value)
    return f"(no --{name})" if value is None else f"--{name} {shlex.quote(str(value))}"


def _shown(value) -> str:
    """A setting's value in the different-run message: `'a dog'`, `4`, or `(not set)` (it printed `None`)."""
    return "(not set)" if value is None else repr(value)


def _check_same_run(folder: Path, record: dict, config: TrainConfig) -> None:
    ours = config.run_defining()
    # A setting newer than the stored run had its default there: a run started before an update still resumes.
    defaults = {f.name: f.default for f in fields(type(config))}
    stored = {k: record["config"].get(k, defaults[k]) for k in ours}
    inputs = record.get("inputs") or {}
    differing = [k for k in sorted(ours) if not same_setting(k, stored[k], inputs.get(k), ours[k])]
    if not differing:
        return
    then = {k: stored_path(k, stored[k], inputs.get(k)) for k in differing}  # paths resolved, as compared
    now = {k: resolve_path_setting(ours[k]) if k in PATH_SETTINGS else ours[k] for k in differing}
    changes = ", ".join(f"{k}: {_shown(then[k])} -> {_shown(now[k])}" for k in differing)
    checkpoints = _checkpoints(folder)
    if not checkpoints:
        raise OutputDirError(f"--output_dir {folder} holds a different run ({changes}); choose another --output_dir,"
                             " or pass --overwrite_output_dir to delete that run's files")
    flags = " ".join(_as_flag(k, then[k]) for k in differing)
    raise OutputDirError(f"--output_dir {folder} holds a resumable run (up to checkpoint-{checkpoints[-1].step}) "
                         f"with other settings ({changes}); to continue it pass {flags} --resume_from_checkpoint "
                         "latest, or choose another --output_dir for a new run (--overwrite_output_dir would delete "
                         "its checkpoints)")


def prepare_output_dir(config: TrainConfig, plan: dict) -> None:
    """Creates the folder (deleting the previous run's files with --overwrite_output_dir), starts or adopts
    its manifest and records the config."""
    folder = Path(config.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    ours = _run_files(folder, read_record(folder))
    if config.overwrite_output_dir:
        # Exactly what a run of ours wrote: a stale checkpoint would otherwise be resumed by `latest`.
        kept = set()
        for name in ours:
            path = folder / name
            if _is_class_dir(path, config):  # the class images this run is about to train on
                continue
            if name == VALIDATION_DIR and path.is_dir() and not path.is_symlink():
                if not remove_validation_images(path):  # a file of the user's is still in there
                    kept.add(name)
            elif name == _logs_name(config.logging_dir) and path.is_dir() and not path.is_symlink():
                if not remove_tracker_logs(path):  # as validation/: the user's notes beside the logs stay
                    kept.add(name)
            elif path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    else:  # `ours` adopts the files of a run written before runs kept a manifest
        kept = (read_manifest(folder) or set()) | ours
    # The trackers create the logging folder when the run starts, outside any writer of ours.
    logs = {_logs_name(config.logging_dir)} - {None} if config.report_to != "none" else set()
    write_manifest(folder, kept | logs)
    write_config(config, plan)


def append_progress(output_dir: str | Path, records: list[dict]) -> None:
    """Appends {"step", "total", "loss"} / {"step", "validation_images"} lines (readers skip a partial line)."""
    # An append, not files/atomic.py: the app reads this file while the run grows it, rewriting it whole at every
    # logging interval would cost O(steps^2), and a kill can only cut the last line, which every reader skips.
    path = Path(output_dir) / PROGRESS_FILE
    if not path.exists():
        record_written(output_dir, PROGRESS_FILE)
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(record) + "\n" for record in records))


def write_config(config: TrainConfig, plan: dict, result: dict | None = None) -> Path:
    record = {"moslora_diffusion_version": __version__, "config": config.to_dict(), "plan": plan,
              "inputs": input_record(config)}
    if result is not None:
        record["result"] = result
    text = json.dumps(record, indent=2, sort_keys=True)
    record_written(config.output_dir, CONFIG_FILE)
    return atomic_write(Path(config.output_dir) / CONFIG_FILE, lambda p: p.write_text(text, encoding="utf-8"))


def write_final_files(pipe, config: TrainConfig, plan: dict, result: dict,
                      validation_images: list[Path]) -> dict[str, Path]:
    """moslora.safetensors, the folded diffusers and kohya LoRAs, the model card and the config."""
    folder = Path(config.output_dir)
    record_written(folder, ADAPTER_FILE, DIFFUSERS_WEIGHT_NAME, KOHYA_FILE, CARD_FILE)
    info = {"base_model": config.pretrained_model_name_or_path, "instance_prompt": config.instance_prompt,
            "class_prompt": config.class_prompt if config.with_prior_preservation else None,
            "prediction_type": plan["prediction_type"], "resolution": plan["resolution"],
            "steps": result["steps"], "ema": config.use_ema}
    written = {"moslora": save_adapter(pipe, folder / ADAPTER_FILE, info)}
    word = {"token_abstraction": config.token_abstraction} if config.train_text_encoder_ti else {}
    exports = export_pipeline_loras(pipe, folder, folder / KOHYA_FILE, {"title": folder.name, **info, **word})
    written.update(exports)
    if embedding_file_name(pipe):  # pivotal tuning: <word>.safetensors, the A1111 / ComfyUI / diffusers embedding
        record_written(folder, embedding_file_name(pipe))
        written["embedding"] = save_embedding_file(pipe, folder)
    written["config"] = write_config(config, plan, result)
    card = model_card(config, plan, result, [p.relative_to(folder).as_posix() for p in validation_images])
    written["card"] = atomic_write(folder / CARD_FILE, lambda p: p.write_text(card, encoding="utf-8"))
    return written


_PIPELINES = {"sdxl": "StableDiffusionXLPipeline"}


def _settings(config: TrainConfig, plan: dict, result: dict) -> dict:
    return {
        "base model": config.pretrained_model_name_or_path, "model family": plan["family"],
        "adapter": config.adapter, "rank": config.rank, "alpha": config.lora_alpha or config.rank,
        # A plain LoRA has no mixer: the given --mixer_init is unused (training names it; the config records it).
        "mixer init": "none (plain LoRA)" if config.adapter == "lora" else config.adapter_config.mixer_init,
        "UNet targets": ", ".join(config.unet_targets),
        "text encoder trained": config.train_text_encoder, "steps": result["steps"],
        "learning rate": config.learning_rate, "lr schedule": config.lr_scheduler,
        "batch (per step, all devices)": plan["effective_batch"], "resolution": plan["resolution"],
        "prior preservation": (f"yes ({config.class_prompt!r}, weight {config.prior_loss_weight}, "
                               f"{PRIOR_SOURCE_NAMES[config.resolved_prior_source]})" if config.with_prior_preservation
                               else "no"),
        "Min-SNR gamma": config.snr_gamma, "mixed precision": config.mixed_precision,
        "EMA": f"yes ({config.ema_decay})" if config.use_ema else "no", "seed": config.seed,
        **_subject_settings(config),
    }


def _subject_settings(config: TrainConfig) -> dict:
    """The rows of the subject-quality options, when the run used them."""
    rows = {}
    if config.train_text_encoder_ti:
        rows["pivotal tuning"] = (f"yes (trigger word `{config.token_abstraction}`, embedding learning rate "
                                  f"{config.embedding_lr or config.learning_rate})")
    if config.masked_loss:
        rows["masked loss"] = "yes (each photo's `<name>_mask.png` or alpha channel weights the loss)"
    options = config.caption_options
    if options.varies:
        shuffled = f"shuffled (first {options.keep_tokens} parts kept in place)" if options.shuffle else "not shuffled"
        rows["captions"] = f"dropout {options.dropout_rate}, {shuffled}"
    return rows


def _embedding_usage(config: TrainConfig, family: str) -> tuple[str, str]:
    """(the Files line, the diffusers lines) of the trigger word's embedding file; ("", "") without pivotal tuning."""
    if not config.train_text_encoder_ti:
        return "", ""
    word, out = config.token_abstraction, config.output_dir
    name = embedding_file_for(word)
    if family == "sdxl":  # one file, one tensor per text encoder: diffusers loads each into its own
        load = (f'\nfrom safetensors.torch import load_file\nstate = load_file("{out}/{name}")\n'
                f'pipe.load_textual_inversion(state["clip_l"], token="{word}", text_encoder=pipe.text_encoder, '
                f'tokenizer=pipe.tokenizer)\npipe.load_textual_inversion(state["clip_g"], token="{word}", '
                f'text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)')
    else:
        load = f'\npipe.load_textual_inversion("{out}/{name}", token="{word}")'
    files = (f"- `{name}`: the trigger word `{word}`'s learned embedding (pivotal tuning); the LoRA was trained with "
             "it and does not draw the subject without it.\n")
    return files, "# the trigger word's learned embedding (pivotal tuning), which the LoRA was trained with" + load


def _ui_table(config: TrainConfig) -> str:
    """Where the LoRA (and the trigger word's embedding) go in A1111 and ComfyUI (formats/ui_files.py)."""
    out = Path(config.output_dir)
    words = [config.token_abstraction] if config.train_text_encoder_ti else []
    return markdown_table(export_files("lora-kohya", out / KOHYA_FILE, words))


def model_card(config: TrainConfig, plan: dict, result: dict, images: list[str]) -> str:
    """A Hugging Face style README: what was trained, on what, how to use it everywhere."""
    pipeline = _PIPELINES.get(plan["family"], "StableDiffusionPipeline")
    base, prompt = config.pretrained_model_name_or_path, config.instance_prompt
    rows = "\n".join(f"| {k} | {v} |" for k, v in _settings(config, plan, result).items())
    gallery = "\n".join(f"![validation image]({path})" for path in images) or "(no validation prompt was given)"
    embedding_file, embedding_load = _embedding_usage(config, plan["family"])
    best = result.get("best")
    if best:
        scores = ", ".join(f"{name} {value:.3f}" for name, value in best["scores"].items())
        gallery += (f"\n\nBest validation (--keep_best, {best['metrics']} metrics): step {best['step']} ({scores}; "
                    f"mean {best['score']:.3f}), kept as `{BEST_FILE}` next to the final adapter.")
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
{embedding_file}
## Use it

AUTOMATIC1111 and ComfyUI: copy {"both files" if embedding_file else "the file"} below; \
{"the LoRA alone does not draw the subject." if embedding_file else "nothing else is needed."}

{_ui_table(config)}

diffusers (on a GPU when there is one, else the CPU):

```python
import torch
from diffusers import {pipeline}

device = "cuda" if torch.cuda.is_available() else "cpu"
pipe = {pipeline}.from_pretrained("{base}")
pipe = pipe.to(device, torch.float16 if device == "cuda" else torch.float32)  # half precision on a GPU only
pipe.load_lora_weights("{config.output_dir}"){embedding_load and chr(10) + embedding_load}
image = pipe({json.dumps(prompt)}).images[0]
```

moslora-diffusion (keeps the mixer as a separate matrix; the scale can be changed live):

```python
from moslora_diffusion import load_adapter
load_adapter(pipe, "{config.output_dir}/{ADAPTER_FILE}", scale=1.0)
```
"""
