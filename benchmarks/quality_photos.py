"""The quality benchmark's training photos: the subject's photos copied into a run folder with the captions of a
captions mode and, for masked-loss recipes, the `<stem>_mask.png` subject mask next to every copy."""

from __future__ import annotations

import shutil
from pathlib import Path

from moslora_diffusion.data import find_photos, mask_file
from moslora_diffusion.data.scan import MASK_SUFFIX


def photo_scene(name: str) -> tuple[str, str] | None:
    """(position, background) of a subject photo named `NN_<position>_<background>.png` (as subject.write_photos
    names them), else None."""
    from moslora_diffusion.toy.world import BACKGROUND_COLOURS, POSITIONS

    parts = Path(name).stem.split("_")
    if len(parts) != 3 or parts[1] not in POSITIONS or parts[2] not in BACKGROUND_COLOURS:
        return None
    return parts[1], parts[2]


def scene_captions(position: str, background: str, mode: str) -> list[str]:
    """The training captions of one photo: "scene" its full scene; "mixed" also the scene with only the
    background, only the position, and none of it (the photo is repeated once per caption)."""
    from moslora_diffusion.toy.subject import INSTANCE_PROMPT
    from moslora_diffusion.toy.world import POSITIONS

    where, on = f" {POSITIONS[position][1]}", f", on a {background} background"
    full = [INSTANCE_PROMPT + where + on]
    return full if mode == "scene" else full + [INSTANCE_PROMPT + on, INSTANCE_PROMPT + where, INSTANCE_PROMPT]


def toy_subject_mask(name: str):
    """The subject's silhouette (PIL "L", 64 x 64) in the toy subject photo `name` (subject.photo_names), as
    subject.write_photos draws it, or None when `name` is not one of those photos."""
    from moslora_diffusion.toy.subject import SUBJECT
    from moslora_diffusion.toy.world import render_mask

    names = SUBJECT.photo_names()
    return render_mask(SUBJECT.scene(*SUBJECT.photos[names.index(name)])) if name in names else None


def _copy(photo: Path, copy: Path, masks: bool) -> None:
    """`photo` to `copy`, and with `masks` its mask to `<copy stem>_mask.*` (the file beside the photo, else the
    toy subject's silhouette)."""
    shutil.copyfile(photo, copy)
    if not masks:
        return
    source = mask_file(photo)
    if source is not None:
        shutil.copyfile(source, copy.with_name(copy.stem + MASK_SUFFIX + source.suffix))
        return
    toy_subject_mask(photo.name).save(copy.with_name(copy.stem + MASK_SUFFIX + ".png"))  # checked: there is one


def instance_folder(src: Path, dst: Path, captions: str, masks: bool = False) -> Path:
    """The subject photos for training, copied to `dst` with caption sidecars (see `scene_captions`; the scene of
    each photo is read from its file name), or bare (`captions="prompt"`: every photo gets the instance prompt).
    With `masks`, every copy gets its mask beside it: `<stem>-<k>.png` gets `<stem>-<k>_mask.png`."""
    photos = [p.path for p in find_photos(src).photos]  # decided by content; `<stem>_mask.*` files are not photos
    if not photos:
        raise SystemExit(f"--instance-dir {src}: no images")
    if captions != "prompt":
        unreadable = [p.name for p in photos if photo_scene(p.name) is None]
        if unreadable:
            raise SystemExit(f"--captions {captions}: cannot read a scene from {unreadable[0]} (expected "
                             "NN_<position>_<background>.png, as subject.write_photos names them)")
    if masks:
        unmasked = [p.name for p in photos if mask_file(p) is None and toy_subject_mask(p.name) is None]
        if unmasked:
            raise SystemExit(f"masked loss: {unmasked[0]} has no {Path(unmasked[0]).stem}{MASK_SUFFIX}.png beside it "
                             "(give every photo a mask, or leave the masked recipe out)")
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for photo in photos:
        if captions == "prompt":
            _copy(photo, dst / photo.name, masks)
            continue
        for k, text in enumerate(scene_captions(*photo_scene(photo.name), captions)):
            copy = dst / f"{photo.stem}-{k}{photo.suffix}"
            _copy(photo, copy, masks)
            copy.with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
    return dst
