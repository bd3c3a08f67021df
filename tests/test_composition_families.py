"""Regional and automatic composition on SD 2.x (v-prediction, linear projections) and SDXL (two text encoders,
pooled embeddings), with experts from a diffusers and a kohya LoRA file beside a native one."""

import numpy as np
import pytest
from composition_helpers import pixels
from composition_helpers import request as make_request
from diffusers import DiffusionPipeline
from mole_helpers import make_experts

from moslora_diffusion import load_adapter
from moslora_diffusion.composition import Region, compose
from moslora_diffusion.formats.lora import export_pipeline_loras
from moslora_diffusion.generation.fusion import FusedAdapters
from moslora_diffusion.generation.text_to_image import run_pipeline
from moslora_diffusion.mole import load_experts

PIXEL_ATOL = 1.5 / 255  # hooks vs fused weights, uint8 rounding (the expert moves pixels by > 0.1, asserted)
PROMPT = "a photo of sks dog and a cat"


@pytest.fixture(scope="module", params=[("sd2", "diffusers"), ("sdxl", "kohya")])
def family_setup(request, tiny_sd2_dir, tiny_sdxl_dir, tmp_path_factory):
    family, kind = request.param
    model = {"sd2": tiny_sd2_dir, "sdxl": tiny_sdxl_dir}[family]
    root = tmp_path_factory.mktemp(f"experts-{family}")
    dirs = make_experts(model, root, ("dog", "style"))
    source = DiffusionPipeline.from_pretrained(model)
    load_adapter(source, dirs["style"] / "moslora.safetensors")
    written = export_pipeline_loras(source, diffusers_folder=root / "diffusers", kohya_path=root / "kohya.safetensors",
                                    info={"instance_prompt": "a photo of a cat"})
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    experts = load_experts(pipe, [dirs["dog"], written[kind]], names=["dog", "style"])
    assert experts[1].source_format == kind
    return pipe, experts


def _alone(pipe, expert, req):
    fusion = FusedAdapters(pipe)
    fusion.add_folded(expert.folded, 1.0)
    try:
        return pixels(run_pipeline(pipe, req, None))
    finally:
        fusion.remove(expert.name)


def test_whole_image_region_is_the_expert_alone_and_zeros_the_base(family_setup):
    pipe, experts = family_setup
    req = make_request(PROMPT)
    whole = compose(pipe, experts, "regional", req, [Region("style", box=(0, 0, 1, 1))])
    alone = _alone(pipe, experts[1], req)
    base = pixels(run_pipeline(pipe, req, None))
    assert np.abs(pixels(whole.images) - alone).max() <= PIXEL_ATOL
    assert np.abs(alone - base).max() > 0.1
    zeros = compose(pipe, experts, "regional", req, [Region("dog", mask=np.zeros((64, 64)), prompt="a dog")])
    assert np.array_equal(pixels(zeros.images), base)


def test_two_regions_and_auto_masks_run(family_setup):
    pipe, experts = family_setup
    req = make_request(PROMPT, steps=3)
    halves = compose(pipe, experts, "regional", req, [Region("dog", box=(0, 0, 0.5, 1), prompt="a photo of sks dog"),
                                                      Region("style", box=(0.5, 0, 1, 1))])
    auto = compose(pipe, experts, "auto", req, triggers={"dog": "dog", "style": "cat"}, auto_steps=1, threshold=0.3)
    stacked = np.stack([auto.masks[0]["dog"], auto.masks[0]["style"]])
    assert stacked.sum(axis=0).max() <= 1.0 and stacked.sum() > 0
    assert np.abs(pixels(halves.images) - pixels(auto.images)).max() > 0  # different layouts, different images
