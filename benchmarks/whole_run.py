"""Wall time of a whole DreamBooth run with prior preservation: diffusers' train_dreambooth_lora.py vs ours.

Three variants, all timed in one process, rounds interleaved (the order rotates every round):

- peer: what users otherwise run, diffusers' `examples/dreambooth/train_dreambooth_lora.py`, re-written
  compactly below (`peer_train`) with the same per-step work: images opened and transformed by the data
  loader, the batch VAE-encoded, the prompts encoded by the text encoder, UNet LoRA through
  `unet.add_adapter(LoraConfig(...))`, AdamW, prior-preservation loss on the concatenated class half;
- ours: `train_dreambooth.py` (moslora_diffusion.training.train) with its default flags (a MoSLoRA
  adapter; frozen text encoders, so every distinct prompt is encoded once; every distinct image, after
  crop and flip, is VAE-encoded once: training/posteriors.py);
- ours_cached: the same plus `--cache_latents` (every dataset item encoded before the steps);
- ours_rerun: ours' default flags again, after an earlier (untimed) run on the same photos and class folder
  left its VAE posteriors in the on-disk latent cache (training/posterior_store.py): the everyday case of
  training once more with another learning rate, rank or step count. `ours` and `ours_cached` each start
  from an empty cache (and pay for writing it), so they are first-run figures.

Same model, images, rank/alpha/targets, batch size, lr, resolution, dtype, seed and steps. A run's wall
time goes from the call that starts it to its adapter on disk (loading the model, data, VAE/text work,
the steps, logging, saving); the library imports and an untimed warm-up run per variant come first, so
one-time costs are excluded for both sides alike. Class images are written to the class folder before
anything is timed (both trainers find them present and generate none).

    python -m benchmarks.whole_run                                   # CPU figure: small model, 100 steps
    python -m benchmarks.whole_run --model full-sd15 --device cuda   # full-size SD 1.5 (random weights), 512 px
    python -m benchmarks.whole_run --model tiny --steps 3 --repeats 1 --num-class-images 4   # smoke run
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, synchronize, write_results

REPO = Path(__file__).resolve().parents[1]
TOY_BASE = REPO / "assets" / "toy-base"
TOY_SUBJECT = REPO / "assets" / "toy-subject"
INSTANCE_PROMPT, CLASS_PROMPT = "a photo of sks star", "a photo of a star"  # the toy subject's prompts
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
VARIANTS = ("peer", "ours", "ours_cached", "ours_rerun")
DESCRIPTIONS = {
    "peer": "diffusers train_dreambooth_lora.py loop (PEFT LoRA; VAE + text encoder every step)",
    "ours": "train_dreambooth.py, default flags (MoSLoRA; each distinct prompt and image encoded once)",
    "ours_cached": "train_dreambooth.py --cache_latents (every item encoded before the steps)",
    "ours_rerun": "train_dreambooth.py, default flags, rerun: an earlier run's posteriors in the latent cache",
}


@dataclass(frozen=True)
class RunSpec:
    """What every variant trains on, with what: the settings both trainers are given alike."""

    model: str
    instance_dir: str
    class_dir: str
    num_class_images: int
    resolution: int
    rank: int
    num_instance_images: int
    steps: int
    mixed_precision: str
    report_to: str
    learning_rate: float = 1e-4
    train_batch_size: int = 1
    seed: int = 0
    prior_loss_weight: float = 1.0
    max_grad_norm: float = 1.0


# --- the peer: diffusers' examples/dreambooth/train_dreambooth_lora.py, compactly -----------------------------
#
# Public structure of that script (diffusers main, 2024-2025), followed step by step here:
#   main(args): Accelerator(gradient_accumulation_steps, mixed_precision, log_with=report_to ("tensorboard" by
#   default), project_config); set_seed; class images counted in --class_data_dir (none generated when enough
#   exist); AutoTokenizer(subfolder="tokenizer", use_fast=False), DDPMScheduler / text encoder / AutoencoderKL /
#   UNet2DConditionModel .from_pretrained(subfolder=...); all requires_grad_(False), moved to the device in the
#   weight dtype; unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
#   target_modules=[to_k, to_q, to_v, to_out.0, add_k_proj, add_v_proj])) (the add_* projections do not exist
#   in SD 1.x UNets); cast_training_params(fp32) under fp16; AdamW on the trainable parameters;
#   DreamBoothDataset (every __getitem__ opens the instance and the class image, exif_transpose, RGB,
#   transforms Resize(bilinear) -> Center/RandomCrop -> ToTensor -> Normalize([0.5], [0.5]), tokenizes both
#   prompts unless --pre_compute_text_embeddings); DataLoader(shuffle=True, collate_fn: instance rows then
#   class rows, num_workers=0); get_scheduler("constant"); accelerator.prepare(unet, optimizer, dataloader,
#   lr_scheduler); init_trackers("dreambooth-lora"). Each step, inside accelerator.accumulate(unet): VAE
#   encode -> latent_dist.sample() * scaling_factor, randn_like noise, randint timesteps, add_noise,
#   encode_prompt(text_encoder, input_ids) (no attention mask by default), unet(...), target noise / velocity,
#   chunk(2) into instance and prior halves, mse + prior_loss_weight * prior mse, accelerator.backward,
#   clip_grad_norm_(max_grad_norm=1.0), optimizer / lr_scheduler step, zero_grad; then progress bar and
#   accelerator.log({"loss": loss.detach().item(), "lr": ...}) every step; checkpoint every 500 steps (default).
#   At the end: unwrap, unet.to(float32), convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
#   StableDiffusionLoraLoaderMixin.save_lora_weights(output_dir, ...), then a "final inference" that reloads
#   the pipeline and loads the LoRA back (not timed here: the clock stops once the adapter is written).

PEER_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


class PeerDreamBoothDataset(torch.utils.data.Dataset):
    """The script's DreamBoothDataset: per item, both images decoded and transformed, both prompts tokenized."""

    def __init__(self, instance_root, instance_prompt, class_root, class_prompt, class_num, tokenizer, size,
                 center_crop=False):
        self.size, self.center_crop, self.tokenizer = size, center_crop, tokenizer
        self.instance_images_path = list(Path(instance_root).iterdir())
        self.num_instance_images = len(self.instance_images_path)
        self.instance_prompt, self.class_prompt = instance_prompt, class_prompt
        self.class_images_path = list(Path(class_root).iterdir())
        self.num_class_images = min(len(self.class_images_path), class_num)
        self._length = max(self.num_class_images, self.num_instance_images)

    def __len__(self):
        return self._length

    def transform(self, image) -> torch.Tensor:
        """torchvision's Resize(size, BILINEAR) -> CenterCrop / RandomCrop(size) -> ToTensor -> Normalize(0.5, 0.5)
        (torchvision is not a dependency here: the same operations through PIL and torch)."""
        from PIL import Image

        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        if short != self.size:
            new_long = int(self.size * long / short)
            image = image.resize((self.size, new_long) if width <= height else (new_long, self.size),
                                 Image.Resampling.BILINEAR)
        width, height = image.size
        if self.center_crop:
            top, left = int(round((height - self.size) / 2.0)), int(round((width - self.size) / 2.0))
        else:
            top = int(torch.randint(0, height - self.size + 1, (1,)))
            left = int(torch.randint(0, width - self.size + 1, (1,)))
        image = image.crop((left, top, left + self.size, top + self.size))
        tensor = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        tensor = tensor.view(self.size, self.size, 3).permute(2, 0, 1).float().div(255)
        return (tensor - 0.5) / 0.5

    def _load(self, path: Path) -> torch.Tensor:
        from PIL import Image, ImageOps

        image = ImageOps.exif_transpose(Image.open(path))
        if image.mode != "RGB":
            image = image.convert("RGB")
        return self.transform(image)

    def _tokens(self, prompt: str):
        return self.tokenizer(prompt, truncation=True, padding="max_length",
                              max_length=self.tokenizer.model_max_length, return_tensors="pt")

    def __getitem__(self, index):
        example = {"instance_images": self._load(self.instance_images_path[index % self.num_instance_images])}
        tokens = self._tokens(self.instance_prompt)
        example["instance_prompt_ids"], example["instance_attention_mask"] = tokens.input_ids, tokens.attention_mask
        example["class_images"] = self._load(self.class_images_path[index % self.num_class_images])
        tokens = self._tokens(self.class_prompt)
        example["class_prompt_ids"], example["class_attention_mask"] = tokens.input_ids, tokens.attention_mask
        return example


def peer_collate(examples, with_prior_preservation=True):
    """Instance rows first, then class rows (one UNet pass for both halves)."""
    prefixes = ("instance", "class") if with_prior_preservation else ("instance",)
    pixel_values = torch.stack([ex[f"{p}_images"] for p in prefixes for ex in examples])
    return {"input_ids": torch.cat([ex[f"{p}_prompt_ids"] for p in prefixes for ex in examples]),
            "attention_mask": [ex[f"{p}_attention_mask"] for p in prefixes for ex in examples],
            "pixel_values": pixel_values.to(memory_format=torch.contiguous_format).float()}


def peer_train(spec: RunSpec, output_dir: Path) -> dict:
    """One whole run of the peer; returns {"wall_s", "cpu_s", "loop_s"}. The clock stops once the LoRA is written."""
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, CLIPTextModel

    started, cpu_started = time.perf_counter(), time.process_time()
    accelerator = Accelerator(
        gradient_accumulation_steps=1, mixed_precision=spec.mixed_precision,
        log_with=None if spec.report_to == "none" else spec.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")))
    set_seed(spec.seed)
    if len(list(Path(spec.class_dir).iterdir())) < spec.num_class_images:
        raise RuntimeError("the benchmark writes the class images before timing; the peer would generate some")
    output_dir.mkdir(parents=True, exist_ok=True)

    model = spec.model
    tokenizer = AutoTokenizer.from_pretrained(model, subfolder="tokenizer", use_fast=False)
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    for module in (vae, text_encoder, unet):
        module.requires_grad_(False)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for module in (unet, vae, text_encoder):
        module.to(accelerator.device, dtype=weight_dtype)

    unet.add_adapter(LoraConfig(r=spec.rank, lora_alpha=spec.rank, init_lora_weights="gaussian",
                                target_modules=TARGETS))
    if spec.mixed_precision == "fp16":
        cast_training_params(unet, dtype=torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    dataset = PeerDreamBoothDataset(spec.instance_dir, INSTANCE_PROMPT, spec.class_dir, CLASS_PROMPT,
                                    spec.num_class_images, tokenizer, spec.resolution)
    loader = torch.utils.data.DataLoader(dataset, batch_size=spec.train_batch_size, shuffle=True,
                                         collate_fn=partial(peer_collate, with_prior_preservation=True),
                                         num_workers=0)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0,
                                 num_training_steps=spec.steps * accelerator.num_processes)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    num_epochs = math.ceil(spec.steps / len(loader))
    accelerator.init_trackers("dreambooth-lora", config={k: v for k, v in vars(spec).items()
                                                          if isinstance(v, (int, float, str, bool))})
    progress = tqdm(range(spec.steps), desc="Steps", disable=not accelerator.is_local_main_process)

    loop_started, global_step = time.perf_counter(), 0
    for _epoch in range(num_epochs):
        unet.train()
        for batch in loader:
            with accelerator.accumulate(unet):
                pixel_values = batch["pixel_values"].to(dtype=weight_dtype)
                model_input = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
                noise = torch.randn_like(model_input)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (model_input.shape[0],),
                                          device=model_input.device).long()
                noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)
                encoder_hidden_states = text_encoder(batch["input_ids"].to(text_encoder.device),
                                                     attention_mask=None)[0]
                model_pred = unet(noisy_model_input, timesteps, encoder_hidden_states, return_dict=False)[0]
                if noise_scheduler.config.prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(model_input, noise, timesteps)
                else:
                    target = noise
                model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
                target, target_prior = torch.chunk(target, 2, dim=0)
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
                prior_loss = F.mse_loss(model_pred_prior.float(), target_prior.float(), reduction="mean")
                loss = loss + spec.prior_loss_weight * prior_loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, spec.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                progress.update(1)
                global_step += 1
                # (checkpoint every 500 steps by default: never reached in runs this benchmark times)
            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}
            progress.set_postfix(**logs)
            accelerator.log(logs, step=global_step)
            if global_step >= spec.steps:
                break
    synchronize(str(accelerator.device))
    loop_s = time.perf_counter() - loop_started
    progress.close()

    accelerator.wait_for_everyone()
    unet = accelerator.unwrap_model(unet).to(torch.float32)
    unet_lora_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionLoraLoaderMixin.save_lora_weights(save_directory=str(output_dir),
                                                     unet_lora_layers=unet_lora_layers,
                                                     text_encoder_lora_layers=None)
    accelerator.end_training()
    wall_s, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    if not (output_dir / PEER_WEIGHT_NAME).is_file():
        raise RuntimeError(f"the peer wrote no {PEER_WEIGHT_NAME}")
    return {"wall_s": wall_s, "cpu_s": cpu_s, "loop_s": loop_s}


# --- ours ------------------------------------------------------------------------------------------------------


def ours_train(spec: RunSpec, output_dir: Path, cache_latents: bool, latent_cache_dir: Path) -> dict:
    """One whole run of train_dreambooth.py (in process); returns {"wall_s", "cpu_s", "loop_s", "vae_encoded"}."""
    from moslora_diffusion.training import parse_args, train
    from moslora_diffusion.training.outputs import ADAPTER_FILE

    argv = ["--pretrained_model_name_or_path", spec.model, "--instance_data_dir", spec.instance_dir,
            "--instance_prompt", INSTANCE_PROMPT, "--with_prior_preservation", "--class_data_dir", spec.class_dir,
            "--class_prompt", CLASS_PROMPT, "--num_class_images", str(spec.num_class_images),
            "--resolution", str(spec.resolution), "--rank", str(spec.rank), "--lora_alpha", str(spec.rank),
            "--learning_rate", str(spec.learning_rate), "--max_train_steps", str(spec.steps),
            "--train_batch_size", str(spec.train_batch_size), "--seed", str(spec.seed),
            "--mixed_precision", spec.mixed_precision, "--report_to", spec.report_to,
            "--output_dir", str(output_dir), "--latent_cache_dir", str(latent_cache_dir)]
    config = parse_args(argv + (["--cache_latents"] if cache_latents else []))
    started, cpu_started = time.perf_counter(), time.process_time()
    result = train(config)
    wall_s, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    if not (output_dir / ADAPTER_FILE).is_file():
        raise RuntimeError(f"our trainer wrote no {ADAPTER_FILE}")
    return {"wall_s": wall_s, "cpu_s": cpu_s, "loop_s": result.loop_seconds, "vae_encoded": result.vae_encoded}


def run_variant(variant: str, spec: RunSpec, output_dir: Path, rerun_cache: Path) -> dict:
    """One run; ours' first-run variants get an empty latent cache beside their output, removed with it."""
    if variant == "peer":
        return peer_train(spec, output_dir)
    cache = rerun_cache if variant == "ours_rerun" else output_dir / "latent-cache"
    return ours_train(spec, output_dir, cache_latents=variant == "ours_cached", latent_cache_dir=cache)


# --- inputs (prepared once, not timed) -------------------------------------------------------------------------


def prepare_model(choice: str | None, work: Path) -> tuple[str, str]:
    """(diffusers folder, what it is) for --model: a folder, "tiny", "full-sd15", or None (toy base, else tiny)."""
    if choice is None:
        choice = str(TOY_BASE) if (TOY_BASE / "model_index.json").is_file() else "tiny"
    if choice == "tiny":
        from moslora_diffusion.tiny import save_tiny_pipeline

        return str(save_tiny_pipeline("sd15", work / "model")), (
            "tiny SD 1.5 from moslora_diffusion.tiny (random weights; 2-block UNet, 2-block VAE)")
    if choice == "full-sd15":
        from moslora_diffusion.full_size import build_random_pipeline

        # build_components("sd1") + materialize_random: the SD 1.5 architecture with random weights, saved as
        # a diffusers folder (fp32) so both trainers load it from disk as they would a downloaded model.
        build_random_pipeline("sd1", torch.float32).save_pretrained(work / "model", safe_serialization=True)
        return str(work / "model"), "full-size SD 1.5 architecture (random weights, fp32 on disk)"
    path = Path(choice).expanduser().resolve()
    if not (path / "model_index.json").is_file():
        raise SystemExit(f"--model {choice}: not a diffusers folder (no model_index.json), nor tiny / full-sd15")
    name = "toy base (assets/toy-base)" if path == TOY_BASE.resolve() else str(path)
    return str(path), name


def native_resolution(model: str) -> int:
    """The UNet's sample size times the VAE's downsampling: 512 for SD 1.5, 32 for the tiny model."""
    import json

    unet = json.loads((Path(model) / "unet" / "config.json").read_text())
    vae = json.loads((Path(model) / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def _fit(image, size: int):
    from PIL import Image

    if image.size == (size, size):
        return image
    return image.resize((size, size), Image.Resampling.LANCZOS if image.width > size else Image.Resampling.BICUBIC)


def prepare_images(instance_source: Path, work: Path, resolution: int, num_class_images: int) -> tuple[Path, Path]:
    """Instance photos (square, at the training resolution) and the class images, both already on disk."""
    import numpy as np
    from PIL import Image

    from moslora_diffusion.data import list_image_files
    from moslora_diffusion.toy.world import render, sample_scene

    instance_dir, class_dir = work / "instance", work / "class"
    instance_dir.mkdir(parents=True)
    class_dir.mkdir(parents=True)
    sources = list_image_files(instance_source)
    if not sources:
        raise SystemExit(f"--instance-dir {instance_source}: no images")
    for i, path in enumerate(sources):
        with Image.open(path) as image:
            image = image.convert("RGB")
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            _fit(image.crop((left, top, left + side, top + side)), resolution).save(instance_dir / f"{i:03d}.png")
    # Class images: stars of the toy world (any colour, position, background), as a base model would draw
    # "a photo of a star"; rendered at 64 px and resized to the training resolution.
    rng = np.random.default_rng(0)
    for i in range(num_class_images):
        scene = replace(sample_scene(rng), cls="star")
        _fit(render(scene), resolution).save(class_dir / f"class_{i:05d}.png")
    return instance_dir, class_dir


def _import_everything() -> None:
    """Library imports both sides use, done before any clock starts."""
    import accelerate  # noqa: F401
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
    from diffusers.loaders import StableDiffusionLoraLoaderMixin  # noqa: F401
    from torch.utils import tensorboard  # noqa: F401
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer  # noqa: F401

    import moslora_diffusion.training  # noqa: F401


# --- the benchmark ---------------------------------------------------------------------------------------------


def time_runs(spec: RunSpec, work: Path, repeats: int, warmup_steps: int) -> dict[str, dict]:
    """The earlier run behind ours_rerun and untimed warm-up runs, then `repeats` rounds of every variant
    (order rotated each round)."""
    rerun_cache = work / "latent-cache-of-an-earlier-run"

    def one(variant: str, run_spec: RunSpec, tag: str) -> dict:
        out = work / "runs" / f"{variant}-{tag}"
        result = run_variant(variant, run_spec, out, rerun_cache)
        shutil.rmtree(out, ignore_errors=True)
        gc.collect()
        return result

    earlier = work / "runs" / "earlier"  # the same run as ours, leaving its posteriors in the rerun cache
    ours_train(spec, earlier, cache_latents=False, latent_cache_dir=rerun_cache)
    shutil.rmtree(earlier, ignore_errors=True)
    if warmup_steps:
        for variant in VARIANTS:
            one(variant, replace(spec, steps=warmup_steps), "warmup")
    samples = {v: [] for v in VARIANTS}
    for round_index in range(repeats):
        shift = round_index % len(VARIANTS)
        for variant in VARIANTS[shift:] + VARIANTS[:shift]:
            samples[variant].append(one(variant, spec, str(round_index)))
    return samples


def _paired(samples: dict, name: str, base: str, key: str = "wall_s") -> float:
    return statistics.median(a[key] / b[key] for a, b in zip(samples[name], samples[base], strict=True))


def build_rows(samples: dict, spec: RunSpec, model_name: str, device: str) -> list[dict]:
    rows = []
    for variant in VARIANTS:
        walls = [s["wall_s"] for s in samples[variant]]
        loops = [s["loop_s"] for s in samples[variant]]
        row = {"variant": variant, "what": DESCRIPTIONS[variant], "model": model_name, "device": device,
               "resolution": spec.resolution, "steps": spec.steps, "rank": spec.rank,
               "num_class_images": spec.num_class_images, "mixed_precision": spec.mixed_precision,
               "wall_s": round(statistics.median(walls), 3), "wall_min_s": round(min(walls), 3),
               "wall_max_s": round(max(walls), 3), "loop_s": round(statistics.median(loops), 3),
               "outside_loop_s": round(statistics.median(w - lp for w, lp in zip(walls, loops, strict=True)), 3),
               "cpu_s": round(statistics.median(s["cpu_s"] for s in samples[variant]), 3),
               "samples_s": [round(w, 3) for w in walls]}
        if variant != "peer":
            row["ratio_vs_peer"] = round(_paired(samples, variant, "peer"), 3)
            row["cpu_ratio_vs_peer"] = round(_paired(samples, variant, "peer", "cpu_s"), 3)
        if variant in ("ours_cached", "ours_rerun"):
            row["ratio_vs_ours_default"] = round(_paired(samples, variant, "ours"), 3)
            row["cpu_ratio_vs_ours_default"] = round(_paired(samples, variant, "ours", "cpu_s"), 3)
        if variant != "peer":
            row["vae_rows_encoded"] = statistics.median(s["vae_encoded"] for s in samples[variant])
        rows.append(row)
    return rows


def _table(rows: list[dict]) -> str:
    lines = ["| variant | wall s (median) | min-max s | steps loop s | outside loop s | wall / peer | CPU s "
             "| CPU / peer | what |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ratio = f"{r['ratio_vs_peer']:.3f}" if "ratio_vs_peer" in r else "1"
        cpu_ratio = f"{r['cpu_ratio_vs_peer']:.3f}" if "cpu_ratio_vs_peer" in r else "1"
        lines.append(f"| {r['variant']} | {r['wall_s']:.2f} | {r['wall_min_s']:.2f}-{r['wall_max_s']:.2f} "
                     f"| {r['loop_s']:.2f} | {r['outside_loop_s']:.2f} | {ratio} | {r['cpu_s']:.2f} | {cpu_ratio} "
                     f"| {r['what']} |")
    return "\n".join(lines)


def _notes(args, spec: RunSpec, model_name: str, rows: list[dict]) -> str:
    by = {r["variant"]: r for r in rows}
    cached, rerun = by["ours_cached"], by["ours_rerun"]
    one_epoch = max(spec.num_class_images, spec.num_instance_images)
    return "\n".join([
        f"Whole DreamBooth run with prior preservation, {spec.steps} steps, batch {spec.train_batch_size} "
        f"(+ {spec.train_batch_size} class row), {spec.resolution} px, rank {spec.rank} = alpha, targets {TARGETS}, "
        f"lr {spec.learning_rate}, AdamW, max grad norm {spec.max_grad_norm}, seed {spec.seed}, "
        f"mixed precision {spec.mixed_precision}, report_to {spec.report_to} (both scripts' default), "
        f"{args.device}, torch threads {torch.get_num_threads()}.",
        "",
        f"- Model: {model_name}.",
        f"- Data: {spec.num_instance_images} instance images ({args.instance_dir}, "
        f"resized to {spec.resolution} px), {spec.num_class_images} class images already in the class folder "
        "(toy-world stars, rendered before timing): neither trainer generates any.",
        "- Wall time: from the call that starts a run to its adapter written (model loading from disk, data, "
        "VAE and text-encoder work, the steps, logging, saving). Library imports and one untimed warm-up run "
        f"of {args.warmup_steps} steps per variant come first, for all variants alike. "
        f"{args.repeats} interleaved rounds (order rotated each round); ratios are medians of per-round ratios. "
        "CPU s: the process's CPU time over the same span (less sensitive than wall time to other load on a "
        "shared machine; on a GPU it misses the device's work).",
        "- Not timed for the peer: the script's \"final inference\" after saving (it reloads the pipeline and "
        "loads the LoRA back). Timed for ours: everything `train()` does after the adapter is written too (the "
        "folded diffusers LoRA, the kohya LoRA, the model card, the config).",
        "- `ours` (default flags) encodes each distinct prompt once (frozen text encoder) and VAE-encodes each "
        "distinct image (after crop and flip) once, when first drawn; `ours_cached` adds `--cache_latents` "
        "(every dataset item encoded before the steps, freezing the first crop and flip). Both start from an "
        "empty on-disk latent cache and write this run's posteriors to it: first-run figures. `ours_rerun` is "
        "ours' default flags again after one earlier, untimed run of the same settings on the same photos and "
        "class folder, whose posteriors are in the cache (training once more with another learning rate, rank "
        "or step count reads them just the same).",
        f"- A dataset item is one instance + one class image; there are {one_epoch} items, so {spec.steps} steps "
        f"of batch {spec.train_batch_size} are {spec.steps * spec.train_batch_size / one_epoch:.2f} epoch(s). "
        f"With {spec.num_instance_images} distinct instance photos the peer VAE-encodes "
        f"{2 * spec.steps * spec.train_batch_size} rows, ours at most "
        f"{min(spec.num_instance_images, spec.steps * spec.train_batch_size)} instance + "
        f"{min(spec.num_class_images, spec.steps * spec.train_batch_size)} class rows (measured: "
        f"{by['ours']['vae_rows_encoded']:g}), a rerun {rerun['vae_rows_encoded']:g}.",
        "",
        f"Result: ours / peer = {by['ours']['ratio_vs_peer']:.3f} (first run, default flags), "
        f"{cached['ratio_vs_peer']:.3f} (first run, --cache_latents), {rerun['ratio_vs_peer']:.3f} (rerun, "
        f"default flags); target <= 0.8. Against ours' first run: --cache_latents "
        f"{cached['ratio_vs_ours_default']:.3f}x, the rerun {rerun['ratio_vs_ours_default']:.3f}x. CPU time: "
        f"ours / peer = {by['ours']['cpu_ratio_vs_peer']:.3f}, {cached['cpu_ratio_vs_peer']:.3f} and "
        f"{rerun['cpu_ratio_vs_peer']:.3f}.",
    ])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--model", default=None,
                        help="a diffusers SD 1.x folder, 'tiny' (moslora_diffusion.tiny SD 1.5), or 'full-sd15' "
                             "(full-size SD 1.5 architecture, random weights; for a GPU). Default: assets/toy-base "
                             "when it exists, else tiny")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--resolution", type=int, default=None,
                        help="default: the model's own (UNet sample size x VAE factor: 512 for SD 1.5, 32 for tiny)")
    parser.add_argument("--rank", type=int, default=4, help="rank = alpha on both sides (both scripts default 4)")
    parser.add_argument("--num-class-images", type=int, default=100, help="both scripts' default: 100")
    parser.add_argument("--instance-dir", type=Path, default=TOY_SUBJECT,
                        help="instance photos (center-cropped square and resized to --resolution before timing)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--mixed-precision", default=None, choices=["no", "fp16", "bf16"],
                        help="default: fp16 on cuda, no on cpu")
    parser.add_argument("--report-to", default="tensorboard", choices=["tensorboard", "none"],
                        help="both scripts' default: tensorboard")
    parser.add_argument("--name", default=None,
                        help="results file name (default: whole_run on cpu, whole_run_gpu on cuda)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (interleaved rounds)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="steps of the untimed warm-up run (0: none)")
    parser.add_argument("--work-dir", type=Path, default=None, help="for the model, images and runs (default: a "
                        "temporary folder, removed afterwards)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.mixed_precision is None:
        args.mixed_precision = "fp16" if args.device == "cuda" else "no"
    if args.steps < 1 or args.repeats < 1 or (args.resolution or 8) % 8:
        parser.error("--steps and --repeats must be >= 1, --resolution a multiple of 8")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but no GPU is visible")
    # Both trainers take their device from accelerate; the setting is put back afterwards (tests share a process).
    previous = os.environ.get("ACCELERATE_USE_CPU")
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    try:
        return _main(args)
    finally:
        if previous is None:
            os.environ.pop("ACCELERATE_USE_CPU", None)
        else:
            os.environ["ACCELERATE_USE_CPU"] = previous


def _main(args) -> list[dict]:
    _import_everything()
    with tempfile.TemporaryDirectory(prefix="whole-run-", dir=args.work_dir) as tmp:
        work = Path(tmp)
        model, model_name = prepare_model(args.model, work)
        args.resolution = args.resolution or native_resolution(model)
        instance_dir, class_dir = prepare_images(args.instance_dir, work, args.resolution, args.num_class_images)
        spec = RunSpec(model=model, instance_dir=str(instance_dir), class_dir=str(class_dir),
                       num_class_images=args.num_class_images,
                       num_instance_images=len(list(instance_dir.iterdir())), resolution=args.resolution,
                       rank=args.rank, steps=args.steps, mixed_precision=args.mixed_precision, report_to=args.report_to)
        samples = time_runs(spec, work, args.repeats, args.warmup_steps)
    rows = build_rows(samples, spec, model_name, args.device)
    name = args.name or ("whole_run" if args.device == "cpu" else "whole_run_gpu")
    write_results(name, rows, _table(rows), _notes(args, spec, model_name, rows), args.out_dir)
    return rows


if __name__ == "__main__":
    main()
