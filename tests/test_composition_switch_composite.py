"""LoRA Switch and LoRA Composite (arXiv 2402.16843): with one expert each is that expert alone; with two, Switch
runs the expert its schedule names at every step and Composite feeds the pipeline the mean of the experts'
predictions (so the guided step is the mean of their guided predictions); the pipeline is left as it was; bad
input is one line before anything is touched. References fuse each expert into the weights (FusedAdapters): an
implementation independent of the MoLE hooks the compositions use. Every expert has non-zero deltas."""

import numpy as np
import pytest
from composition_helpers import request as small_request
from conftest import generate
from mole_helpers import make_experts, same_state
from one_at_a_time_helpers import (
    PIXEL_ATOL,
    UNET_ATOL,
    alone,
    conditioning,
    fresh,
    guided,
    image,
    snapshot,
    unet_calls,
    unet_output,
)

from moslora_diffusion import load_adapter
from moslora_diffusion.composition import CompositionError
from moslora_diffusion.composition.composite import generate_composite
from moslora_diffusion.composition.one_at_a_time import experts_one_at_a_time
from moslora_diffusion.composition.switch import check_every, generate_switch
from moslora_diffusion.formats.lora import export_pipeline_loras
from moslora_diffusion.generation.text_to_image import GenerationError, make_scheduler, run_pipeline
from moslora_diffusion.mole import MoLEError, attach_mole, attached_mole, detach_mole, load_experts


@pytest.fixture(scope="module")
def model_dirs(tiny_dirs, tiny_sd2_dir):
    return {**tiny_dirs, "sd2": tiny_sd2_dir}


@pytest.fixture(scope="module")
def experts(model_dirs, tmp_path_factory):
    """{family: {"dog": folder, "cat": folder, "style": folder, "style_kohya": file}}: dog adapts UNet and text
    attention, cat UNet attention + proj_in/out and no text layer, style also the feed-forward, the resnets'
    time_emb_proj (outside every block) and the text MLP; style_kohya is style written as a kohya LoRA file."""
    made = {}

    def get(family):
        if family not in made:
            root = tmp_path_factory.mktemp(f"experts-{family}")
            dirs = make_experts(model_dirs[family], root, names=("dog", "cat", "style"))
            pipe = fresh(model_dirs[family])
            load_adapter(pipe, dirs["style"] / "moslora.safetensors")
            dirs["style_kohya"] = export_pipeline_loras(pipe, kohya_path=root / "style_kohya.safetensors")["kohya"]
            made[family] = dirs
        return made[family]

    return get


def request(**changes):
    """4 DDIM steps at 64 px, guidance 5 (classifier-free guidance on), seed 0."""
    return small_request(**{"steps": 4, **changes})


def _array(images):
    return np.asarray(images[0]).astype(int)


def _differs(a, b) -> bool:
    """Not equal within the tolerance equal images meet (PIXEL_ATOL). Observed (max over pixels): two experts vs
    either alone 3 to 240 levels (the small end: Switch on the tiny SD 1.5), an expert vs the base 28 or more."""
    return abs(a - b).max() > PIXEL_ATOL


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("name", ["dog", "style"])  # style: text MLP and the ungated resnet time_emb_proj too
def test_one_expert_switch_and_composite_equal_that_expert_alone(family, name, tiny_dirs, experts):
    dirs, req = experts(family), request()
    reference = image(alone(tiny_dirs[family], dirs[name]), req)
    assert _differs(reference, image(alone(tiny_dirs[family]), req))  # the expert really changes the image
    pipe = fresh(tiny_dirs[family])
    one = load_experts(pipe, [dirs[name]], minimum=1)
    assert abs(_array(generate_switch(pipe, one, req, every=1)) - reference).max() <= PIXEL_ATOL
    assert abs(_array(generate_composite(pipe, one, req)) - reference).max() <= PIXEL_ATOL


def test_sd2_v_prediction_with_a_negative_prompt_and_two_images(model_dirs, experts):
    """SD 2.x (v-prediction): one expert through either method is that expert alone for every image of a batch;
    two experts run with a negative prompt and a batch of two."""
    dirs, req = experts("sd2"), request(num_images=2, negative_prompt="blurry")
    reference = alone(model_dirs["sd2"], dirs["dog"])
    reference.scheduler = make_scheduler(req.scheduler, reference.scheduler.config)
    expected = [np.asarray(i).astype(int) for i in run_pipeline(reference, req, None)]
    pipe = fresh(model_dirs["sd2"])
    one = load_experts(pipe, [dirs["dog"]], minimum=1)
    for method in (lambda: generate_switch(pipe, one, req, every=1), lambda: generate_composite(pipe, one, req)):
        got = method()
        assert len(got) == 2
        for image_, reference_ in zip(got, expected, strict=True):
            assert abs(np.asarray(image_).astype(int) - reference_).max() <= PIXEL_ATOL
    assert _differs(expected[0], expected[1])  # two seeds, two different images
    two = load_experts(pipe, [dirs["dog"], dirs["cat"]])
    assert len(generate_switch(pipe, two, req, every=1)) == len(generate_composite(pipe, two, req)) == 2


def _references(model_dir, dirs, names, req):
    """Per expert: its fused pipeline and the UNet conditioning that pipeline builds for `req`."""
    pipes = [alone(model_dir, dirs[n]) for n in names]
    return pipes, [conditioning(p, req) for p in pipes]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_switch_runs_the_scheduled_expert_at_every_step(family, tiny_dirs, experts):
    """Two experts (the second from a kohya file), a switch every 2 steps over 7 steps: the paper's schedule
    (step k runs expert (k // 2) mod 2) is dog, dog, style, style, dog, dog, style. At each step the UNet output
    the pipeline got equals that expert alone on the same latents (with its own prompt encoding) and not the
    other expert."""
    dirs, req = experts(family), request(steps=7)
    pipe = fresh(tiny_dirs[family])
    two = load_experts(pipe, [dirs["dog"], dirs["style_kohya"]])
    with unet_calls(pipe) as calls:
        switched = _array(generate_switch(pipe, two, req, every=2))
    assert len(calls) == 7
    pipes, conds = _references(tiny_dirs[family], dirs, ["dog", "style"], req)
    for step, expected in enumerate([0, 0, 1, 1, 0, 0, 1]):
        outs = [unet_output(p, calls[step], c) for p, c in zip(pipes, conds, strict=True)]
        assert (calls[step].output - outs[expected]).abs().max() <= UNET_ATOL, step
        assert (calls[step].output - outs[1 - expected]).abs().max() > 100 * UNET_ATOL, step
    for name in ("dog", "style"):  # and the image is neither expert's own
        assert _differs(switched, image(alone(tiny_dirs[family], dirs[name]), req))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_composite_step_is_the_mean_of_the_experts_guided_predictions(family, tiny_dirs, experts):
    dirs, req = experts(family), request()
    pipe = fresh(tiny_dirs[family])
    two = load_experts(pipe, [dirs["dog"], dirs["cat"]])
    with unet_calls(pipe) as calls:
        composed = _array(generate_composite(pipe, two, req))
    assert len(calls) == req.steps  # one call per step as the pipeline sees it (two expert forwards inside)
    pipes, conds = _references(tiny_dirs[family], dirs, ["dog", "cat"], req)
    for call in calls:
        outs = [unet_output(p, call, c) for p, c in zip(pipes, conds, strict=True)]
        assert (outs[0] - outs[1]).abs().max() > 100 * UNET_ATOL  # the two experts predict differently
        assert (call.output - (outs[0] + outs[1]) / 2).abs().max() <= UNET_ATOL
        # what the scheduler steps with: the paper's mean of per-expert guided predictions (guidance is linear)
        paper = (guided(outs[0], req.guidance) + guided(outs[1], req.guidance)) / 2
        assert (guided(call.output, req.guidance) - paper).abs().max() <= req.guidance * UNET_ATOL
    for name in ("dog", "cat"):
        assert _differs(composed, image(alone(tiny_dirs[family], dirs[name]), req))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_the_pipeline_is_left_exactly_as_it_was(family, tiny_dirs, experts):
    dirs = experts(family)
    pipe = fresh(tiny_dirs[family])
    image_before = generate(pipe)  # first: a call leaves the pipeline's per-call attributes and transformers' hooks
    before = snapshot(pipe)
    two = load_experts(pipe, [dirs["dog"], dirs["style"]])
    generate_switch(pipe, two, request(), every=1)
    generate_composite(pipe, two, request())

    def broken(router, original, args, kwargs):
        raise RuntimeError("stop in the middle of a generation")

    with pytest.raises(RuntimeError, match="stop in the middle"), experts_one_at_a_time(pipe, two, broken):
        pipe("a photo", num_inference_steps=1, height=32, width=32)
    after = snapshot(pipe)
    assert attached_mole(pipe) is None
    assert same_state(before.pop("state"), after.pop("state"))
    assert after.pop("scheduler") is before.pop("scheduler")
    assert after == before  # hooks, instance attributes (no wrapped forward / encode_prompt left), config
    assert (generate(pipe) == image_before).all()  # bit for bit


def test_bad_input_is_one_line_before_the_pipeline_is_touched(tiny_dirs, experts):
    dirs = experts("sd15")
    pipe = fresh(tiny_dirs["sd15"])
    two = load_experts(pipe, [dirs["dog"], dirs["cat"]])
    before = snapshot(pipe)
    cases = [
        (lambda: generate_switch(pipe, two, request(), every=0), CompositionError, "every .* must be between 1"),
        (lambda: generate_switch(pipe, two, request(), every=2.5), CompositionError, "must be a whole number"),
        (lambda: generate_switch(pipe, two, request(steps=4), every=4), CompositionError,
         "never active: use every <= 3"),
        (lambda: generate_switch(pipe, [], request()), CompositionError, "no experts to compose"),
        (lambda: generate_composite(pipe, [], request()), CompositionError, "no experts to compose"),
        (lambda: generate_composite(pipe, two, request(prompt=" ")), GenerationError, "enter a prompt"),
        (lambda: load_experts(pipe, [], minimum=1), MoLEError, "got 0: give at least one LoRA"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message) as caught:
            call()
        assert "\n" not in str(caught.value)
    attach_mole(pipe, two)  # a pipeline that already has MoLE is refused before anything changes
    with pytest.raises(MoLEError, match="already has MoLE attached"):
        generate_composite(pipe, two, request())
    with pytest.raises(MoLEError, match="got 1: give at least two"):  # learned gates still need two experts
        load_experts(fresh(tiny_dirs["sd15"]), [dirs["dog"]])
    detach_mole(pipe)
    after = snapshot(pipe)
    assert same_state(before.pop("state"), after.pop("state")) and after == before


def test_check_every_names_the_fix():
    assert check_every(5, 3, 25) == 5
    assert check_every("2", 1, 1) == 2  # one expert: any interval
    with pytest.raises(CompositionError, match="use at least 3 steps"):
        check_every(1, 3, 2)


def test_the_default_interval_gives_every_expert_a_turn():
    """Without `every`, Switch takes the paper's 5 when there are enough steps and a shorter interval when not (a
    2-step run with the default was refused: 'the last of the 2 experts is never active')."""
    from moslora_diffusion.composition.switch import DEFAULT_EVERY, check_every, default_every

    assert default_every(2, 50) == DEFAULT_EVERY == 5 and default_every(3, 25) == 5
    assert default_every(2, 2) == 1 and default_every(2, 5) == 4 and default_every(4, 7) == 2
    for count in range(1, 9):
        for steps in range(count, 40):
            every = default_every(count, steps)
            assert check_every(every, count, steps) == every
            assert {(s // every) % count for s in range(steps)} == set(range(count))  # every expert has a turn
