"""Static export: constant gates fold exactly into one standard LoRA (read back by diffusers and by our loader),
gates averaged over prompts, and the gap between static and dynamic gates."""

import json
import logging

import pytest
import torch
from diffusers import DiffusionPipeline
from mole_helpers import forward, make_experts

from moslora_diffusion.files.safetensors_io import load_tensors
from moslora_diffusion.formats.lora_files import read_lora_file
from moslora_diffusion.generation.fusion import FusedAdapters
from moslora_diffusion.mole import (
    UNGATED,
    attach_mole,
    attached_mole,
    average_gates,
    export_static,
    load_experts,
    static_fold,
    static_gap,
)
from moslora_diffusion.moslora.folded import FoldedAdapter

# The MoLE hooks vs a LoRA of the concatenated ranks (PEFT's layers in diffusers, or our fused weights): the same
# products in another order. Observed <= 1.5e-6 on outputs of magnitude 1.1-2.7; the gates move them by > 0.05.
ATOL = 2e-5
PROMPTS = ["a photo of sks dog"]


@pytest.fixture(scope="module")
def expert_dirs(tiny_dirs, tmp_path_factory):
    return {family: make_experts(tiny_dirs[family], tmp_path_factory.mktemp(f"experts-{family}"))
            for family in ("sd15", "sdxl")}


def _block_weights(mole, seed=0) -> dict[str, list[float]]:
    """A different constant weight vector per block (each on the simplex)."""
    g = torch.Generator().manual_seed(seed)
    names = [b.name for b in mole.blocks] + ([UNGATED] if mole.has_ungated_layers else [])
    return {name: torch.softmax(torch.randn(len(mole.experts), generator=g) * 2, 0).tolist() for name in names}


def _diffusers_loaded(model_dir, path, caplog):
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        pipe.load_lora_weights(path)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]  # nothing dropped
    return pipe


def _close(a, b):
    return (a - b).abs().max().item() <= ATOL


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_constant_gates_export_exactly_as_one_lora(family, tiny_dirs, expert_dirs, tmp_path, caplog):
    dirs = expert_dirs[family]
    pipe = DiffusionPipeline.from_pretrained(tiny_dirs[family])
    mole = attach_mole(pipe, load_experts(pipe, [dirs["dog"], dirs["cat"]]))
    weights = _block_weights(mole)
    mole.set_fixed_gates(weights)
    mole.set_scales({"cat": 1.5})
    text, dynamic = forward(pipe, PROMPTS)
    mole.set_fixed_gates([0.5, 0.5])
    assert (forward(pipe, PROMPTS)[1] - dynamic).abs().max() > 0.05  # the per-block weights matter
    kohya = export_static(pipe, weights, "lora-kohya", tmp_path / "mole.safetensors", dtype="fp32")
    folder = export_static(pipe, weights, "lora-diffusers", tmp_path / "diffusers", dtype="fp32")
    assert attached_mole(pipe) is mole  # LoRA targets leave the pipeline as it was
    tensors, _ = load_tensors(kohya)
    ranks = {v.shape[0] for k, v in tensors.items() if k.endswith(".lora_down.weight")}
    assert ranks == {2, 4, 6}  # cat alone (proj_in/out), dog alone (text encoder), both concatenated (4 + 2)
    for path in (kohya, folder):
        loaded_text, loaded = forward(_diffusers_loaded(tiny_dirs[family], path, caplog), PROMPTS)
        assert _close(loaded, dynamic) and _close(loaded_text, text), path
    ours = DiffusionPipeline.from_pretrained(tiny_dirs[family])
    FusedAdapters(ours).add_folded(read_lora_file(kohya, ours, "static")[0], scale=1.0)
    ours_text, ours_out = forward(ours, PROMPTS)
    assert _close(ours_out, dynamic) and _close(ours_text, text)


def _weights(pipe, component: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in getattr(pipe, component).state_dict().items()}


def test_three_expert_static_kohya_export_loads_in_diffusers_as_merged_on_every_layer(tiny_sd15_dir, expert_dirs,
                                                                                      tmp_path):
    """dog adapts the text attention (rank 4), style the text attention and MLP (rank 3): the fold's text layers
    have ranks 7 and 3. diffusers' own kohya loader (0.42 with transformers 5) renames the text layers' keys but
    not their `.alpha` keys, so it gives every text layer the file's most common alpha: the file must store one
    alpha for all layers. The fp16 file, loaded and fused by diffusers, equals our merge of the same fold on every
    weight to fp16 rounding (observed 7e-4 of the layer's change; per-layer alphas missed the text MLP layers by
    more than their whole change).
    The tiny text encoder has the full-size key names (text_model.encoder.layers.N.*), which the rename is about."""
    dirs = expert_dirs["sd15"]
    pipe = DiffusionPipeline.from_pretrained(tiny_sd15_dir)
    mole = attach_mole(pipe, load_experts(pipe, [dirs["dog"], dirs["cat"], dirs["style"]]))
    weights = _block_weights(mole, seed=3)
    path = export_static(pipe, weights, "lora-kohya", tmp_path / "mole.safetensors", dtype="fp16")
    tensors, _ = load_tensors(path)
    text_ranks = {v.shape[0] for k, v in tensors.items() if k.startswith("lora_te") and "lora_down" in k}
    assert text_ranks == {7, 3} and any(k.startswith("lora_te_text_model_encoder_layers_0_mlp") for k in tensors)
    assert len({float(v) for k, v in tensors.items() if k.endswith(".alpha")}) == 1  # one alpha for every layer
    ours = DiffusionPipeline.from_pretrained(tiny_sd15_dir)
    folded = static_fold(mole, weights)
    FusedAdapters(ours).add_folded(FoldedAdapter("static", None, {(c, m): lora for c, modules in folded.items()
                                                                  for m, lora in modules.items()}), scale=1.0)
    theirs = DiffusionPipeline.from_pretrained(tiny_sd15_dir)
    theirs.load_lora_weights(str(path))
    theirs.fuse_lora()
    theirs.unload_lora_weights()
    base = DiffusionPipeline.from_pretrained(tiny_sd15_dir)
    changed = 0
    for component in ("unet", "text_encoder"):
        before, merged, loaded = (_weights(p, component) for p in (base, ours, theirs))
        assert loaded.keys() == merged.keys()
        for key, weight in merged.items():
            change = float((weight - before[key]).abs().max())
            changed += change > 0
            assert float((loaded[key] - weight).abs().max()) <= 2e-3 * change + 1e-7, (component, key)
    assert changed >= 40  # every adapted layer of the three experts was compared, text MLP included


def test_static_fold_covers_ungated_layers_and_masked_experts(tiny_sd15_dir, expert_dirs):
    dirs = expert_dirs["sd15"]
    pipe = DiffusionPipeline.from_pretrained(tiny_sd15_dir)
    mole = attach_mole(pipe, load_experts(pipe, list(dirs.values())))
    mole.set_mask(["cat"])
    weights = _block_weights(mole, seed=1)
    mole.set_fixed_gates(weights)  # renormalised over dog and style
    _, dynamic = forward(pipe, PROMPTS)
    folded = static_fold(mole, {block: w[0].tolist() for block, w in mole.fixed.items()})  # as the gates apply them
    assert "down_blocks.0.resnets.0.time_emb_proj" in folded["unet"]  # style's ungated layer is exported too
    ranks = {lora.rank for lora in folded["unet"].values()}
    assert 2 not in ranks and max(ranks) == 4 + 3  # cat (rank 2) is masked: left out; dog + style concatenated
    ours = DiffusionPipeline.from_pretrained(tiny_sd15_dir)
    layers = {(c, m): lora for c, modules in folded.items() for m, lora in modules.items()}
    FusedAdapters(ours).add_folded(FoldedAdapter("static", None, layers), scale=1.0)
    assert _close(forward(ours, PROMPTS)[1], dynamic)


def test_averaged_gates_and_the_static_gap(tiny_sd15_dir, expert_dirs, tmp_path):
    dirs = expert_dirs["sd15"]
    pipe = DiffusionPipeline.from_pretrained(tiny_sd15_dir)
    mole = attach_mole(pipe, load_experts(pipe, list(dirs.values())))
    uniform = average_gates(pipe, seeds=(0,), steps=2)  # the experts' trigger prompts
    assert all(w == pytest.approx([1 / 3] * 3) for w in uniform.values())  # untrained gates: NLA
    assert static_gap(pipe, uniform, steps=2)["latents_rel_l2"] < 1e-6  # constant gates: nothing lost
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for gate in mole.gates:
            gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) * 0.3)
    weights = average_gates(pipe, ["a photo of sks dog", "a photo of a cat"], seeds=(0, 1), steps=2)
    assert weights.keys() == uniform.keys() and UNGATED in weights
    assert all(sum(w) == pytest.approx(1.0) for w in weights.values())
    assert max(abs(a - 1 / 3) for w in weights.values() for a in w) > 0.01
    gap = static_gap(pipe, weights, ["a photo of sks dog", "a photo of a cat"], steps=2)
    assert 0 < gap["unet_output_rel_l2"] < 1 and 0 < gap["latents_rel_l2"] < 1 and len(gap["per_prompt"]) == 2
    assert mole.fixed is None  # static_gap restores the learned gates


def test_merged_single_file_export_bakes_the_static_fold(tiny_sd15_dir, expert_dirs, tmp_path):
    dirs = expert_dirs["sd15"]
    pipe = DiffusionPipeline.from_pretrained(tiny_sd15_dir)
    mole = attach_mole(pipe, load_experts(pipe, [dirs["dog"], dirs["cat"]]))
    weights = _block_weights(mole, seed=2)
    mole.set_fixed_gates(weights)
    _, dynamic = forward(pipe, PROMPTS)
    path = export_static(pipe, weights, "merged-single-file", tmp_path / "merged.safetensors", dtype="fp32",
                         base="tiny-sd15")
    assert attached_mole(pipe) is None  # merged targets detach MoLE and bake the fold into the pipeline
    assert _close(forward(pipe, PROMPTS)[1], dynamic)
    tensors, meta = load_tensors(path)
    assert any(k.startswith("model.diffusion_model.") for k in tensors)
    record = json.loads(meta["moslora_merge"])
    assert [a["name"] for a in record["adapters"]] == ["dog", "cat"] and record["mole_static_weights"] == weights
    assert "a photo of sks dog" in meta["modelspec.description"]
