"""Automatic regions: trigger words checked before the model, masks from the early cross-attention that are 0/1 and
never overlap, and the second pass is exactly the regional method with those masks."""

import numpy as np
import pytest
from composition_helpers import pipeline_and_experts, pixels, request
from mole_helpers import same_state, state

from moslora_diffusion.composition import CompositionError, Region, compose
from moslora_diffusion.composition.auto import auto_triggers

PROMPT = "a photo of sks dog and a cat"
TRIGGERS = {"dog": "dog", "style": "cat"}


@pytest.fixture(scope="module")
def setup(tiny_sd15_dir, tmp_path_factory):
    return pipeline_and_experts(tiny_sd15_dir, tmp_path_factory.mktemp("experts"))


def test_trigger_words_from_the_training_prompts():
    found = auto_triggers({"star": "a photo of sks star", "bg": "a photo of a star, on a z background"},
                          "sks star on a z background")
    assert found == {"star": ["sks"], "bg": ["z"]}  # "star" is in both training prompts: it names neither


@pytest.mark.parametrize("triggers, prompt, message", [
    ({"dog": "dog", "style": "zebra"}, PROMPT, "the prompt does not contain 'style''s trigger word 'zebra'"),
    ({"cow": "dog"}, PROMPT, "a trigger word for expert 'cow', which is not there"),
    # both tiny experts record "a photo of sks dog": no word of it tells them apart
    (None, PROMPT, "every word of expert 'dog''s training prompt ('a photo of sks dog') is another expert's too"),
])
def test_bad_trigger_words_are_one_line_before_the_model(setup, triggers, prompt, message):
    _, experts, _ = setup
    with pytest.raises(CompositionError) as err:
        compose(None, experts, "auto", request(prompt), triggers=triggers)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_class_prompts_words_are_no_trigger_words():
    """"a photo of a dog" took the class noun "dog" as the trigger of the sks-dog expert, so a prompt that never
    called the subject got a region for it."""
    prompts, classes = {"dog": "a photo of sks dog", "cat": "a photo of zwx cat"}, {"dog": "a photo of a dog"}
    with pytest.raises(CompositionError, match="the prompt contains no trigger word of expert 'dog'"):
        auto_triggers(prompts, "a photo of a dog and zwx cat", class_prompts=classes)
    found = auto_triggers(prompts, "a photo of sks dog and zwx cat", class_prompts=classes)
    assert found == {"dog": ["sks"], "cat": ["zwx", "cat"]}  # cat records no class prompt: as before
    same = auto_triggers({"dog": "a photo of a dog"}, "a dog", class_prompts={"dog": "a photo of a dog"})
    assert same == {"dog": ["dog"]}  # a training prompt of class words only keeps them


def test_an_expert_without_a_recorded_prompt_asks_for_its_trigger_word():
    """A LoRA from elsewhere records no training prompt: the message said "(trained on None)"."""
    with pytest.raises(CompositionError, match="expert 'kohya' records no training prompt to take its trigger word "
                       "from; give --trigger kohya=WORD"):
        auto_triggers({"dog": "a photo of sks dog", "kohya": None}, "sks dog and a cat")


@pytest.mark.parametrize("options, message", [({"auto_steps": 9}, "auto_steps must be"),
                                              ({"threshold": 0}, "threshold must lie in (0, 1]")])
def test_bad_auto_options(setup, options, message):
    _, experts, _ = setup
    with pytest.raises(CompositionError, match=message.replace("(", r"\(").replace("]", r"\]")):
        compose(None, experts, "auto", request(PROMPT), triggers=TRIGGERS, **options)


def test_auto_masks_are_disjoint_and_the_second_pass_is_regional_with_them(setup):
    pipe, experts, _ = setup
    before = state(pipe)
    req = request(PROMPT, steps=3)
    result = compose(pipe, experts, "auto", req, triggers=TRIGGERS, auto_steps=1, threshold=0.3)
    assert same_state(before, state(pipe)) and not hasattr(pipe, "_moslora_spatial_router")
    masks = result.masks[0]
    stacked = np.stack([masks["dog"], masks["style"]])
    assert set(np.unique(stacked)) <= {0.0, 1.0} and stacked.sum(axis=0).max() <= 1.0
    assert masks["dog"].sum() > 0 and masks["style"].sum() > 0  # each expert found a place
    regions = [Region(name, mask=mask) for name, mask in masks.items()]
    again = compose(pipe, experts, "regional", req, regions)
    assert np.array_equal(pixels(again.images), pixels(result.images))


def test_experts_whose_words_are_all_shared_are_told_apart_by_trigger():
    """Two experts trained on one prompt: the message said the prompt had no trigger word, though it had."""
    with pytest.raises(CompositionError, match="every word of expert 'a'.s training prompt .* is another expert's "
                       "too, so none tells them apart; give --trigger a=WORD"):
        auto_triggers({"a": "a photo of sks star", "b": "a photo of sks star"}, "a photo of sks star")
