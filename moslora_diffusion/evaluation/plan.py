"""What an evaluation generates: subjects (their real photos, class, prompts), adapters, seeds, and one
deterministic file name per image, so an interrupted run resumes where it stopped.

A DreamBench folder (github.com/google/dreambooth, `dataset/`) holds one folder of photos per subject and
`prompts_and_classes.txt`: a `subject_name,class` table, then the 25 "Object Prompts" and the 25 "Live Subject
Prompts" as Python format strings ('a {0} {1} in the snow'.format(unique_token, class_token)). Live subjects
(the cats and dogs) take the live prompts, all others the object prompts.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..data import find_photos, load_rgb

PROMPTS_FILE = "prompts_and_classes.txt"
LIVE_CLASSES = ("cat", "dog")  # DreamBench's live subjects
_TEMPLATE = re.compile(r"""^\s*['"](.*)['"]\.format\(\s*unique_token\s*,\s*class_token\s*\)\s*,?\s*$""")


class EvaluationError(ValueError):
    """Bad evaluation input, reported as one line before anything is loaded."""


@dataclass
class Subject:
    name: str
    photos: Path  # the folder of real photos
    prompts: list[str]  # as generated (with the unique token)
    cls: str = ""
    adapters: dict[str, Path | None] = field(default_factory=dict)  # label -> adapter file (None: the base model)

    def check_references(self) -> list[str]:
        """Notes on the real photos (each file skipped, with why; each very small one); EvaluationError naming the
        skipped files when none is usable. The photos used are listed afterwards by `references()`."""
        found = find_photos(self.photos)
        skipped = [f"{s.path.name}: {s.reason}" for s in found.skipped]
        if not found.photos:
            why = f" ({'; '.join(skipped)})" if skipped else ""
            raise EvaluationError(f"{self.photos}: no photos of subject {self.name!r} to compare with{why}")
        notes = [f"subject {self.name!r}: reference {line}; skipped" for line in skipped]
        notes += [f"subject {self.name!r}: reference {p.path.name} is {p.size[0]}x{p.size[1]}, very small: the "
                  "scorers upscale it, so it compares as a blurry photo" for p in found.photos if p.too_small()]
        return notes

    def references(self) -> list[str]:
        """The file names of the real photos compared with (files decided by content)."""
        return [photo.path.name for photo in find_photos(self.photos).photos]

    def real_images(self) -> list:
        """The real photos as RGB PIL images (files decided by content; at least one, else EvaluationError)."""
        found = find_photos(self.photos)
        if not found.photos:
            raise EvaluationError(f"{self.photos}: no photos of subject {self.name!r} to compare with")
        return [load_rgb(photo.path) for photo in found.photos]


@dataclass(frozen=True)
class Job:
    adapter: str
    subject: str
    prompt: str
    seed: int

    def path(self, images_dir: Path) -> Path:
        """<images_dir>/<adapter>/<subject>/<prompt slug>-<hash>/seed-<seed>.png: the same job, the same file."""
        slug = re.sub(r"[^a-z0-9]+", "-", self.prompt.lower()).strip("-")[:60] or "prompt"
        digest = hashlib.sha256(self.prompt.encode("utf-8")).hexdigest()[:8]
        return images_dir / _safe(self.adapter) / _safe(self.subject) / f"{slug}-{digest}" / f"seed-{self.seed}.png"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name) or "_"


def jobs(subjects: list[Subject], seeds: list[int]) -> list[Job]:
    """Every (adapter, subject, prompt, seed), in generation order (one adapter load per subject)."""
    return [Job(label, s.name, prompt, seed) for s in subjects for label in s.adapters for prompt in s.prompts
            for seed in seeds]


def read_prompts_file(path: Path) -> list[str]:
    """Prompts one per line (empty lines and lines starting with # skipped)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise EvaluationError(f"--prompts_file {path}: cannot read it ({err})") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise EvaluationError(f"--prompts_file {path} holds no prompts (one per line)")
    return prompts


def parse_dreambench(text: str) -> tuple[dict[str, str], list[str], list[str]]:
    """(subject -> class, object prompt templates, live prompt templates) of a prompts_and_classes.txt.

    Templates use {0} for the unique token and {1} for the class noun."""
    classes, object_prompts, live_prompts = {}, [], []
    section = None
    for line in text.splitlines():
        stripped = line.strip()
        lowered = stripped.lower()
        if lowered in ("classes", "object prompts", "live subject prompts"):
            section = lowered
        elif section == "classes" and "," in stripped and lowered != "subject_name,class":
            name, cls = (part.strip() for part in stripped.split(",", 1))
            classes[name] = cls
        elif (found := _TEMPLATE.match(stripped)) and section in ("object prompts", "live subject prompts"):
            (object_prompts if section == "object prompts" else live_prompts).append(found.group(1))
    if not classes or not object_prompts or not live_prompts:
        raise EvaluationError(f"not a DreamBench {PROMPTS_FILE}: expected a Classes table (subject_name,class) and "
                              "the Object Prompts and Live Subject Prompts lists")
    return classes, object_prompts, live_prompts


def dreambench_subjects(folder: Path, token: str, only: list[str] | None = None) -> list[Subject]:
    """The subjects of a DreamBench folder that have a photo folder (all, or those named in `only`)."""
    prompts_file = folder / PROMPTS_FILE
    if not prompts_file.is_file():
        raise EvaluationError(f"--dreambench {folder}: no {PROMPTS_FILE} in it (the DreamBench dataset folder)")
    classes, object_prompts, live_prompts = parse_dreambench(prompts_file.read_text(encoding="utf-8"))
    unknown = sorted(set(only or ()) - set(classes))
    if unknown:
        raise EvaluationError(f"--subjects: {', '.join(unknown)} not in {prompts_file}")
    subjects = []
    for name, cls in classes.items():
        if (only and name not in only) or not (folder / name).is_dir():
            continue
        templates = live_prompts if cls in LIVE_CLASSES else object_prompts
        subjects.append(Subject(name, folder / name, [t.format(token, cls) for t in templates], cls))
    if not subjects:
        raise EvaluationError(f"--dreambench {folder}: none of the subjects in {PROMPTS_FILE} has a photo folder")
    return subjects
