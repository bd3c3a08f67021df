"""The shipped toy base model and subject photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moslora_diffusion.data import scan_instance_folder
from moslora_diffusion.models.families import detect_model
from moslora_diffusion.toy.checker import check
from moslora_diffusion.toy.concepts import BACKGROUND
from moslora_diffusion.toy.models import tokenizer_words
from moslora_diffusion.toy.subject import PHOTOS, SUBJECT_2, SUBJECTS, is_subject

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BASE = ASSETS / "toy-base"


@pytest.fixture(scope="module")
def toy_pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(BASE)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_toy_base_is_small_fp32_safetensors_sd1(toy_pipe):
    files = [p for p in BASE.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 15 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".ckpt", ".pt")]
    assert detect_model(BASE).family.name == "sd1" and detect_model(toy_pipe).prediction_type == "epsilon"
    assert {toy_pipe.unet.dtype, toy_pipe.text_encoder.dtype, toy_pipe.vae.dtype} == {torch.float32}
    names = {n.split(".")[-1] for n, _ in toy_pipe.unet.named_modules() if ".attn2." in n}
    assert {"to_q", "to_k", "to_v"} <= names


def test_tokenizer_has_single_tokens_for_the_vocabulary(toy_pipe):
    for word in tokenizer_words():
        assert len(toy_pipe.tokenizer.tokenize(word)) == 1, word
    ids = toy_pipe.tokenizer("a photo of sks star").input_ids
    assert len(ids) == 2 + 5


def test_toy_base_generates_64px(toy_pipe):
    out = toy_pipe("a photo of a large red circle in the center, on a blue background", num_inference_steps=4,
                   generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()


def test_subject_assets_show_the_subject():
    from PIL import Image

    photos = sorted(p for p in (ASSETS / "toy-subject").glob("*.png") if not p.stem.endswith("_mask"))
    assert len(photos) == len(PHOTOS)
    for path in photos:
        image = Image.open(path)
        assert image.size == (64, 64) and is_subject(image)


def _features(pipe, prompt: str) -> torch.Tensor:
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0][0]


def test_text_encoder_tells_sks_from_the_article(toy_pipe):
    """The rare-words stage (toy/rare_words.py): "sks" gets features of its own (measured 0.48 at its
    position; 0.16 before that stage, when DreamBooth could not separate the subject from the class)."""
    plain = _features(toy_pipe, "a photo of a star")
    assert (_features(toy_pipe, "a photo of sks star") - plain).norm(dim=-1)[4] > 0.35
    assert (_features(toy_pipe, "a photo of a red star") - plain).norm(dim=-1)[5] > 5.0  # a world word: far more


def test_the_new_triggers_are_single_rare_tokens_with_features_of_their_own(toy_pipe):
    """`v` and `z` are one token each (every one-letter word is: the tokenizer's byte fallback), no world
    caption uses them, and the rare-words stage gave them features apart from the article's (measured at
    position 4: v 0.65, z 0.50, sks 0.48)."""
    from moslora_diffusion.toy.rare_words import rare_token_ids
    from moslora_diffusion.toy.world import vocabulary

    pool = set(rare_token_ids(toy_pipe.tokenizer, vocabulary()).tolist())
    plain = _features(toy_pipe, "a photo of a star")
    for token in (SUBJECT_2.token, BACKGROUND.token):
        ids = toy_pipe.tokenizer(token, add_special_tokens=False).input_ids
        assert len(ids) == 1 and ids[0] in pool, token
        assert (_features(toy_pipe, f"a photo of {token} star") - plain).norm(dim=-1)[4] > 0.35, token


def test_concept_assets_are_what_the_code_renders_and_read_as_captioned(tmp_path):
    """assets/toy-subject(-2) and assets/toy-background are `concepts.write_concepts`' output (pixel for pixel,
    the subjects' masks included), each subject photo shows its subject, each background photo the zigzag behind
    the object its caption names, and the data loader reads the captions from the `.txt` sidecars."""
    from PIL import Image

    from moslora_diffusion.toy.concepts import write_concepts

    fresh = write_concepts(tmp_path)
    for folder, paths in fresh.items():
        committed = sorted((ASSETS / folder).glob("*.png"))
        assert [p.name for p in committed] == sorted(p.name for p in (tmp_path / folder).glob("*.png")), folder
        assert {p.name for p in paths} <= {p.name for p in committed}
        for path in committed:
            assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(tmp_path / folder / path.name)))
    for subject in SUBJECTS:
        photos = [ASSETS / subject.folder / name for name in subject.photo_names()]
        assert all(subject.shown(Image.open(p)) for p in photos)
    records = scan_instance_folder(ASSETS / BACKGROUND.folder, "a fallback prompt the sidecars override")
    assert [r.caption for r in sorted(records, key=lambda r: r.path.name)] == BACKGROUND.captions()
    for record, (cls, colour, *_) in zip(sorted(records, key=lambda r: r.path.name), BACKGROUND.photos, strict=True):
        image = Image.open(record.path)
        reading = check(image)
        assert BACKGROUND.shown(image) and (reading.cls, reading.colour) == (cls, colour)


def test_the_toy_vae_keeps_what_the_checker_reads(toy_pipe):
    """A perfect copy of the photos must still be recognised after the VAE's round trip (the first subject's
    earlier centre dot was not). Measured: sks 0.65-0.80, v 0.71-0.78, zigzag 0.96-0.99."""
    from moslora_diffusion.toy.patterns import ZIGZAG_THRESHOLD, read_patterns
    from moslora_diffusion.toy.pretrain import images_to_tensor

    photos = [im for s in SUBJECTS for im in s.photo_images()] + BACKGROUND.photo_images()
    with torch.no_grad():
        latents = toy_pipe.vae.encode(images_to_tensor(photos)).latent_dist.mean
        decoded = toy_pipe.vae.decode(latents).sample
    arrays = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    readings = [read_patterns(a) for a in arrays]
    n1, n2 = len(SUBJECTS[0].photos), len(SUBJECTS[1].photos)
    assert all(r.object_patterns == ("stripes",) for r in readings[:n1])
    assert all(r.object_patterns == ("checker",) for r in readings[n1:n1 + n2])
    assert all(r.zigzag >= ZIGZAG_THRESHOLD and not r.object_patterns for r in readings[n1 + n2:])
