"""Pretrains the toy base model on the toy world: a small SD 1.x-shaped pipeline that draws captioned scenes.

    python -m moslora_diffusion.toy.pretrain --out assets/toy-base --seed 0 --threads 2

1. VAE: reconstruction (L1 + MSE), a small KL and a colour prior on the latents, on object-centred crops of
   freshly rendered scenes; a third get striped / dotted object fills, so the VAE can reproduce patterns
   the UNet never learns to draw (the DreamBooth subject's stripes).
2. Latents of a fixed set of training scenes are encoded once (posterior mean and std).
3. UNet and text encoder jointly: epsilon prediction, multi-resolution noise and loss weights that make the
   caption decide the background and layout (see objective.py), captions with random attribute omission
   and 10% empty captions (for classifier-free guidance); the EMA weights are saved.
Held-out (class, colour, background) combinations never appear in step 2 (see world.is_held_out).

`--init FOLDER` continues from a saved toy model instead (its VAE kept, step 1 skipped): the `rare-words`
preset is that continuation with rare tokens in captions (rare_words.py), applied to the shipped model:

    python -m moslora_diffusion.toy.pretrain --init assets/toy-base --preset rare-words --out toy-base-rare
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..files.atomic import write_folder_atomically
from . import models
from .objective import EMA, diffusion_loss, lr_lambda
from .pairs import PAIR_WORDS, caption_any, render_any, sample_pair
from .rare_words import article_ids, joiner_ids, rare_token_ids, with_rare_words
from .world import Fill, render, sample_scene, vocabulary, with_fill


@dataclass(frozen=True)
class PretrainConfig:
    arch: models.Architecture = field(default_factory=models.Architecture)
    vae_steps: int = 4000
    vae_batch: int = 16
    vae_crop: int | None = 32
    vae_lr: float = 3e-3
    kl_weight: float = 1e-5  # per latent element, relative to the per-pixel reconstruction loss
    align_weight: float = 0.1
    pattern_fraction: float = 0.35  # VAE batches: share of objects with a patterned fill
    dataset_size: int = 24000  # training scenes encoded once for the UNet stage
    unet_steps: int = 6000
    unet_batch: int = 32
    unet_lr: float = 1.5e-3
    warmup_steps: int = 100
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    high_noise_floor: float = 0.1  # see loss_weights
    max_loss_weight: float = 5.0
    multires_levels: int = 4  # see multires_noise; 0: plain Gaussian noise
    multires_discount: float = 0.6
    ema_decay: float = 0.999
    # End the UNet stage after this step while the learning-rate schedule still spans unet_steps (None: run
    # them all). The shipped model is such a stop: its GPU lease ended at step 3000 of 12000.
    unet_stop_step: int | None = None
    rare_word_rate: float = 0.0  # share of captions whose article becomes a rare token (rare_words.py)
    two_object_rate: float = 0.0  # share of the encoded training scenes that are two-object scenes (pairs.py)


PRESETS = {
    # CPU-sized: about 45 minutes on 2 idle cores (VAE 0.1 s/step, UNet 0.38 s/step at batch 32).
    "default": PretrainConfig(vae_steps=3000, unet_steps=5000),
    # Stage 1 of the shipped assets/toy-base (stage 2: rare-words): batch 128, the EMA weights at step 3000 of a
    # 12000-step schedule. 7 minutes on an H100 (shared by three runs); hours on a CPU.
    "gpu": PretrainConfig(unet_batch=128, unet_steps=12000, unet_stop_step=3000, dataset_size=60000),
    # Continues a trained model (--init): rare tokens in 30% of captions, a short low-lr schedule, fewer
    # encoded scenes. Applied to the gpu preset's model, it gives the shipped assets/toy-base (CPU, 2 threads).
    "rare-words": PretrainConfig(unet_steps=1500, unet_lr=3e-4, warmup_steps=50, dataset_size=8000,
                                 rare_word_rate=0.3),
    # Continues the shipped model (--init assets/toy-base): half the scenes two-object ones (pairs.py), rare
    # tokens kept (in both noun phrases of a pair), so it draws "a red star on the left and a blue circle on
    # the right" while one-object captions keep their images. Gives assets/toy-base-2obj (CPU, 1 thread).
    "two-objects": PretrainConfig(unet_steps=1000, unet_lr=8e-4, warmup_steps=50, dataset_size=6000,
                                  rare_word_rate=0.3, two_object_rate=0.5),
    # Only for tests: exercises every code path in seconds, learns nothing.
    "micro": PretrainConfig(
        arch=models.Architecture(vae_channels=(8, 8, 8), unet_channels=(8, 16, 16), unet_attention=(False, True, True),
                                 norm_groups=4, text_hidden=16, text_intermediate=32, unet_heads=1, text_heads=1),
        vae_steps=3, vae_batch=2, dataset_size=4, unet_steps=3, unet_batch=2, warmup_steps=1),
}


def images_to_tensor(images) -> torch.Tensor:
    """PIL images -> N x 3 x H x W in [-1, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def random_fill(rng: np.random.Generator) -> Fill:
    """A random two-colour striped (sometimes dotted) fill, for the VAE's pattern vocabulary."""
    rgb = [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(3)]
    return Fill(stripes=(rgb[0], rgb[1]), dot=rgb[2] if rng.random() < 0.5 else None,
                period=float(rng.uniform(0.3, 0.6)))


def vae_batch(rng: np.random.Generator, n: int, pattern_fraction: float, crop: int | None = None) -> torch.Tensor:
    """Freshly rendered scenes; with `crop`, a random crop x crop window of each (convolutions do not need the
    whole image, and a 32 px crop costs a quarter of the compute)."""
    scenes = [sample_scene(rng) for _ in range(n)]
    scenes = [with_fill(s, random_fill(rng)) if rng.random() < pattern_fraction else s for s in scenes]
    images = [render(s) for s in scenes]
    if crop:  # windows around the object: its edges and fill are the hard part, plain background is easy
        centres = np.array([[(s.box[0] + s.box[2]) / 2, (s.box[1] + s.box[3]) / 2] for s in scenes])
        offsets = centres - crop / 2 + rng.uniform(-crop / 3, crop / 3, (n, 2))
        offsets = (np.clip(offsets, 0, images[0].width - crop) // 4 * 4).astype(int)  # on the 4 px latent grid
        images = [im.crop((x, y, x + crop, y + crop)) for im, (x, y) in zip(images, offsets, strict=True)]
    return images_to_tensor(images)


def train_vae(vae, cfg: PretrainConfig, rng: np.random.Generator, device, log) -> None:
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(min(cfg.warmup_steps, cfg.vae_steps), cfg.vae_steps))
    for step in range(cfg.vae_steps):
        x = vae_batch(rng, cfg.vae_batch, cfg.pattern_fraction, cfg.vae_crop).to(device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
        # Soft prior: latent channels 0-2 ~ the 4x4-average colour, so latents are smooth and colour-like,
        # which the UNet learns far faster than arbitrary codes; channel 3 and small deviations carry detail.
        align = F.mse_loss(posterior.mean[:, :3], F.avg_pool2d(x, 4))
        loss = rec + cfg.kl_weight * kl + cfg.align_weight * align
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == cfg.vae_steps - 1:
            log(f"vae step {step:5d}  rec {rec.item():.4f}  kl {kl.item():.2f}")
    vae.eval()


@torch.no_grad()
def encode_scenes(vae, scenes, device, batch: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every scene (unscaled), kept on the CPU."""
    means, stds = [], []
    for i in range(0, len(scenes), batch):
        dist = vae.encode(images_to_tensor([render_any(s) for s in scenes[i:i + batch]]).to(device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    return torch.cat(means), torch.cat(stds)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Exactly as StableDiffusionPipeline tokenizes a prompt (padded to model_max_length)."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


class CaptionIds:
    """`tokenize` with a cache: the slow tokenizer costs more than a GPU step, and captions repeat."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(c for c in captions if c not in self.cache))
        if missing:
            self.cache.update(zip(missing, tokenize(self.tokenizer, missing), strict=True))
        return torch.stack([self.cache[c] for c in captions])


def training_scenes(cfg: PretrainConfig, rng: np.random.Generator) -> list:
    """The UNet stage's scenes (train split): one-object Scenes, and with `two_object_rate` that share of Pairs
    (one-object only: exactly the scenes earlier stages drew for a seed)."""
    if not cfg.two_object_rate:
        return [sample_scene(rng, split="train") for _ in range(cfg.dataset_size)]
    pairs = rng.random(cfg.dataset_size) < cfg.two_object_rate
    return [sample_pair(rng, split="train") if two else sample_scene(rng, split="train") for two in pairs]


def train_unet(unet, text_encoder, tokenizer, vae, cfg: PretrainConfig, rng, device, log, callback=None,
               callback_every: int = 1000) -> None:
    """`callback(step, ema)`, if given, runs every `callback_every` steps (progress checks)."""
    scenes = training_scenes(cfg, rng)
    t0 = time.time()
    means, stds = encode_scenes(vae, scenes, device)
    scaling = vae.config.scaling_factor
    log(f"encoded {len(scenes)} scenes in {time.time() - t0:.0f}s")
    scheduler = models.training_scheduler()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, cfg.unet_steps))
    ema = EMA(params, cfg.ema_decay)
    caption_ids = CaptionIds(tokenizer)
    if cfg.rare_word_rate:  # a pair's "and" tokens are world words once pairs are drawn
        words = vocabulary() + (PAIR_WORDS if cfg.two_object_rate else ())
        rare_pool, articles = rare_token_ids(tokenizer, words), article_ids(tokenizer)
        joiner = joiner_ids(tokenizer) if cfg.two_object_rate else None
    unet.train()
    text_encoder.train()
    for step in range(cfg.unet_stop_step or cfg.unet_steps):
        idx = rng.integers(0, len(scenes), cfg.unet_batch)
        index = torch.from_numpy(idx)
        latents = (means[index] + stds[index] * torch.randn_like(stds[index])).to(device) * scaling
        captions = ["" if rng.random() < cfg.caption_dropout else caption_any(scenes[i], rng) for i in idx]
        ids = caption_ids(captions)
        if cfg.rare_word_rate:
            ids = with_rare_words(ids, rare_pool, articles, cfg.rare_word_rate, rng, joiner)
        loss = diffusion_loss(unet, text_encoder, scheduler, latents, ids.to(device), cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.update()
        if step % 100 == 0 or step == (cfg.unet_stop_step or cfg.unet_steps) - 1:
            log(f"unet step {step:5d}  loss {loss.item():.4f}  lr {sched.get_last_lr()[0]:.2e}")
        if callback is not None and (step + 1) % callback_every == 0:
            callback(step + 1, ema)
    ema.copy_to_params()
    unet.eval()
    text_encoder.eval()


@torch.no_grad()
def set_scaling_factor(vae, rng, device, n: int = 256) -> float:
    """SD convention: latents * scaling_factor have unit standard deviation."""
    latents = vae.encode(vae_batch(rng, n, 0.0).to(device)).latent_dist.sample()
    factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=factor)
    return factor


def load_components(folder: Path, device):
    """(tokenizer, vae, unet, text_encoder) of a saved toy model, to continue training it."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    return pipe.tokenizer, pipe.vae.to(device), pipe.unet.to(device), pipe.text_encoder.to(device)


def save_model(pipe, out: Path, record: dict) -> Path:
    """The pipeline and its training record as one diffusers folder, whole or not at all (files/atomic.py). An
    earlier toy model there is replaced; a folder holding anything else is refused (FileExistsError)."""
    def write(folder: Path) -> None:
        pipe.save_pretrained(folder, safe_serialization=True)
        (folder / "toy_pretrain.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    needed = sum(t.numel() * t.element_size() for m in pipe.components.values() if isinstance(m, torch.nn.Module)
                 for t in m.state_dict().values())
    return write_folder_atomically(out, write, needed, overwrite=(out / "model_index.json").is_file())


def pretrain(out: Path, cfg: PretrainConfig, seed: int = 0, device: str | None = None, log=print, callback=None,
             callback_every: int = 1000, init: Path | None = None):
    """Trains the toy base model and saves it as a diffusers folder; returns the pipeline (EMA weights).

    `init`: a saved toy model to continue (its VAE is kept). `callback(step, ema, vae, unet, text_encoder,
    tokenizer)` runs every `callback_every` UNet steps.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    timings = {}
    if init is not None:
        tokenizer, vae, unet, text_encoder = load_components(Path(init), device)
    else:
        with tempfile.TemporaryDirectory(prefix="toy-tok-") as tmp:
            tokenizer = models.build_tokenizer(Path(tmp))
        vae, unet = models.build_vae(cfg.arch).to(device), models.build_unet(cfg.arch).to(device)
        text_encoder = models.build_text_encoder(cfg.arch, tokenizer).to(device)
        t0, c0 = time.time(), time.process_time()
        train_vae(vae, cfg, rng, device, log)
        log(f"vae scaling factor {set_scaling_factor(vae, rng, device):.4f}")
        timings.update(vae_wall_s=time.time() - t0, vae_cpu_s=time.process_time() - c0)
    vae.requires_grad_(False)
    t0, c0 = time.time(), time.process_time()
    progress = None if callback is None else (lambda step, ema: callback(step, ema, vae, unet, text_encoder, tokenizer))
    train_unet(unet, text_encoder, tokenizer, vae, cfg, rng, device, log, progress, callback_every)
    timings.update(unet_wall_s=time.time() - t0, unet_cpu_s=time.process_time() - c0)  # cpu: summed over threads
    pipe = models.assemble_pipeline(vae, unet, text_encoder, tokenizer).to("cpu")
    init_record = Path(init) / "toy_pretrain.json" if init is not None else None
    record = {"seed": seed, "device": str(device), "threads": torch.get_num_threads(), **timings,
              "init": str(init) if init is not None else None,
              "init_record": json.loads(init_record.read_text()) if init_record and init_record.is_file() else None,
              "config": dataclasses.asdict(cfg),
              "parameters": {name: models.count_parameters(m) for name, m in
                             (("vae", vae), ("unet", unet), ("text_encoder", text_encoder))}}
    save_model(pipe, Path(out), record)
    log(f"saved to {out}: {json.dumps({k: round(v) for k, v in timings.items()})}")
    return pipe


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--vae_steps", type=int)
    parser.add_argument("--unet_steps", type=int)
    parser.add_argument("--dataset_size", type=int)
    parser.add_argument("--init", type=Path, help="continue this saved toy model (VAE kept) instead of starting anew")
    parser.add_argument("--device", help="cpu / cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {k: getattr(args, k) for k in ("vae_steps", "unet_steps", "dataset_size") if getattr(args, k)}
    cfg = dataclasses.replace(PRESETS[args.preset], **overrides)
    start = time.time()
    if args.init is not None and not (args.init / "model_index.json").is_file():
        parser.error(f"--init {args.init}: not a saved toy model (no model_index.json)")
    if args.init is not None and args.out.resolve() == args.init.resolve():
        parser.error("--out must differ from --init: the model being continued is read while the new one is written")
    pretrain(args.out, cfg, seed=args.seed, device=args.device,
             log=lambda msg: print(f"[{time.time() - start:7.1f}s] {msg}", flush=True), init=args.init)


if __name__ == "__main__":
    main()
