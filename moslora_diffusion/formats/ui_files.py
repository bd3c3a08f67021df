"""The files a UI needs to draw a trained subject, and where each goes in AUTOMATIC1111 and ComfyUI.

A LoRA trained with pivotal tuning (--train_text_encoder_ti) does not draw the subject alone: its trigger word's
learned vectors travel beside it as the textual-inversion file `<word>.safetensors` (embedding_files.py), which
A1111 and ComfyUI find by its file name. The export command's report, the app's download and the training
output's model card all list the files from here, so none of them names the LoRA alone. Folders: A1111's
`models/Lora/` and `embeddings/`, ComfyUI's `models/loras/` and `models/embeddings/` (`embedding:<word>` in the
prompt), as those tools document them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..moslora.native_file import read_adapter
from .embedding_files import embedding_file_for
from .merge import resolve_adapter_path


@dataclass(frozen=True)
class UiFile:
    path: Path  # as written (a file, or for a diffusers export a folder)
    what: str  # what it is, in a few words
    a1111: str  # where it goes in AUTOMATIC1111 and how the prompt calls it
    comfyui: str  # the same for ComfyUI
    for_a_ui: bool = True  # False: a diffusers folder, which neither UI loads


def lora_file(path: Path) -> UiFile:
    return UiFile(path, "the LoRA (kohya format)",
                  f"copy into `models/Lora/`, add `<lora:{path.stem}:1>` to the prompt",
                  "copy into `models/loras/`, load it with a LoraLoader node")


def embedding_file(folder: Path, word: str) -> UiFile:
    return UiFile(folder / embedding_file_for(word),
                  f"the trigger word `{word}`'s learned embedding (textual inversion, from pivotal tuning): the LoRA "
                  "was trained with it and does not draw the subject without it",
                  f"copy into `embeddings/`; the word `{word}` in the prompt calls it",
                  f"copy into `models/embeddings/`; write `embedding:{word}` in the prompt where `{word}` was")


def checkpoint_file(path: Path) -> UiFile:
    return UiFile(path, "the merged model (adapters and any trigger word's vectors baked in)",
                  "copy into `models/Stable-diffusion/` and choose it as the checkpoint",
                  "copy into `models/checkpoints/`, load it with a Load Checkpoint node")


FOR_A_UI = "export --to lora-kohya (or merged-single-file)"


def diffusers_folder(path: Path, what: str) -> UiFile:
    return UiFile(path, what, f"not for A1111: {FOR_A_UI}", f"not for ComfyUI: {FOR_A_UI}", for_a_ui=False)


def adapter_words(adapters) -> list[str]:
    """The trigger words of the (path, scale) adapters that carry pivotal tuning's vectors, in order, each once."""
    words = [read_adapter(resolve_adapter_path(path)).token_abstraction for path, _ in adapters]
    return list(dict.fromkeys(w for w in words if w))


def export_files(target: str, written: Path, words: list[str]) -> list[UiFile]:
    """What an export to `target` wrote at `written` (the file or folder export() returned) that a UI needs;
    `words`: the trigger words of the exported adapters trained with pivotal tuning (their `<word>.safetensors`
    lies beside a LoRA file, inside a LoRA folder)."""
    if target == "lora-kohya":
        return [lora_file(written), *(embedding_file(written.parent, w) for w in words)]
    if target == "lora-diffusers":
        return [diffusers_folder(written, "the LoRA (diffusers format): pipe.load_lora_weights(folder)"),
                *(embedding_file(written, w) for w in words)]
    if target == "merged-single-file":
        return [checkpoint_file(written)]
    return [diffusers_folder(written, "the merged model (diffusers folder): DiffusionPipeline.from_pretrained")]


def describe(files: list[UiFile], relative_to: Path | None = None) -> str:
    """Plain-text lines, one per file: what it is, then where it goes in A1111 and in ComfyUI."""
    if not any(f.for_a_ui for f in files):  # a diffusers folder: it said "a UI needs", then "not for A1111"
        lines = [f"For diffusers, not a UI (for AUTOMATIC1111 or ComfyUI, {FOR_A_UI}):"]
        for f in files:
            lines.append(f"- {f.path.relative_to(relative_to) if relative_to else f.path}: {f.what}.")
        return "\n".join(lines)
    lines = ["To draw the subject, a UI needs " + ("this file:" if len(files) == 1 else "these files together:")]
    for f in files:
        name = f.path.relative_to(relative_to) if relative_to else f.path
        lines.append(f"- {name}: {f.what}.\n    AUTOMATIC1111: {f.a1111}.\n    ComfyUI: {f.comfyui}.")
    return "\n".join(lines)


def markdown_table(files: list[UiFile]) -> str:
    """The same as a Markdown table (file names only), for model cards and the app."""
    rows = "\n".join(f"| `{f.path.name}` | {f.what} | {f.a1111} | {f.comfyui} |" for f in files)
    return f"| file | what it is | AUTOMATIC1111 | ComfyUI |\n|---|---|---|---|\n{rows}"
