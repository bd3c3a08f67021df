"""The ComfyUI workflow of a regional composition, checked against the node list of a ComfyUI snapshot kept in
tests/data/comfyui_nodes.json (class names, input names and types, links); the checker itself fails on a wrong
class name, input name, dangling link, wrong link type, missing input or an option ComfyUI does not have."""

from __future__ import annotations

import copy
import re

import pytest
from comfyui_check import load_node_list, workflow_problems

from moslora_diffusion.composition.workflow import COMFY_SAMPLERS, WorkflowRegion, WorkflowSettings, comfyui_workflow
from moslora_diffusion.generation.text_to_image import SCHEDULERS

SETTINGS = WorkflowSettings("base.safetensors", "sks star and v square", "blurry", 7, 20, 6.5, "DPM++ 2M", 512, 384,
                            "c-background.png", "moslora-c")
REGIONS = [WorkflowRegion("star", "star.safetensors", "c-star.png", "a photo of sks star", 1.0),
           WorkflowRegion("square", "square.safetensors", "c-square.png", "sks star and v square", 0.8)]


def _by_class(workflow: dict, class_type: str) -> dict[str, dict]:
    return {k: v for k, v in workflow.items() if v["class_type"] == class_type}


def _upstream(workflow: dict, node_id: str) -> set[str]:
    """Every node whose output reaches `node_id` through links."""
    seen, todo = set(), [node_id]
    while todo:
        for value in workflow[todo.pop()]["inputs"].values():
            if isinstance(value, list) and value[0] not in seen:
                seen.add(value[0])
                todo.append(value[0])
    return seen


def test_the_node_list_names_its_snapshot_and_every_node_the_export_uses():
    node_list = load_node_list()
    assert re.fullmatch(r"[0-9a-f]{40}", node_list["commit"]) and "ComfyUI" in node_list["source"]
    used = {node["class_type"] for node in comfyui_workflow(SETTINGS, REGIONS).values()}
    assert used <= set(node_list["nodes"])
    assert {"CreateHookLora", "SetClipHooks", "PairConditioningSetProperties", "PairConditioningCombine"} <= used
    for label, (sampler, scheduler) in COMFY_SAMPLERS.items():  # every sampler of ours maps to ComfyUI's options
        assert label in SCHEDULERS
        assert sampler in node_list["nodes"]["KSampler"]["required"]["sampler_name"]["options"]
        assert scheduler in node_list["nodes"]["KSampler"]["required"]["scheduler"]["options"]


def test_the_workflow_fits_the_node_list_and_wires_each_lora_to_its_masked_conditioning():
    workflow = comfyui_workflow(SETTINGS, REGIONS)
    assert workflow_problems(workflow) == []
    (sampler_id, sampler), = _by_class(workflow, "KSampler").items()
    assert (sampler["inputs"]["seed"], sampler["inputs"]["steps"], sampler["inputs"]["cfg"]) == (7, 20, 6.5)
    assert (sampler["inputs"]["sampler_name"], sampler["inputs"]["scheduler"]) == ("dpmpp_2m", "normal")
    (_, latent), = _by_class(workflow, "EmptyLatentImage").items()
    assert (latent["inputs"]["width"], latent["inputs"]["height"]) == (512, 384)
    reaching = _upstream(workflow, sampler_id)
    pairs = _by_class(workflow, "PairConditioningSetProperties")
    assert set(pairs) <= reaching and len(pairs) == 3  # the base (background) and one per expert
    masks = {}
    for pair in pairs.values():
        mask = workflow[pair["inputs"]["mask"][0]]["inputs"]["image"]
        hooks = pair["inputs"].get("hooks")
        masks[mask] = workflow[hooks[0]]["inputs"]["lora_name"] if hooks else None
        prompt = workflow[pair["inputs"]["positive_NEW"][0]]["inputs"]
        clip = workflow[prompt["clip"][0]]
        if hooks:  # the prompt is encoded with the same expert's LoRA on CLIP
            assert clip["class_type"] == "SetClipHooks" and clip["inputs"]["hooks"] == hooks
        else:
            assert clip["class_type"] == "CheckpointLoaderSimple"
    assert masks == {"c-background.png": None, "c-star.png": "star.safetensors", "c-square.png": "square.safetensors"}
    hooks = {v["inputs"]["lora_name"]: v["inputs"]["strength_model"]
             for v in _by_class(workflow, "CreateHookLora").values()}
    assert hooks == {"star.safetensors": 1.0, "square.safetensors": 0.8}
    (_, save), = _by_class(workflow, "SaveImage").items()
    assert sampler_id in _upstream(workflow, next(k for k, v in workflow.items() if v is save))


def test_no_background_pair_when_the_regions_cover_the_image():
    workflow = comfyui_workflow(WorkflowSettings(**{**SETTINGS.__dict__, "background_mask": None}), REGIONS)
    assert workflow_problems(workflow) == []
    assert len(_by_class(workflow, "PairConditioningSetProperties")) == 2


def _break(workflow: dict, how: str) -> dict:
    broken = copy.deepcopy(workflow)
    pair_id = next(iter(_by_class(broken, "PairConditioningSetProperties")))
    sampler = next(iter(_by_class(broken, "KSampler").values()))
    if how == "class name":
        next(iter(_by_class(broken, "CreateHookLora").values()))["class_type"] = "CreateHookLoRA"
    elif how == "input name":
        broken[pair_id]["inputs"]["hook"] = broken[pair_id]["inputs"].pop("mask")
    elif how == "dangling link":
        sampler["inputs"]["latent_image"] = ["999", 0]
    elif how == "output index":
        sampler["inputs"]["negative"] = [sampler["inputs"]["negative"][0], 2]
    elif how == "link type":
        sampler["inputs"]["positive"] = [next(iter(_by_class(broken, "LoadImageMask"))), 0]
    elif how == "missing input":
        del sampler["inputs"]["cfg"]
    elif how == "option":
        sampler["inputs"]["sampler_name"] = "DPM++ 2M"
    elif how == "number type":
        sampler["inputs"]["steps"] = "20"
    return broken


@pytest.mark.parametrize("how, words", [
    ("class name", "unknown class 'CreateHookLoRA'"), ("input name", "'hook': no such input"),
    ("dangling link", "dangling link to node '999'"), ("output index", "has no output 2"),
    ("link type", "takes CONDITIONING, linked to a MASK output"), ("missing input", "missing required input 'cfg'"),
    ("option", "'DPM++ 2M' is not one of its options"), ("number type", "takes INT, got '20'"),
])
def test_the_check_fails_on_a_broken_workflow(how, words):
    problems = workflow_problems(_break(comfyui_workflow(SETTINGS, REGIONS), how))
    assert any(words in p for p in problems), problems
