"""MoLE experts: 2 to 8 trained LoRAs, frozen, each folded to plain factors per layer, on one base family.

MoLE (Wu, Huang, Wei, "Mixture of LoRA Experts", ICLR 2024, arXiv 2404.13628) keeps N trained LoRAs as experts
and learns only gates that weight them. An expert here is any adapter file this project reads
(formats/lora_files.py): our native `moslora.safetensors` (MoSLoRA through the exact fold up = B M, or a training
output folder), a diffusers `pytorch_lora_weights.safetensors` (or its folder), or a kohya LoRA. Its layers are
stored with alpha / r baked into up, so for every layer delta = up @ down (fp32). Experts may adapt different
sets of layers. Every check runs before anything touches the pipeline; each failure is one line.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..checks import SCALE, check_number
from ..files.safetensors_io import PICKLE_SUFFIXES, WeightFileError, pickle_refusal, read_metadata
from ..formats.lora import DIFFUSERS_WEIGHT_NAME
from ..formats.lora_files import read_lora_file, trigger_prompt, trigger_word
from ..formats.merge import ADAPTER_FILE_NAME
from ..models.families import detect_family
from ..moslora.folded import FoldedAdapter, FoldedLoRA, LayerKey, validate_folded
from ..moslora.inject import AdapterError
from ..moslora.pipeline import model_components
from ..training.run_folder.outputs import KOHYA_FILE, read_record

MIN_EXPERTS, MAX_EXPERTS = 2, 8


class MoLEError(AdapterError):
    """Bad MoLE input (experts, gates, a MoLE file); raised before the pipeline is modified."""


@dataclass
class Expert:
    """One frozen expert: per layer (down r x in, up out x r) fp32 with alpha / r baked in (delta = up @ down)."""

    folded: FoldedAdapter  # every FoldedLoRA has alpha == rank
    source: str  # the file's name (a training folder's name for its moslora.safetensors)
    source_format: str  # "moslora", "diffusers", "kohya" or "mole" (read back from a MoLE file)
    sha256: str  # of the source file: a MoLE file's gates belong to exactly these experts
    family: str | None  # "sd1" / "sd2" / "sdxl" when the file records it
    trigger_prompt: str | None  # the prompt it was trained on (adapter metadata `instance_prompt`)
    photo_dir: str | None = None  # the photos it was trained on, when recorded
    scale: float = 1.0  # the per-expert extra scale s_i
    class_prompt: str | None = None  # the class prompt of its prior preservation, when recorded

    @property
    def name(self) -> str:
        return self.folded.name

    @property
    def layers(self) -> dict[LayerKey, FoldedLoRA]:
        return self.folded.layers

    @property
    def rank(self) -> int:
        return max(lora.rank for lora in self.layers.values())

    def describe(self) -> dict:
        """What a MoLE file records of this expert (no local paths: only the file's own name)."""
        return {"name": self.name, "source": self.source, "format": self.source_format, "sha256": self.sha256,
                "family": self.family, "trigger_prompt": self.trigger_prompt, "rank": self.rank,
                "layers": len(self.layers), "scale": self.scale, "class_prompt": self.class_prompt}


def resolve_expert_path(path: str | Path) -> Path:
    """A training output folder means its moslora.safetensors, a diffusers LoRA folder its weights file.
    Refuses pickles and missing files with one line (nothing is read yet)."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in (ADAPTER_FILE_NAME, DIFFUSERS_WEIGHT_NAME):
            if (path / name).is_file():
                return path / name
        raise MoLEError(f"expert folder {path} holds neither {ADAPTER_FILE_NAME} nor {DIFFUSERS_WEIGHT_NAME}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise MoLEError(f"expert {pickle_refusal(path)}")
    if not path.is_file():
        raise MoLEError(f"expert file not found: {path}")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# The files a training run writes into its folder: each is named after the folder (the run), not its own stem.
TRAINING_OUTPUT_FILES = (ADAPTER_FILE_NAME, DIFFUSERS_WEIGHT_NAME, KOHYA_FILE)


def _display_name(path: Path) -> str:
    """A training folder's adapter (any of its exports) is named after the folder, any other file after its
    stem."""
    return path.parent.name if path.name in TRAINING_OUTPUT_FILES else path.stem


def photo_dir(path: Path, info: dict) -> str | None:
    """`instance_data_dir` from the metadata, else the photo folder the training run beside the adapter recorded
    (resolved when it ran, so a relative --instance_data_dir still points to the right folder from elsewhere)."""
    if info.get("instance_data_dir"):
        return str(info["instance_data_dir"])
    record = read_record(path.parent)
    if record is None:
        return None
    resolved = ((record.get("inputs") or {}).get("instance_data_dir") or {}).get("path")
    return resolved or record["config"].get("instance_data_dir")


@contextmanager
def as_mole_error():
    """Adapter and weight-file errors of the layers below surface as MoLEError (same one-line message)."""
    try:
        yield
    except MoLEError:
        raise
    except (AdapterError, WeightFileError) as err:
        raise MoLEError(str(err)) from None


def read_expert(path: Path, pipe, name: str, scale: float = 1.0) -> Expert:
    """One expert file (already resolved) read and folded; not yet checked against the pipeline."""
    with as_mole_error():
        folded, kind = read_lora_file(path, pipe, name)
    if folded.info.get("token_abstraction"):  # its LoRA alone would give a subject without its trigger word
        raise pivotal_expert_error(path, folded.info["token_abstraction"])
    baked = FoldedAdapter(name, path, {key: lora.baked() for key, lora in folded.layers.items()}, folded.info)
    return Expert(baked, _display_name(path), kind, file_sha256(path), folded.info.get("family"),
                  folded.info.get("instance_prompt"), photo_dir(path, folded.info), scale,
                  folded.info.get("class_prompt"))


def check_count(count: int, minimum: int = MIN_EXPERTS) -> None:
    """minimum: 2 for learned gates; 1 where fixed one-hot gates only route (composition/: Switch, Composite)."""
    if count < minimum:
        hint = "give at least two LoRAs (one LoRA needs no gate)" if minimum > 1 else "give at least one LoRA"
        raise MoLEError(f"MoLE composes {minimum} to {MAX_EXPERTS} experts; got {count}: {hint}")
    if count > MAX_EXPERTS:
        raise MoLEError(f"MoLE composes {minimum} to {MAX_EXPERTS} experts; got {count}: drop some")


def check_scale(value, name: str) -> float:
    """The extra scale s_i of an expert: finite and in the range every adapter scale of the project has."""
    return float(check_number(f"scale of expert {name!r}", value, SCALE, MoLEError))


def check_experts(experts: Sequence[Expert], pipe, minimum: int = MIN_EXPERTS) -> None:
    """One family for all experts and the pipeline; every layer names an adaptable module of the right shape;
    no file given twice. Raises MoLEError naming the expert."""
    check_count(len(experts), minimum)
    known = [(e, e.family) for e in experts if e.family]
    for expert, family in known[1:]:
        if family != known[0][1]:
            raise MoLEError(f"experts of different families: {known[0][0].source} is {known[0][1]}, {expert.source} "
                            f"is {family}; all experts must be trained on one base model family")
    family = detect_family(pipe)
    if known and known[0][1] != family.name:
        raise MoLEError(f"the experts are for {known[0][1]} but the pipeline is {family.name} ({family.label}); "
                        "load a base model of the experts' family")
    seen: dict[str, str] = {}
    for expert in experts:
        if expert.sha256 in seen:
            raise MoLEError(f"expert {expert.source} is given twice (same file as {seen[expert.sha256]})")
        seen[expert.sha256] = expert.source
    components = model_components(pipe, family)
    for expert in experts:
        with as_mole_error():
            validate_folded(expert.folded, components, f"expert {expert.folded.path or expert.source}")


def unique_names(names: Sequence[str]) -> list[str]:
    """Names as given; a repeated one gets -2, -3, ... (two `lora.safetensors` in different folders)."""
    out: list[str] = []
    for name in names:
        candidate, n = name, 2
        while candidate in out:
            candidate, n = f"{name}-{n}", n + 1
        out.append(candidate)
    return out


def expert_names(paths: Sequence[str | Path], names: Sequence[str] | None = None) -> list[str]:
    """The names `load_experts` gives these files (checked paths, nothing read): for a command's checks before the
    model loads."""
    return unique_names(list(names) if names else [_display_name(resolve_expert_path(p)) for p in paths])


def pivotal_expert_error(path: Path, word: str) -> MoLEError:
    """An expert trained with pivotal tuning: its subject needs the word's learned vectors, which no expert carries."""
    return MoLEError(f"{path} was trained with pivotal tuning (learned vectors for {word!r}; the preset toy-subject "
                     "turns it on), which neither MoLE nor any composition method can apply: train that expert again "
                     "with --no-train_text_encoder_ti")


def expert_prompts(paths: Sequence[str | Path], names: Sequence[str] | None = None
                   ) -> dict[str, tuple[str | None, str | None]]:
    """{name: (the instance prompt, the class prompt) each expert file records (None: not recorded)}, from the
    files' safetensors headers only: for a command's checks before the model loads. MoLEError for a bad file."""
    with as_mole_error():
        out = {}
        for name, path in zip(expert_names(paths, names), paths, strict=True):
            resolved = resolve_expert_path(path)
            metadata = read_metadata(resolved)
            word = trigger_prompt(metadata, "token_abstraction") or trigger_word(metadata)
            if word:  # refused here, before the model loads, as read_expert would after
                raise pivotal_expert_error(resolved, word)
            out[name] = (trigger_prompt(metadata), trigger_prompt(metadata, "class_prompt"))
        return out


def load_experts(pipe, paths: Sequence[str | Path], scales: Sequence[float] | None = None,
                 names: Sequence[str] | None = None, minimum: int = MIN_EXPERTS) -> list[Expert]:
    """Reads 2..8 expert files for `pipe` (SD 1.x / 2.x / XL) and checks them all against it.

    paths: native moslora.safetensors, training output folders, diffusers or kohya LoRA files (safetensors only).
    scales: the per-expert extra scale s_i (default 1). names: defaults to the folder / file names.
    minimum: the fewest experts taken (1 for the compositions of composition/, which need no learned gate).
    Raises MoLEError (one line) for a wrong count, a pickle or missing file, an unknown key, a LoRA of another
    family, a module the pipeline lacks or a shape mismatch; the pipeline is never modified.
    """
    check_count(len(paths), minimum)
    for given, label in ((scales, "scales"), (names, "names")):
        if given is not None and len(given) != len(paths):
            raise MoLEError(f"{len(paths)} experts but {len(given)} {label}")
    resolved = [resolve_expert_path(p) for p in paths]  # every path first: a missing 2nd file fails before reading
    names = expert_names(resolved, names)
    scales = [check_scale(s, n) for s, n in zip(scales or [1.0] * len(paths), names, strict=True)]
    experts = []
    for path, name, scale in zip(resolved, names, scales, strict=True):
        with as_mole_error():
            experts.append(read_expert(path, pipe, name, scale))
    check_experts(experts, pipe, minimum)
    return experts
