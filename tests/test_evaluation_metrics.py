"""Evaluation scorers: DINO and CLIP (tiny random models saved as safetensors, nothing downloaded) and the toy
checker behind one interface; DreamBooth's DINO / CLIP-I / CLIP-T per image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from moslora_diffusion.evaluation.hf_scorers import ClipScorer, DinoScorer
from moslora_diffusion.evaluation.metrics import clip_t_prompt, dreambench_metrics, score_images, toy_metrics
from moslora_diffusion.evaluation.scorer import Scorer, ScorerError
from moslora_diffusion.evaluation.toy_scorer import ToyScorer, prompt_attributes, prompt_score
from moslora_diffusion.files.safetensors_io import WeightFileError
from moslora_diffusion.toy.subject import subject_photos, subject_scene
from moslora_diffusion.toy.world import Scene, caption, render


def _noise_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def scorers(tiny_scorer_dirs):
    return {"dino": DinoScorer(tiny_scorer_dirs["dino"], batch_size=2),
            "clip": ClipScorer(tiny_scorer_dirs["clip"], batch_size=2)}


def test_every_scorer_speaks_the_interface(scorers):
    for scorer in [*scorers.values(), ToyScorer()]:
        assert isinstance(scorer, Scorer)


@pytest.mark.parametrize("name", ["dino", "clip"])
def test_identical_images_score_one_and_others_less(scorers, name):
    images = _noise_images(3)
    sim = scorers[name].image_similarity(images, images)
    assert sim.shape == (3, 3)
    torch.testing.assert_close(sim.diagonal(), torch.ones(3), atol=1e-5, rtol=0)
    assert (sim - torch.eye(3)).max() < 1 - 1e-3  # random different images are not identical to the model


@pytest.mark.parametrize("name", ["dino", "clip"])
def test_batched_features_equal_unbatched(scorers, name):
    images = _noise_images(5, seed=1)
    scorer = scorers[name]
    batched = scorer.image_features(images)  # batches of 2, 2, 1
    single = torch.cat([scorer.image_features([im]) for im in images])
    assert batched.shape[0] == 5 and batched.ndim == 2
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_clip_text_similarity_is_the_cosine_of_its_features(scorers):
    clip = scorers["clip"]
    images, prompts = _noise_images(3, seed=2), ["a photo of dog", "a star", "sks photo"]
    sims = clip.text_similarity(images, prompts)
    image, text = clip.image_features(images), clip.text_features(prompts)
    expected = (image / image.norm(dim=-1, keepdim=True) * (text / text.norm(dim=-1, keepdim=True))).sum(-1)
    assert sims.shape == (3,)
    torch.testing.assert_close(sims, expected, atol=1e-5, rtol=0)
    single = torch.cat([clip.text_similarity([im], [p]) for im, p in zip(images, prompts, strict=True)])
    torch.testing.assert_close(sims, single, atol=1e-5, rtol=1e-5)


def test_dino_has_no_text_and_mismatched_lists_are_refused(scorers):
    with pytest.raises(ScorerError, match="no text encoder"):
        scorers["dino"].text_similarity(_noise_images(1), ["a dog"])
    with pytest.raises(ScorerError, match="2 images but 1 prompts"):
        scorers["clip"].text_similarity(_noise_images(2), ["a dog"])
    with pytest.raises(ScorerError, match="empty"):
        scorers["clip"].image_features([])


def test_dreambench_scores_average_over_all_real_photos(scorers):
    generated, real = _noise_images(2, seed=3), _noise_images(3, seed=4)
    scores = score_images(dreambench_metrics(scorers["dino"], scorers["clip"]), generated, real,
                          ["a sks dog", "a sks dog"], "sks")
    dino = scorers["dino"].image_similarity(generated, real).mean(dim=1)
    assert scores["dino"] == pytest.approx(dino.tolist(), abs=1e-6)
    clip_t = scorers["clip"].text_similarity(generated, ["a dog", "a dog"])  # the token dropped
    assert scores["clip_t"] == pytest.approx(clip_t.tolist(), abs=1e-6)
    assert len(scores["clip_i"]) == 2


def test_clip_t_prompt_drops_the_unique_token():
    assert clip_t_prompt("a sks dog in the jungle", "sks") == "a dog in the jungle"
    assert clip_t_prompt("a photo of olis sks cat", "olis sks") == "a photo of cat"


def test_a_folder_of_pickle_weights_only_is_refused_before_loading(tmp_path):
    folder = tmp_path / "dino-bin"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(WeightFileError, match=r"only pickle weights \(pytorch_model.bin\).*\.safetensors only"):
        DinoScorer(folder)
    with pytest.raises(ValueError, match="not a file"):
        ClipScorer(folder / "pytorch_model.bin")


def test_toy_scorer_identical_images_and_the_subject():
    toy = ToyScorer(batch_size=2)
    photos = subject_photos()
    plain = [render(Scene("star", "yellow", "large", "center", "blue", "plain")),
             render(Scene("circle", "red", "small", "left", "green", "plain"))]
    sim = toy.image_similarity(photos + plain, photos)
    torch.testing.assert_close(sim[:5].diagonal(), torch.ones(5), atol=1e-5, rtol=0)
    assert sim[:5].min() == pytest.approx(1.0)  # every subject photo shows the subject
    assert sim[5:].max() < 0.5  # one-colour objects do not
    assert toy.image_features(photos + plain).shape == (7, 1)


def test_toy_prompt_scores_its_own_image_higher_than_a_shuffled_one():
    scenes = [Scene(c, col, s, p, bg, "plain") for c, col, s, p, bg in
              [("star", "red", "large", "left", "blue"), ("circle", "green", "small", "right", "pink"),
               ("square", "white", "large", "top", "black"), ("heart", "purple", "small", "bottom", "yellow")]]
    images, prompts = [render(s) for s in scenes], [caption(s) for s in scenes]
    toy = ToyScorer()
    own = toy.text_similarity(images, prompts)
    shuffled = toy.text_similarity(images, prompts[1:] + prompts[:1])
    assert own.min() > 0.9 and shuffled.max() < 0.5
    subject_prompt = "a photo of sks star on the left, on a green background"
    subject = render(subject_scene("left", 30, "green"))
    assert prompt_score(subject, subject_prompt) == pytest.approx(1.0)
    assert prompt_score(images[0], subject_prompt) < 0.75  # a red star on blue: no subject, wrong background


def test_toy_prompt_attributes():
    assert prompt_attributes("a photo of a small red star on the left, on a blue striped background") == {
        "cls": "star", "colour": "red", "size": "small", "position": "left", "background": "blue"}
    assert prompt_attributes("a photo of sks star") == {"cls": "star", "subject": True}


def test_toy_metrics_per_image():
    photos = subject_photos()
    scores = score_images(toy_metrics(ToyScorer()), photos[:2], photos, ["a photo of sks star"] * 2, "sks")
    assert scores == {"toy_subject": [1.0, 1.0], "toy_prompt": [1.0, 1.0]}
