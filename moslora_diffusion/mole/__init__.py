"""MoLE, Mixture of LoRA Experts (Wu, Huang, Wei, ICLR 2024, arXiv 2404.13628), on SD 1.x / 2.x / XL pipelines.

2 to 8 trained LoRAs (our MoSLoRA adapters through the exact fold, diffusers or kohya LoRA files) become frozen
experts; one small learned gate per block weights them:

    y = W x + sum_i g_i(block) * s_i * up_i (down_i x),    g = softmax((W_g f + b) / T)

    import moslora_diffusion.mole as mole

    experts = mole.load_experts(pipe, ["out/dog", "out/cat", "style.safetensors"])   # checks all first
    m = mole.attach_mole(pipe, experts)            # hooks; gates start uniform (= NLA, weights 1/N)
    # granularity="position": each UNet block's gate evaluated per latent position (spatial MoLE, positions.py)
    loss = task_loss + 0.5 * mole.balance_loss(m)  # only m.parameters() (the gates) train
    mole.save_mole(m, "out/mole.safetensors")      # gates + the experts' folded weights + metadata
    m.set_mask(["cat"]); m.set_scales({"dog": 1.2})  # inference: mask experts (renormalised), extra scales
    images = pipe("a photo of sks dog").images; mole.save_gate_heatmap(m.gate_report(), m.expert_names, "g.png")
    mole.detach_mole(pipe)                         # the pipeline exactly as before
    m = mole.load_mole(other_pipe, "out/mole.safetensors")
    weights = mole.average_gates(other_pipe, ["a photo of sks dog"])    # per-block constant weights
    mole.export_static(other_pipe, weights, "lora-kohya", "mole.safetensors")  # exact fold, for A1111 / ComfyUI

Every bad input raises MoLEError (an AdapterError / ValueError) with one line, before the pipeline is touched.
May import: formats, generation, moslora, models, data, files.
"""

from .experts import MAX_EXPERTS, MIN_EXPERTS, Expert, MoLEError, load_experts
from .file import FILE_NAME, MoLEFile, load_mole, read_mole, save_mole
from .gates import UNGATED, Block, Gate
from .losses import balance_loss, expert_usage
from .model import MoLE, attach_mole, attached_mole, detach_mole, hooked
from .report import render_gate_heatmap, save_gate_heatmap
from .static_export import average_gates, export_static, static_fold, static_gap

__all__ = [
    "FILE_NAME", "MAX_EXPERTS", "MIN_EXPERTS", "UNGATED", "Block", "Expert", "Gate", "MoLE", "MoLEError", "MoLEFile",
    "attach_mole", "attached_mole", "average_gates", "balance_loss", "detach_mole", "expert_usage", "export_static",
    "hooked", "load_experts", "load_mole", "read_mole", "render_gate_heatmap", "save_gate_heatmap", "save_mole",
    "static_fold", "static_gap",
]
