"""Resumable checkpoints, written so that a crash at any moment never leaves one that looks complete.

A checkpoint is a folder `checkpoint-<step>` holding the adapter weights, the optimizer, scheduler,
EMA and grad-scaler states and `state.json` (step, family, adapter settings, the optimizer and batch
settings its state was made with (training/run_folder/resume.py), the list of files). It is
written as `checkpoint-<step>.tmp`, `state.json` last, then renamed: a folder without the `.tmp` suffix
whose state.json lists only files that exist is complete. `latest` considers complete ones only.
Only the adapters are stored, never the frozen base model (a few MB instead of GB).
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ...files.atomic import atomic_write
from ...files.safetensors_io import load_nested, load_tensors, save_nested, save_tensors

FORMAT_VERSION = 2  # 2: optimizer/scheduler states as safetensors (1 used torch.save)
STATE_SUFFIX = ".state.safetensors"
STATE_FILE = "state.json"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or belongs to a different model or adapter."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    state: dict  # the parsed state.json


def adapter_tensors(found: dict) -> dict[str, torch.Tensor]:
    """{component.module.A|M|B: tensor} from pipeline_adapters(pipe)."""
    return {f"{component}.{module}.{part}": getattr(layer, f"lora_{part}").detach()
            for component, layers in found.items() for module, layer in layers.items() for part in "AMB"}


def read_checkpoint(path: str | Path) -> CheckpointInfo:
    """The state of a complete checkpoint; CheckpointError naming what is wrong otherwise."""
    path = Path(path).expanduser()
    if path.is_file():
        raise CheckpointError(f"{path} is a file, not a checkpoint: give a checkpoint-N folder of a run, or 'latest' "
                              "(the newest checkpoint in --output_dir)")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not (path / STATE_FILE).exists() and not path.name.endswith(".tmp"):
        found = list_checkpoints(path) if any(path.glob("checkpoint-*")) else []
        if found:  # a run folder given for one of its checkpoints
            raise CheckpointError(f"{path} is a run folder, not a checkpoint: give {found[-1].path} (its newest), or "
                                  "'latest' with --output_dir set to it")
    if path.name.endswith(".tmp"):
        raise CheckpointError(f"{path} is a checkpoint that was never finished (the run stopped while writing it)")
    state_file = path / STATE_FILE
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete: no {STATE_FILE}") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint {path} has a damaged {STATE_FILE}: {err}") from None
    missing = [name for name in state.get("files", []) if not (path / name).is_file()]
    if missing or "step" not in state:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing) or 'its step'}")
    return CheckpointInfo(path, int(state["step"]), state)


def list_checkpoints(output_dir: str | Path) -> list[CheckpointInfo]:
    """Complete checkpoints in output_dir, oldest first; incomplete ones are skipped with a warning."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        if path.is_dir() and CHECKPOINT_NAME.match(path.name):
            try:
                found.append(read_checkpoint(path))
            except CheckpointError as err:
                warnings.warn(f"ignoring {err}", stacklevel=2)
    return sorted(found, key=lambda info: info.step)


def find_resume_checkpoint(spec: str | None, output_dir: str | Path) -> CheckpointInfo | None:
    """`latest` -> the newest complete checkpoint (None when there is none); a path -> that checkpoint."""
    if spec is None:
        return None
    if spec == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    return read_checkpoint(spec)


def check_adapter_checkpoint(info: CheckpointInfo) -> None:
    """CheckpointError for a checkpoint of MoLE gates given to the DreamBooth trainer (readable before loading)."""
    if "experts" in info.state:
        raise CheckpointError(f"checkpoint {info.path} holds MoLE gates (python -m moslora_diffusion.mole train), "
                              "not DreamBooth adapters: resume it with that command")


def check_compatible(info: CheckpointInfo, family: str, adapter: dict, targets: dict[str, list[str]]) -> None:
    """Refuses a checkpoint made for another model family, adapter shape or set of adapted layers."""
    check_adapter_checkpoint(info)
    state = info.state
    if state.get("family") != family:
        raise CheckpointError(f"checkpoint {info.path} was trained on a {state.get('family')} model, but this run "
                              f"uses a {family} model; resume with the same base model family")
    if state.get("adapter") != adapter:
        raise CheckpointError(f"checkpoint {info.path} has adapter settings {state.get('adapter')}, but this run "
                              f"uses {adapter}; resume with the same --adapter/--rank/--lora_alpha/--mixer_init")
    if state.get("targets") != targets:
        raise CheckpointError(f"checkpoint {info.path} adapts other layers than this run (different "
                              "--target_modules or --train_text_encoder?)")


def save_checkpoint(output_dir: str | Path, step: int, state: dict, tensors: dict[str, dict[str, torch.Tensor]],
                    objects: dict[str, dict]) -> Path:
    """Writes checkpoint-<step> atomically (main process only).

    state: JSON-able run state (family, adapter, targets...); tensors: {file stem: tensors} saved as
    safetensors; objects: {file stem: state_dict} of the optimizer, scheduler, scaler (save_nested: also
    safetensors, so resuming from a checkpoint someone hands us can never run code).
    """
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a run killed while writing
    tmp.mkdir(parents=True)
    files = []
    for stem, group in tensors.items():
        save_tensors(group, tmp / f"{stem}.safetensors")
        files.append(f"{stem}.safetensors")
    for stem, obj in objects.items():
        save_nested(obj, tmp / f"{stem}{STATE_SUFFIX}")
        files.append(f"{stem}{STATE_SUFFIX}")
    full_state = {"format_version": FORMAT_VERSION, **state, "step": step, "files": files}
    atomic_write(tmp / STATE_FILE, lambda p: p.write_text(json.dumps(full_state, indent=2), encoding="utf-8"))
    if final.exists():  # re-saving a step (a run resumed from an earlier checkpoint): swap, then delete
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    return final


def load_checkpoint_files(info: CheckpointInfo, device: torch.device) -> tuple[dict, dict]:
    """({file stem: tensors}, {file stem: state_dict}) of a complete checkpoint."""
    tensors, objects = {}, {}
    for name in info.state["files"]:
        if name.endswith(STATE_SUFFIX):
            objects[name.removesuffix(STATE_SUFFIX)] = load_nested(info.path / name, device=str(device))
        elif name.endswith(".safetensors"):
            tensors[name.removesuffix(".safetensors")] = load_tensors(info.path / name, device=str(device))[0]
        else:
            raise CheckpointError(f"{info.path / name}: checkpoints hold safetensors files only")
    return tensors, objects


def prune_checkpoints(output_dir: str | Path, keep: int | None) -> list[Path]:
    """Deletes all but the newest `keep` complete checkpoints (and stale .tmp folders)."""
    folder = Path(output_dir)
    removed = []
    for tmp in folder.glob("checkpoint-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    if keep is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            old = list_checkpoints(folder)[:-keep]
        for info in old:
            shutil.rmtree(info.path)
            removed.append(info.path)
    return removed
