"""The web app's generation latency: fused adapter (scale 1.0) vs the base model vs unfused MoSLoRA wrappers,
and the time a scale change costs (what moving a slider costs before the next generation).

Three pipelines share text encoder(s), VAE and tokenizer; each has its own UNet: the plain base, one with the
adapter fused into its weights by the app's FusedAdapters, one with our MoSLoRALinear wrappers (unmerged,
as during training). Whole `pipe(...)` calls (text encoding, denoising, VAE decode), interleaved, medians
and paired ratios (benchmarks/common.py). Target: fused / base <= 1.02.

    python -m benchmarks.app_latency                       # CPU: tiny and mid configs -> results/app_latency.md
    python -m benchmarks.app_latency --configs sd15,sdxl --device cuda   # full-size architectures on a GPU
    python -m benchmarks.app_latency --quick               # smoke run (tests)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, paired_ratio, time_interleaved, write_results
from moslora_diffusion import AdapterConfig, attach_to_pipeline, pipeline_adapters, save_adapter
from moslora_diffusion.generation.fusion import FusedAdapters

# name: (size px, steps, repeats) on CPU; a GPU run uses the family's real resolution for sd15 / sdxl.
SETTINGS = {"tiny": (64, 4, 15), "mid": (256, 4, 9), "sd15": (512, 20, 5), "sdxl": (1024, 20, 3)}
# SD 1.5's block layout at half width and a half-width VAE, full CLIP-L: ~1/4 of SD 1.5's UNet.
MID_UNET = dict(in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(160, 320, 640, 640),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
                attention_head_dim=8, sample_size=32)
MID_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
               block_out_channels=(64, 128, 256, 256), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4)


def _mid_pipeline(dtype: torch.dtype):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from moslora_diffusion.models.full_size import _CLIP_L, materialize_random
    from moslora_diffusion.models.tiny import load_clip_tokenizer, write_clip_tokenizer

    with init_empty_weights():
        unet, vae = UNet2DConditionModel(**MID_UNET), AutoencoderKL(**MID_VAE)
        text = CLIPTextModel(CLIPTextConfig(**_CLIP_L))
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(Path(tmp))
        tokenizer = load_clip_tokenizer(Path(tmp))
    return StableDiffusionPipeline(unet=materialize_random(unet, dtype), vae=materialize_random(vae, dtype),
                                   text_encoder=materialize_random(text, dtype), tokenizer=tokenizer,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def build_base(config: str, dtype: torch.dtype):
    if config == "tiny":
        from moslora_diffusion.models.tiny import build_tiny_pipeline

        return build_tiny_pipeline("sd15").to(dtype)
    if config == "mid":
        return _mid_pipeline(dtype)
    from moslora_diffusion.models.full_size import build_random_pipeline

    return build_random_pipeline({"sd15": "sd1", "sdxl": "sdxl"}[config], dtype)


def with_own_unet(pipe):
    """The same pipeline (shared text encoders, VAE, tokenizers) around a copy of the UNet."""
    return type(pipe)(**{**pipe.components, "unet": copy.deepcopy(pipe.unet)})


def three_pipelines(config: str, rank: int, device: str, dtype: torch.dtype, folder: Path):
    """(base, fused at 1.0, unfused wrappers at 1.0) and the FusedAdapters; UNet attention adapters only."""
    base = build_base(config, dtype)
    unfused, fused = with_own_unet(base), with_own_unet(base)
    torch.manual_seed(0)
    attach_to_pipeline(unfused, AdapterConfig(rank=rank, alpha=rank), unet_targets="attn")
    with torch.no_grad():
        for layer in pipeline_adapters(unfused)["unet"].values():
            layer.lora_B.normal_(0, 0.02)  # a trained-looking, non-zero adapter
    path = save_adapter(unfused, folder / "moslora.safetensors")
    for pipe in (base, unfused, fused):
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
    fusion = FusedAdapters(fused)
    fusion.add("subject", path, scale=1.0)
    return base, fused, unfused, fusion


def _caller(pipe, size: int, steps: int):
    def call():
        with torch.no_grad():
            pipe("a photo of sks dog", num_inference_steps=steps, width=size, height=size, guidance_scale=7.5,
                 generator=torch.Generator().manual_seed(0), output_type="np")
    return call


def scale_change_ms(fusion: FusedAdapters, device: str, repeats: int = 20) -> float:
    """Median time of set_scales between two values (every adapted layer recomputed from W0)."""
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fusion.set_scales({"subject": 0.5 if i % 2 else 1.0})
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def rotated_rounds(fns: dict, repeats: int, device: str) -> dict[str, dict]:
    """time_interleaved, but each round starts with another variant: whatever runs first in a round (cold
    caches, a neighbour's burst of load) is spread over all of them instead of always hitting the same one."""
    names = list(fns)
    samples = {name: [] for name in names}
    for fn in fns.values():
        fn()  # warm-up
    for i in range(repeats):
        order = names[i % len(names):] + names[:i % len(names)]
        one = time_interleaved({name: fns[name] for name in order}, 1, warmup=0, device=device)
        for name in names:
            samples[name] += one[name]["samples"]
    return {name: {"median_s": statistics.median(s), "min_s": min(s), "max_s": max(s), "n": len(s), "samples": s}
            for name, s in samples.items()}


def measure(config: str, rank: int, device: str, dtype: torch.dtype, repeats: int | None = None) -> dict:
    size, steps, default_repeats = SETTINGS[config]
    with tempfile.TemporaryDirectory() as tmp:
        base, fused, unfused, fusion = three_pipelines(config, rank, device, dtype, Path(tmp))
    fns = {"base": _caller(base, size, steps), "fused": _caller(fused, size, steps),
           "unfused": _caller(unfused, size, steps)}
    times = rotated_rounds(fns, repeats or default_repeats, device)
    layers = len(fusion.adapters["subject"].layers)
    kept_mb = sum(w.numel() * w.element_size() for w in fusion._originals.values()) / 2**20
    return {"config": config, "size": size, "steps": steps, "rank": rank, "device": device,
            "dtype": str(dtype).replace("torch.", ""), "adapted_layers": layers,
            **{f"{k}_s": round(v["median_s"], 4) for k, v in times.items()},
            "fused_over_base": round(paired_ratio(times, "fused", "base"), 4),
            "unfused_over_base": round(paired_ratio(times, "unfused", "base"), 4),
            "fused_over_unfused": round(paired_ratio(times, "fused", "unfused"), 4),
            # The fastest run of each: the one a busy neighbour disturbed least (robust on a shared machine).
            "fused_over_base_best": round(times["fused"]["min_s"] / times["base"]["min_s"], 4),
            "unfused_over_base_best": round(times["unfused"]["min_s"] / times["base"]["min_s"], 4),
            "base_spread_pct": round(100 * (times["base"]["max_s"] - times["base"]["min_s"])
                                     / times["base"]["median_s"], 1),
            "scale_change_ms": round(scale_change_ms(fusion, device), 2), "kept_originals_mb": round(kept_mb, 1),
            "repeats": times["base"]["n"]}


def table(rows: list[dict]) -> str:
    head = ("| config | size | steps | rank | device | base s | fused s | unfused s | fused / base | unfused / base | "
            "fused / base (best runs) | unfused / base (best runs) | base spread % | scale change ms | "
            "adapted layers | W0 copies MB |\n|" + "---|" * 16)
    lines = [f"| {r['config']} | {r['size']} | {r['steps']} | {r['rank']} | {r['device']} {r['dtype']} | "
             f"{r['base_s']} | {r['fused_s']} | {r['unfused_s']} | {r['fused_over_base']} | "
             f"{r['unfused_over_base']} | {r['fused_over_base_best']} | {r['unfused_over_base_best']} | "
             f"{r['base_spread_pct']} | {r['scale_change_ms']} | {r['adapted_layers']} | "
             f"{r['kept_originals_mb']} |" for r in rows]
    return "\n".join([head] + lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="tiny,mid", help=f"comma-separated, from {', '.join(SETTINGS)}")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, help="timed rounds per variant (default: per config)")
    parser.add_argument("--quick", action="store_true", help="tiny config, 3 rounds, results named *_quick")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: on a shared machine extra threads mostly add noise)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    configs = ["tiny"] if args.quick else args.configs.split(",")
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    rows = [measure(c, args.rank, args.device, dtype, 3 if args.quick else args.repeats) for c in configs]
    worst = max(r["fused_over_base"] for r in rows)
    notes = (f"Whole generations (text encoding, {rows[0]['steps']}+ denoising steps with CFG, VAE decode), "
             "median of interleaved rounds; ratios are medians of per-round ratios (machine drift cancels). "
             "fused: the app's FusedAdapters at scale 1.0 (plain weights); unfused: MoSLoRALinear wrappers at "
             f"scale 1.0. Worst fused / base: {worst} (target <= 1.02). `scale change` is one "
             "FusedAdapters.set_scales call (every adapted layer recomputed from its kept original in fp32). "
             "On a shared 2-core CPU the base run's own spread ((max - min) / median) is the noise level; the "
             "best-run ratios compare each variant's fastest run.")
    write_results("app_latency_quick" if args.quick else "app_latency", rows, table(rows), notes,
                  out_dir=args.out_dir)
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
