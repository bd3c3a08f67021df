"""The shipped toy base model and subject photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moslora_diffusion.models.families import detect_model
from moslora_diffusion.toy.models import tokenizer_words
from moslora_diffusion.toy.subject import PHOTOS, is_subject

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

    photos = sorted((ASSETS / "toy-subject").glob("*.png"))
    assert len(photos) == len(PHOTOS)
    for path in photos:
        image = Image.open(path)
        assert image.size == (64, 64) and is_subject(image)


def test_text_encoder_tells_sks_from_the_article(toy_pipe):
    """The rare-words stage (toy/rare_words.py): "sks" gets features of its own (measured 0.48 at its
    position; 0.16 before that stage, when DreamBooth could not separate the subject from the class)."""
    def features(prompt: str) -> torch.Tensor:
        ids = toy_pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            return toy_pipe.text_encoder(ids)[0][0]

    plain = features("a photo of a star")
    assert (features("a photo of sks star") - plain).norm(dim=-1)[4] > 0.35
    assert (features("a photo of a red star") - plain).norm(dim=-1)[5] > 5.0  # a world word changes far more
