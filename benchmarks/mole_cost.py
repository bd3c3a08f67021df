"""What MoLE costs (issue: "Cost"): generation with 3 experts and dynamic gates vs the base model, the static
export vs the base model, and one gate-training step vs one DreamBooth step at the same settings.

Generation: the full-size SD 1.5 architecture with random weights (no download), fp32. Three experts, each a
MoSLoRA adapter (rank 16, alpha 16) on the UNet attention and the text encoder's attention with non-zero B, are
composed by MoLE with learned (random, non-uniform) gates on every block: the UNet step (one forward at batch 2,
classifier-free guidance) and the text encoder (one forward at batch 2) are timed, interleaved with the base
model's, and the whole generation is estimated as text + steps x UNet + VAE decode (timed once: the same for
every variant). The static export is the fold of those gates into one LoRA, fused into the weights by the app's
FusedAdapters: a plain model. Targets: dynamic / base <= 1.15; static / base = 1.

Training: one optimizer step at batch 1 (forward, backward, AdamW) of DreamBooth (MoSLoRA rank 16 on the UNet
attention) vs gate training (3 experts as above, UNet gates), same UNet, resolution and data.

    python -m benchmarks.mole_cost                        # CPU, 512 px generation, 256 px training
    python -m benchmarks.mole_cost --size tiny --repeats 2 --name mole_cost_smoke   # smoke run (tests)
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import RESULTS_DIR, paired_ratio, time_interleaved, write_results
from moslora_diffusion import AdapterConfig, attach_to_pipeline, detach_from_pipeline, pipeline_adapters, save_adapter
from moslora_diffusion.generation.fusion import FusedAdapters
from moslora_diffusion.mole import attach_mole, detach_mole, load_experts, static_fold
from moslora_diffusion.moslora.folded import FoldedAdapter

EXPERTS = 3


def build_pipeline(size: str):
    if size == "tiny":
        from moslora_diffusion.models.tiny import build_tiny_pipeline

        return build_tiny_pipeline("sd15")
    from moslora_diffusion.models.full_size import build_random_pipeline

    return build_random_pipeline("sd1", torch.float32)


def write_experts(pipe, rank: int, folder: Path, count: int = EXPERTS) -> list[Path]:
    """`count` MoSLoRA adapters (UNet and text attention) with non-zero B, saved and taken off again."""
    paths = []
    for i in range(count):
        torch.manual_seed(i)
        attach_to_pipeline(pipe, AdapterConfig(rank=rank, alpha=rank), unet_targets="attn", text_targets="attn")
        with torch.no_grad():
            for layers in pipeline_adapters(pipe).values():
                for layer in layers.values():
                    layer.lora_B.normal_(0, 0.02)
        paths.append(save_adapter(pipe, folder / f"expert{i}" / "moslora.safetensors",
                                  info={"instance_prompt": f"a photo of sks{i} thing"}))
        detach_from_pipeline(pipe)
    return paths


def randomize_gates(mole) -> None:
    """Learned-looking gates: non-uniform, input-dependent."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for gate in mole.gates:
            gate.weight.normal_(0, 0.05, generator=generator)
            gate.bias.normal_(0, 0.5, generator=generator)


def conditioning(pipe, px: int):
    ids = pipe.tokenizer(["a photo of sks0 thing", ""], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    latents = torch.randn(2, 4, px // 8, px // 8, generator=torch.Generator().manual_seed(0))
    return ids, latents


def generation_rows(pipe, paths: list[Path], px: int, repeats: int) -> tuple[list[dict], dict]:
    static = type(pipe)(**{**pipe.components, "unet": copy.deepcopy(pipe.unet),
                           "text_encoder": copy.deepcopy(pipe.text_encoder)})
    dynamic = type(pipe)(**{**pipe.components, "unet": copy.deepcopy(pipe.unet),
                            "text_encoder": copy.deepcopy(pipe.text_encoder)})
    mole = attach_mole(dynamic, load_experts(dynamic, paths))
    randomize_gates(mole)
    ids, latents = conditioning(pipe, px)
    with torch.no_grad():
        weights = _averaged_gates(dynamic, mole, ids, latents)
    folded = static_fold(mole, weights)
    layers = {(c, m): lora for c, modules in folded.items() for m, lora in modules.items()}
    FusedAdapters(static).add_folded(FoldedAdapter("mole-static", None, layers), scale=1.0)
    variants = {"base": pipe, "mole_dynamic": dynamic, "mole_static": static}
    fns = {}
    for name, p in variants.items():
        fns[f"unet_{name}"] = _unet_call(p, ids, latents)
        fns[f"text_{name}"] = _text_call(p, ids)
    times = time_interleaved(fns, repeats, warmup=1)
    vae = time_interleaved({"vae": _vae_call(pipe, latents[:1])}, 1, warmup=0)["vae"]["median_s"]
    rows, summary = [], {}
    for name in variants:
        unet_ratio = paired_ratio(times, f"unet_{name}", "unet_base")
        text_ratio = paired_ratio(times, f"text_{name}", "text_base")
        unet_s, text_s = times[f"unet_{name}"]["median_s"], times[f"text_{name}"]["median_s"]
        rows.append({"kind": "generation", "variant": name, "unet_step_s": unet_s, "text_encoder_s": text_s,
                     "unet_ratio": unet_ratio, "text_ratio": text_ratio})
    for steps in (25,):
        base_total = times["text_base"]["median_s"] + steps * times["unet_base"]["median_s"] + vae
        for row in rows:
            total = row["text_encoder_s"] + steps * row["unet_step_s"] + vae
            row[f"generation_{steps}_steps_s"] = total
            row[f"generation_{steps}_steps_ratio"] = total / base_total
    summary["vae_decode_s"] = vae
    summary["gate_parameters"] = sum(p.numel() for p in mole.parameters())
    summary["blocks"] = len(mole.blocks)
    detach_mole(dynamic)
    return rows, summary


def _averaged_gates(pipe, mole, ids, latents) -> dict[str, list[float]]:
    mole.reset_report()
    pipe.unet(latents, 500, encoder_hidden_states=pipe.text_encoder(ids)[0])
    report = mole.gate_report()
    mole.reset_report()
    return report


def _unet_call(pipe, ids, latents):
    hidden = pipe.text_encoder(ids)[0].detach()

    def call():
        with torch.no_grad():
            # MoLE's text gates run in the text encoder; its UNet gates read this prompt embedding.
            pipe.unet(latents, 500, encoder_hidden_states=hidden)
    return call


def _text_call(pipe, ids):
    def call():
        with torch.no_grad():
            pipe.text_encoder(ids)
    return call


def _vae_call(pipe, latents):
    def call():
        with torch.no_grad():
            pipe.vae.decode(latents / pipe.vae.config.scaling_factor)
    return call


def training_rows(pipe, paths: list[Path], px: int, rank: int, repeats: int) -> list[dict]:
    """One AdamW step at batch 1: DreamBooth (MoSLoRA adapters train) vs gate training (only the gates)."""
    ids, latents = conditioning(pipe, px)
    hidden = pipe.text_encoder(ids[:1])[0].detach()
    noise = torch.randn_like(latents[:1])
    dreambooth = type(pipe)(**{**pipe.components, "unet": copy.deepcopy(pipe.unet)})
    torch.manual_seed(0)
    attach_to_pipeline(dreambooth, AdapterConfig(rank=rank, alpha=rank), unet_targets="attn")
    adapter_params = [p for p in dreambooth.unet.parameters() if p.requires_grad]
    gated = type(pipe)(**{**pipe.components, "unet": copy.deepcopy(pipe.unet)})
    mole = attach_mole(gated, [e for e in load_experts(gated, paths)])
    randomize_gates(mole)

    def step(unet, params, optimizer):
        def call():
            loss = F.mse_loss(unet(latents[:1], 500, encoder_hidden_states=hidden).sample.float(), noise)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            mole.clear_gates()
        return call

    fns = {"dreambooth_step": step(dreambooth.unet, adapter_params, torch.optim.AdamW(adapter_params, 1e-4)),
           "gate_step": step(gated.unet, list(mole.parameters()), torch.optim.AdamW(mole.parameters(), 1e-3))}
    times = time_interleaved(fns, repeats, warmup=1)
    ratio = paired_ratio(times, "gate_step", "dreambooth_step")
    return [{"kind": "training", "variant": name, "step_s": times[name]["median_s"],
             "ratio_to_dreambooth": ratio if name == "gate_step" else 1.0} for name in fns]


def table(rows: list[dict]) -> str:
    lines = ["| generation | UNet step (batch 2) | / base | text encoder | / base | 25-step generation | / base |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in (r for r in rows if r["kind"] == "generation"):
        lines.append(f"| {r['variant']} | {r['unet_step_s']:.3f} s | {r['unet_ratio']:.3f} | "
                     f"{r['text_encoder_s'] * 1e3:.0f} ms | {r['text_ratio']:.3f} | "
                     f"{r['generation_25_steps_s']:.1f} s | {r['generation_25_steps_ratio']:.3f} |")
    lines += ["", "| training step (batch 1) | seconds | / DreamBooth step |", "|---|---:|---:|"]
    for r in (r for r in rows if r["kind"] == "training"):
        lines.append(f"| {r['variant']} | {r['step_s']:.3f} | {r['ratio_to_dreambooth']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["full", "tiny"], default="full", help="full-size SD 1.5 or the tiny one")
    parser.add_argument("--resolution", type=int, default=512, help="generation resolution (px)")
    parser.add_argument("--train-resolution", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--name", default="mole_cost")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = build_pipeline(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_experts(pipe, args.rank, Path(tmp))
        rows, summary = generation_rows(pipe, paths, args.resolution, args.repeats)
        rows += training_rows(pipe, paths, args.train_resolution, args.rank, args.repeats)
    notes = (f"{'Full-size SD 1.5' if args.size == 'full' else 'Tiny SD 1.5'} architecture, random weights, fp32, "
             f"CPU. Generation at {args.resolution} px: {EXPERTS} experts (MoSLoRA rank {args.rank} on UNet and text "
             f"attention), {summary['blocks']} gated blocks, {summary['gate_parameters']} gate parameters; the "
             f"25-step estimate adds the VAE decode ({summary['vae_decode_s']:.2f} s, the same for all). Training at "
             f"{args.train_resolution} px. Medians of {args.repeats} interleaved rounds; ratios are medians of the "
             "per-round ratios (benchmarks/common.py). Targets: MoLE dynamic <= 1.15x the base generation, static "
             "export = base speed.\n\n    python -m benchmarks.mole_cost "
             + " ".join(sys.argv[1:] if argv is None else argv))
    write_results(args.name, rows + [{"kind": "summary", **summary}], table(rows), notes, args.out_dir)
    return rows


if __name__ == "__main__":
    main()
