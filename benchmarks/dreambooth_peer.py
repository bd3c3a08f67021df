"""The peer of the whole-run benchmark: diffusers' train_dreambooth_lora.py, re-written compactly with the same
per-step work, and RunSpec, the settings both trainers are given alike."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from benchmarks.common import synchronize

INSTANCE_PROMPT, CLASS_PROMPT = "a photo of sks star", "a photo of a star"  # the toy subject's prompts
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


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


# --- the peer as its own process (benchmarks/fresh_process.py), with the diffusers script's flag names -------


def main(argv=None) -> None:
    """`python -m benchmarks.dreambooth_peer --pretrained_model_name_or_path ... --output_dir ...`: one run, as
    the diffusers script is started (the flags the fresh-process benchmark passes to either)."""
    import argparse

    parser = argparse.ArgumentParser(description="benchmark peer: diffusers' train_dreambooth_lora.py, compactly")
    for flag in ("pretrained_model_name_or_path", "instance_data_dir", "class_data_dir", "output_dir"):
        parser.add_argument(f"--{flag}", required=True)
    parser.add_argument("--instance_prompt", default=INSTANCE_PROMPT)
    parser.add_argument("--class_prompt", default=CLASS_PROMPT)
    parser.add_argument("--with_prior_preservation", action="store_true", required=True)
    for flag, kind, default in (("num_class_images", int, 100), ("resolution", int, 512), ("rank", int, 4),
                                ("max_train_steps", int, None), ("train_batch_size", int, 4), ("seed", int, 0),
                                ("learning_rate", float, 5e-4), ("mixed_precision", str, "no"),
                                ("report_to", str, "tensorboard")):
        parser.add_argument(f"--{flag}", type=kind, default=default)
    args = parser.parse_args(argv)
    if (args.instance_prompt, args.class_prompt) != (INSTANCE_PROMPT, CLASS_PROMPT):
        parser.error(f"this peer trains the toy subject's prompts only: {INSTANCE_PROMPT!r}, {CLASS_PROMPT!r}")
    spec = RunSpec(model=args.pretrained_model_name_or_path, instance_dir=args.instance_data_dir,
                   class_dir=args.class_data_dir, num_class_images=args.num_class_images,
                   resolution=args.resolution, rank=args.rank,
                   num_instance_images=len(list(Path(args.instance_data_dir).iterdir())), steps=args.max_train_steps,
                   mixed_precision=args.mixed_precision, report_to=args.report_to, learning_rate=args.learning_rate,
                   train_batch_size=args.train_batch_size, seed=args.seed)
    peer_train(spec, Path(args.output_dir))


if __name__ == "__main__":
    main()
