"""The four export targets: a base model plus trained adapters -> a LoRA file or a merged model.

- lora-diffusers: a folder with `pytorch_lora_weights.safetensors` (`pipe.load_lora_weights(folder)`);
- lora-kohya: one kohya-format file for A1111 / ComfyUI;
- merged-diffusers: the base pipeline with the adapters baked in, as a diffusers folder;
- merged-single-file: the same as ONE .safetensors in the original layout (A1111 / ComfyUI checkpoint).
Several adapters are exact too: LoRAs are concatenated along the rank, merges add their deltas.
Every write is atomic (files/atomic.py): an error or interruption never leaves a partial file or folder.
The command is `python -m moslora_diffusion.export` (moslora_diffusion/export.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch

from .._version import __version__
from ..checks import SCALE, as_number, check_number
from ..files.atomic import check_free_space, check_not_an_input, foreign_files_message, write_folder_atomically
from ..files.safetensors_io import WeightFileError, check_finite, read_metadata, save_tensors
from ..models.families import detect_model
from ..models.loading import load_pipeline
from ..moslora.native_file import AdapterFile, load_adapter
from ..moslora.pipeline import detach_from_pipeline
from .embedding_files import embedding_file_name, embedding_file_tensors, is_export_embedding, write_embedding
from .lora import DIFFUSERS_WEIGHT_NAME, EXPORT_RECORD, combine, fold_pipeline, save_diffusers_lora, save_kohya_lora
from .merge import ADAPTER_FILE_NAME, bake_adapters, given_twice, resolve_adapter_path
from .single_file import single_file_state_dict

TARGETS = ("lora-diffusers", "lora-kohya", "merged-diffusers", "merged-single-file")
FOLDER_TARGETS = ("lora-diffusers", "merged-diffusers")
FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")  # a weights file's name: never a folder's
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODELSPEC_ARCHITECTURE = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512",
                          "sd2-v": "stable-diffusion-v2-768-v", "sdxl": "stable-diffusion-xl-v1-base"}
MODELSPEC_IMPLEMENTATION = {"sd1": "https://github.com/CompVis/stable-diffusion",
                            "sd2": "https://github.com/Stability-AI/stablediffusion", "sdxl": "sgm"}
MERGE_RECORD = "moslora_merge"  # metadata key (single file) / json file name (diffusers folder)

Adapters = Sequence[tuple[str | Path, float]]


class ExportError(ValueError):
    """Bad export input or output location; nothing was written."""


def parse_adapter_spec(text: str) -> tuple[Path, float]:
    """`PATH` or `PATH:SCALE`. A path may itself contain ':', so an existing path wins; otherwise only
    what follows the last ':' can be a scale, which must be finite and within SCALE_MIN..SCALE_MAX (the
    app's slider range). Raises ExportError naming the problem."""
    if Path(text).expanduser().exists() or ":" not in text:
        return Path(text), 1.0
    path, _, scale_text = text.rpartition(":")
    if as_number(scale_text) is None:
        raise ExportError(f"--adapter {text!r}: scale not a number ({scale_text!r} after the last ':'), and "
                          f"no file or folder of that name exists")
    return Path(path), check_number(f"--adapter {text!r}: the scale", scale_text, SCALE, ExportError)


def _check_scales(adapters: Adapters) -> None:
    """Every (path, scale) pair's scale finite and within SCALE_MIN..SCALE_MAX, before anything is loaded."""
    for path, scale in adapters:
        check_number(f"scale of adapter {str(path)!r}", scale, SCALE, ExportError)
        if float(scale) == 0:  # it wrote a LoRA of zeros (or a copy of the base) without a word
            raise ExportError(f"adapter {str(path)!r} at scale 0 would export nothing of it: give a scale other than "
                              "0 (PATH:SCALE), or leave that adapter out")


def _check_choices(target: str, dtype: str) -> None:
    if target not in TARGETS:
        raise ExportError(f"unknown export target {target!r}; choose one of {', '.join(TARGETS)}")
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


def _writable_folder(path: Path) -> None:
    """The nearest existing folder at or above `path` must let us create entries."""
    folder = path
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(f"cannot write to {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write to {folder}: permission denied")
    check_free_space(folder, 0)  # the margin at least; each file is checked for its own size when written


def check_output(target: str, out: Path, overwrite: bool) -> Path:
    """Fails early (before any model is loaded) on an output we would not be allowed to write.
    Returns the file (or, for merged-diffusers, folder) that the export creates."""
    if target in FOLDER_TARGETS and out.suffix.lower() in FILE_SUFFIXES:  # it made a folder named x.safetensors
        raise ExportError(f"--out {out}: --to {target} writes a folder; give a folder name, not {out.name}")
    if target == "lora-diffusers":
        if out.is_file():
            raise ExportError(f"--out {out} is a file; lora-diffusers writes a folder")
        written = out / DIFFUSERS_WEIGHT_NAME
    elif target == "merged-diffusers":
        if out.is_file():
            raise ExportError(f"--out {out} is a file; merged-diffusers writes a folder")
        written = out
    else:
        if out.is_dir() or out.suffix.lower() != ".safetensors":
            raise ExportError(f"--out {out}: {target} writes one file; give a name ending in .safetensors")
        written = out
    exists = written.is_file() or written.is_symlink() or (written.is_dir() and any(written.iterdir()))
    if exists:  # what --overwrite could not replace is refused first: passing it would not help
        _check_replaceable(target, out, written)
    if exists and not overwrite:
        raise FileExistsError(f"{written} already exists; pass --overwrite to replace it")
    _writable_folder(written.parent)
    return written


def _check_replaceable(target: str, out: Path, written: Path) -> None:
    """--overwrite replaces only what an earlier export wrote, never a user's file or folder (ExportError)."""
    if target == "merged-diffusers":
        if not (written / f"{MERGE_RECORD}.json").is_file():  # the folder is replaced whole
            raise ExportError(f"--out {out} holds files that are not a merged export of ours; --overwrite replaces "
                              "only an earlier export: choose a new folder")
        foreign = _not_a_model_folders(written)
        if foreign:
            raise ExportError(foreign_files_message(out, foreign))
    elif not written_by_an_export(written):
        raise ExportError(f"{written} is not a file an earlier export wrote (no export record in its metadata); "
                          f"--overwrite replaces only those: move {written.name} away first, or choose another --out")


def written_by_an_export(path: Path) -> bool:
    """A safetensors file with an export's record: `moslora_merge` (a merged checkpoint), or `moslora_export` naming
    its target (a LoRA written by this module or `mole export`). Not a training run's own LoRA files (their record
    names no target), nor any other file: a model, a renamed picture."""
    try:
        metadata = read_metadata(path)
    except WeightFileError:  # not safetensors at all, damaged, a folder, a pickle
        return False
    if MERGE_RECORD in metadata:
        return True
    try:
        return json.loads(metadata.get(EXPORT_RECORD, "{}")).get("target") in TARGETS
    except (ValueError, AttributeError):
        return False


def _not_a_model_folders(folder: Path) -> list[str]:
    """Top-level entries of a merged diffusers export that its writing did not make: anything but model_index.json,
    the merge record and the component folders model_index.json names (the user's notes, renders), sorted."""
    try:
        components = {k for k in json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
                      if not k.startswith("_")}
    except (OSError, ValueError, AttributeError):
        components = set()
    ours = {"model_index.json", f"{MERGE_RECORD}.json", *components}
    return sorted(p.name for p in folder.iterdir() if p.name not in ours)


def display_name(path: str | Path) -> str:
    """What metadata records for a model or adapter: a hub id as is, a local path by its own name only
    (a file should not carry its author's folder layout)."""
    path = Path(str(path))
    if not path.exists():
        return str(path)
    return path.parent.name if path.name == ADAPTER_FILE_NAME else path.name


def merge_record(base: str, adapters: Adapters, loaded: Sequence[AdapterFile], dtype: str, target: str) -> dict:
    entries = []
    for (path, scale), adapter in zip(adapters, loaded, strict=True):
        entry = {"name": display_name(path), "scale": float(scale), "kind": adapter.config.kind,
                 "rank": adapter.config.rank, "alpha": adapter.config.effective_alpha}
        if adapter.info.get("instance_prompt"):
            entry["instance_prompt"] = adapter.info["instance_prompt"]
        if adapter.token_abstraction:  # the LoRA export lacks the word's vectors (they go to <word>.safetensors)
            entry["token_abstraction"] = adapter.token_abstraction
        entries.append(entry)
    return {"base": display_name(base), "adapters": entries, "dtype": dtype, "target": target,
            "moslora_diffusion": __version__}


def modelspec(record: dict, pipe, title: str) -> dict[str, str]:
    """SAI model spec keys (what A1111 / ComfyUI show for a checkpoint) plus our merge record."""
    info = detect_model(pipe)
    family = info.family.name
    arch_key = "sd2-v" if family == "sd2" and info.prediction_type == "v_prediction" else family
    merged = ", ".join(f"{a['name']} x{a['scale']:g}" for a in record["adapters"])
    prompts = sorted({a["instance_prompt"] for a in record["adapters"] if "instance_prompt" in a})
    description = f"{record['base']} with MoSLoRA adapter(s) merged in: {merged} (moslora-diffusion)."
    if prompts:
        description += " Trained prompt(s): " + "; ".join(prompts)
    res = info.default_resolution
    return {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": MODELSPEC_ARCHITECTURE[arch_key],
            "modelspec.implementation": MODELSPEC_IMPLEMENTATION[family], "modelspec.title": title,
            "modelspec.description": description, "modelspec.resolution": f"{res}x{res}",
            "modelspec.prediction_type": "v" if info.prediction_type == "v_prediction" else "epsilon",
            "modelspec.merged_from": ", ".join([record["base"]] + [a["name"] for a in record["adapters"]]),
            "modelspec.date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            MERGE_RECORD: json.dumps(record)}


def _export_lora(pipe, adapters: Adapters, target: str, out: Path, dtype: str, base: str, overwrite: bool) -> Path:
    """Folds each adapter at its scale (exact: the mixer goes into up); several are concatenated. A pivotal-tuned
    adapter's trigger-word vectors are written beside it as `<word>.safetensors` (formats/embedding_files.py)."""
    folds, loaded, embeddings = [], [], {}
    for path, scale in adapters:
        loaded.append(load_adapter(pipe, resolve_adapter_path(path), scale))
        folds.append(fold_pipeline(pipe))
        if embedding_file_name(pipe):  # pivotal tuning: the word's vectors go beside the LoRA
            embeddings[embedding_file_name(pipe)] = embedding_file_tensors(pipe)
        detach_from_pipeline(pipe)
    folder = out if target == "lora-diffusers" else out.parent
    check_embedding_outputs(embeddings, folder, out, overwrite)
    folded = folds[0] if len(folds) == 1 else combine(folds)
    info = merge_record(base, adapters, loaded, dtype, target) | {"title": out.stem}
    if target == "lora-diffusers":
        written = save_diffusers_lora(folded, out, info, DTYPES[dtype], overwrite).parent
    else:
        family = detect_model(pipe).family
        written = save_kohya_lora(folded, out, family, dict(pipe.unet.config), info, DTYPES[dtype], overwrite)
    for name, tensors in embeddings.items():
        write_embedding(folder, name, tensors, overwrite)
    return written


def check_embedding_outputs(embeddings: dict, folder: Path, out: Path, overwrite: bool) -> None:
    """The embedding files (<word>.safetensors) of pivotal-tuned adapters may be written, before any file is.
    --overwrite names the output: a file beside it is replaced only when an earlier export wrote it."""
    for name in embeddings:
        path = folder / name
        if path == out:
            raise ExportError(f"--out {out} has the name of the trigger word's embedding file written beside it: "
                              "choose another --out name")
        if not (path.exists() or path.is_symlink()):
            continue
        if not is_export_embedding(path):
            raise ExportError(f"{path} is not an embedding an earlier export wrote, and the trigger word's embedding "
                              f"goes under that name beside the LoRA: move {name} away first, or give --out in "
                              "another folder")
        if not overwrite:
            raise FileExistsError(f"{path} (the trigger word's embedding) already exists; pass --overwrite "
                                  "to replace it")


def _components(pipe) -> dict[str, torch.nn.Module]:
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    return {name: getattr(pipe, name) for name in names if getattr(pipe, name, None) is not None}


def _export_single_file(pipe, record: dict, out: Path, dtype: str, overwrite: bool) -> Path:
    info = detect_model(pipe)
    try:
        tensors = single_file_state_dict(info.family.name, _components(pipe), info.prediction_type)
    except KeyError as err:
        raise ExportError(f"cannot write the {info.family.label} single-file layout: {err.args[0]}") from None
    torch_dtype = DTYPES[dtype]
    tensors = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    return save_tensors(tensors, out, modelspec(record, pipe, out.stem), overwrite=overwrite)


def _export_diffusers_folder(pipe, record: dict, out: Path, dtype: str, overwrite: bool) -> Path:
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    element = torch.finfo(DTYPES[dtype]).bits // 8
    needed = sum(t.numel() * element for m in modules for t in list(m.parameters()) + list(m.buffers()))

    def write(folder: Path) -> None:
        for module in modules:  # a no-op when the pipeline was loaded in the output dtype (export())
            if any(p.dtype != DTYPES[dtype] for p in module.parameters()):
                module.to(DTYPES[dtype])
            check_finite(module.state_dict(), out)  # save_pretrained does not go through save_tensors
        pipe.save_pretrained(folder, safe_serialization=True)
        (folder / f"{MERGE_RECORD}.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    return write_folder_atomically(out, write, needed, overwrite)


def export_pipeline(pipe, adapters: Adapters, target: str, out: str | Path, dtype: str = "fp16",
                    overwrite: bool = False, base: str | None = None) -> Path:
    """Exports from an already loaded pipeline (no adapters attached). Merged targets bake the adapters
    into `pipe` for good; LoRA targets leave it as it was. base: the name metadata records."""
    _check_choices(target, dtype)
    if not adapters:
        raise ExportError("give at least one --adapter")
    _check_scales(adapters)
    base = base or getattr(pipe, "name_or_path", None) or "unknown base model"
    check_inputs(adapters, out, [base])
    out = Path(out).expanduser()
    check_output(target, out, overwrite)
    if target.startswith("lora-"):
        return _export_lora(pipe, adapters, target, out, dtype, base, overwrite)
    loaded = bake_adapters(pipe, adapters)
    return write_merged(pipe, merge_record(base, adapters, loaded, dtype, target), target, out, dtype, overwrite)


def write_merged(pipe, record: dict, target: str, out: Path, dtype: str, overwrite: bool) -> Path:
    """Writes a pipeline whose weights already hold the adapters as `merged-single-file` (original layout,
    modelspec metadata from `record`, which has merge_record's keys) or `merged-diffusers` (a folder)."""
    if target == "merged-single-file":
        return _export_single_file(pipe, record, out, dtype, overwrite)
    if target == "merged-diffusers":
        return _export_diffusers_folder(pipe, record, out, dtype, overwrite)
    raise ExportError(f"{target} is not a merged target")


def check_inputs(adapters: Adapters, out: str | Path, models: Sequence[str | Path | None] = ()) -> None:
    """Every adapter exists, none is given twice, and `out` would overwrite none of them nor of `models` (the base
    model and its --config folder, where they are local; a hub id is not), nor write into a model's folder
    (ExportError)."""
    files = [resolve_adapter_path(path) for path, _ in adapters]
    twice = given_twice(files)
    if twice:
        raise ExportError(f"--adapter {twice} is given twice; give each adapter once, with the scale you want")
    local = [m for m in models if m and Path(m).expanduser().exists()]
    try:
        check_not_an_input(out, [p for p, _ in adapters] + files + local, "--out")
    except ValueError as err:
        raise ExportError(str(err)) from None
    for model in local:  # a file in a model folder would change the model (a merged-diffusers --out B/unet)
        folder = Path(model).expanduser().resolve()
        if folder.is_dir() and folder in Path(out).expanduser().resolve().parents:
            raise ExportError(f"--out {out} would write into the input {model}; write the output somewhere else")


def export(base: str | Path, adapters: Adapters, target: str, out: str | Path, dtype: str = "fp16",
           overwrite: bool = False, config: str | Path | None = None) -> Path:
    """Loads `base` (hub id, diffusers folder or single .safetensors; `config`: a diffusers folder with
    the configs of a single file, for offline use) in `dtype` and exports `adapters` [(path, scale)]
    as `target` to `out`. Cheap checks (adapters exist, output writable) run before the model loads."""
    _check_choices(target, dtype)
    _check_scales(adapters)
    check_inputs(adapters, out, [base, config])
    check_output(target, Path(out).expanduser(), overwrite)
    pipe = load_pipeline(base, torch_dtype=DTYPES[dtype], config=config)
    return export_pipeline(pipe, adapters, target, out, dtype, overwrite, base=str(base))
