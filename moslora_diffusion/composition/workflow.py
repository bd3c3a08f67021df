"""A regional composition as a ComfyUI workflow in its API format, built only from ComfyUI's core nodes.

The API format (what ComfyUI's "Export (API)" writes and its /prompt endpoint takes) is one JSON object:
{node id: {"class_type": NAME, "inputs": {input: value or [source node id, output index]}, "_meta": {"title"}}}.

The graph per expert i: CreateHookLora (its LoRA file, strength s_i) -> SetClipHooks on the checkpoint's CLIP (the
expert's text-encoder layers) -> CLIPTextEncode of the region's prompt and of the negative prompt ->
LoadImageMask (its share map w_i, red channel) -> PairConditioningSetProperties (mask w_i, hooks: the expert's UNet
layers act only for this pair). The base model's pair (no hooks) gets the background mask 1 - sum_i w_i. The pairs
are joined by PairConditioningCombine into the KSampler's positive and negative. ComfyUI weighs masked conds per
latent position by their masks, so position p gets sum_i w_i(p) eps_i(p) + (1 - sum_i w_i(p)) eps_base(p): each
expert's whole-UNet prediction blended by its region, where `compose(..., "regional")` blends every adapted layer's
output; the two agree on where each expert acts, not bit for bit. Node names and inputs are those of the ComfyUI
snapshot named in tests/data/comfyui_nodes.json (checked by tests/test_composition_workflow.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Our samplers (generation/text_to_image.SCHEDULERS) -> ComfyUI's (sampler_name, scheduler). PNDM has no ComfyUI
# sampler: Euler on the same schedule is the nearest.
COMFY_SAMPLERS = {"DPM++ 2M": ("dpmpp_2m", "normal"), "Euler": ("euler", "normal"),
                  "Euler a": ("euler_ancestral", "normal"), "DDIM": ("ddim", "ddim_uniform"),
                  "PNDM": ("euler", "normal")}


@dataclass(frozen=True)
class WorkflowRegion:
    """One expert in the workflow: its LoRA file (name under ComfyUI's models/loras), its mask (name under input/,
    a greyscale PNG of the share map), the prompt its region reads, and its strength s_i."""

    expert: str
    lora: str
    mask: str
    prompt: str
    strength: float


@dataclass(frozen=True)
class WorkflowSettings:
    """The request (prompt, negative, seed, steps, CFG scale, sampler label, size in pixels), the checkpoint's file
    name under models/checkpoints, the background mask's file name (None: the regions cover the whole image) and
    the saved images' file name prefix."""

    checkpoint: str
    prompt: str
    negative: str
    seed: int
    steps: int
    cfg: float
    sampler: str
    width: int
    height: int
    background_mask: str | None = None
    prefix: str = "moslora-composition"


class _Graph:
    def __init__(self):
        self.nodes: dict[str, dict] = {}

    def add(self, class_type: str, title: str, **inputs) -> str:
        node_id = str(len(self.nodes) + 1)
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}
        return node_id


def _pair(graph: _Graph, clip: list, positive: str, negative: str, mask: str, hooks: str | None, label: str) -> list:
    """PairConditioningSetProperties of one region: [positive link, negative link]."""
    pos = graph.add("CLIPTextEncode", f"{label}: prompt", text=positive, clip=clip)
    neg = graph.add("CLIPTextEncode", f"{label}: negative prompt", text=negative, clip=clip)
    loaded = graph.add("LoadImageMask", f"{label}: mask", image=mask, channel="red")
    inputs = {"positive_NEW": [pos, 0], "negative_NEW": [neg, 0], "strength": 1.0, "set_cond_area": "default",
              "mask": [loaded, 0]}
    if hooks is not None:
        inputs["hooks"] = [hooks, 0]
    node = graph.add("PairConditioningSetProperties", f"{label}: masked conditioning", **inputs)
    return [[node, 0], [node, 1]]


def _combined(graph: _Graph, pairs: list[list]) -> list:
    positive, negative = pairs[0]
    for n, (pos, neg) in enumerate(pairs[1:], start=2):
        node = graph.add("PairConditioningCombine", f"combine regions 1-{n}", positive_A=positive,
                         negative_A=negative, positive_B=pos, negative_B=neg)
        positive, negative = [node, 0], [node, 1]
    return [positive, negative]


def comfyui_workflow(settings: WorkflowSettings, regions: Sequence[WorkflowRegion]) -> dict[str, dict]:
    """The API-format graph (see the module docstring) of `regions` (at least one) with `settings`."""
    sampler, scheduler = COMFY_SAMPLERS.get(settings.sampler, COMFY_SAMPLERS["Euler"])
    graph = _Graph()
    ckpt = graph.add("CheckpointLoaderSimple", "base checkpoint", ckpt_name=settings.checkpoint)
    clip = [ckpt, 1]
    pairs = []
    if settings.background_mask:
        pairs.append(_pair(graph, clip, settings.prompt, settings.negative, settings.background_mask, None, "base"))
    for region in regions:
        hooks = graph.add("CreateHookLora", f"{region.expert}: LoRA hook", lora_name=region.lora,
                          strength_model=region.strength, strength_clip=region.strength)
        hooked = graph.add("SetClipHooks", f"{region.expert}: CLIP with its LoRA", clip=clip, apply_to_conds=False,
                           schedule_clip=False, hooks=[hooks, 0])
        pairs.append(_pair(graph, [hooked, 0], region.prompt, settings.negative, region.mask, hooks, region.expert))
    positive, negative = _combined(graph, pairs)
    latent = graph.add("EmptyLatentImage", "empty latent", width=settings.width, height=settings.height,
                       batch_size=1)
    sampled = graph.add("KSampler", "sampler", model=[ckpt, 0], seed=settings.seed, steps=settings.steps,
                        cfg=settings.cfg, sampler_name=sampler, scheduler=scheduler, positive=positive,
                        negative=negative, latent_image=[latent, 0], denoise=1.0)
    decoded = graph.add("VAEDecode", "decode", samples=[sampled, 0], vae=[ckpt, 2])
    graph.add("SaveImage", "save", images=[decoded, 0], filename_prefix=settings.prefix)
    return graph.nodes
