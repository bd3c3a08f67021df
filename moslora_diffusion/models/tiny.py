"""Tiny, randomly initialised SD 1.x / SD 2.x / SDXL pipelines, built and saved without any download.

They have the real component classes and the real block structure (cross-attention and plain blocks,
two layers per block, SDXL's text-time conditioning and two text encoders), only narrow, so tests and
smoke runs exercise exactly the code paths a full-size model takes. The command that writes one is
`python -m moslora_diffusion.tiny` (moslora_diffusion/tiny.py).
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import torch

from ..files.atomic import atomic_write, write_folder_atomically

FAMILY_ALIASES = {"sd15": "sd1", "sd1": "sd1", "sd2": "sd2", "sd21": "sd2", "sdxl": "sdxl"}
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
# SDXL's encoders differ in width (CLIP-L 768, OpenCLIP-G 1280, pooled projection 1280); the tiny ones do
# too (and the projection is not square), because single-file readers tell the encoders apart by width.
SDXL_TEXT_WIDTHS = (32, 48)
SDXL_POOLED_WIDTH = 40


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes that GPT-2/CLIP byte-level BPE uses."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_clip_tokenizer(folder: Path, words: tuple[str, ...] = ()) -> None:
    """Writes a byte-level CLIP tokenizer (vocab.json + merges.txt) that needs no hub.

    Every text tokenizes (bytes are the fallback); each word in `words` gets merges that make it a
    single token, which a small model learns far more easily than letters.
    """
    alphabet = _byte_alphabet()
    vocab_list = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    for word in dict.fromkeys(w.lower() for w in words):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in vocab_list:
                vocab_list.append(pieces[0])
    merges = list(dict.fromkeys(merges))
    vocab = {tok: i for i, tok in enumerate(vocab_list + list(SPECIAL_TOKENS))}
    vocab_text = json.dumps(vocab, ensure_ascii=False)
    merges_text = "#version: 0.2\n" + "\n".join(merges) + "\n"
    atomic_write(folder / "vocab.json", lambda tmp: tmp.write_text(vocab_text, encoding="utf-8"))
    atomic_write(folder / "merges.txt", lambda tmp: tmp.write_text(merges_text, encoding="utf-8"))


def load_clip_tokenizer(folder: Path, max_length: int = 77):
    """A CLIPTokenizer from the files `write_clip_tokenizer` wrote (transformers 4.x and 5.x APIs)."""
    import inspect

    from transformers import CLIPTokenizer

    params = inspect.signature(CLIPTokenizer.__init__).parameters
    if "vocab_file" in params:  # transformers 4.x: paths
        return CLIPTokenizer(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"),
                             model_max_length=max_length)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    merges = [tuple(line.split(" ")) for line in lines if line]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def _text_config(tokenizer, sd2_style: bool, hidden: int = 32, projection: int | None = None):
    from transformers import CLIPTextConfig

    # SD 1.x uses OpenAI CLIP (quick_gelu); SD 2.x and SDXL's second encoder use OpenCLIP (gelu).
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, layer_norm_eps=1e-5,
        hidden_act="gelu" if sd2_style else "quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=projection or 512,
    )


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=32, sample_size=32,
    )


def _unet(family: str):
    from diffusers import UNet2DConditionModel

    common = dict(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        norm_num_groups=32,
    )
    if family == "sdxl":
        return UNet2DConditionModel(
            **common, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2), use_linear_projection=True,
            cross_attention_dim=SDXL_TEXT_WIDTHS[0] + SDXL_TEXT_WIDTHS[1], addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + SDXL_POOLED_WIDTH,
        )
    # SD 1.x pattern: attention in the early blocks, a plain block last; SD 2.x adds linear projections.
    return UNet2DConditionModel(
        **common, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4) if family == "sd2" else 8,
        use_linear_projection=family == "sd2", cross_attention_dim=32,
    )


def build_tiny_pipeline(family: str = "sd15", seed: int = 0, tokenizer_dir: Path | None = None,
                        prediction_type: str = "epsilon"):
    """A tiny pipeline of the given family with deterministic random weights."""
    from diffusers import (
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    family = FAMILY_ALIASES.get(family)
    if family is None:
        raise ValueError(f"unknown tiny family; choose one of {sorted(FAMILY_ALIASES)}")
    torch.manual_seed(seed)
    unet, vae = _unet(family), _vae()
    if tokenizer_dir is None:
        with tempfile.TemporaryDirectory(prefix="moslora-tok-") as tmp:
            write_clip_tokenizer(Path(tmp))
            tokenizer = load_clip_tokenizer(Path(tmp))
    else:
        tokenizer = load_clip_tokenizer(tokenizer_dir)
    sched = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                 prediction_type=prediction_type)
    if family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=vae, unet=unet, scheduler=EulerDiscreteScheduler(**sched),
            text_encoder=CLIPTextModel(_text_config(tokenizer, False, SDXL_TEXT_WIDTHS[0])),
            text_encoder_2=CLIPTextModelWithProjection(
                _text_config(tokenizer, True, SDXL_TEXT_WIDTHS[1], projection=SDXL_POOLED_WIDTH)),
            tokenizer=tokenizer, tokenizer_2=copy.deepcopy(tokenizer),
        )
    return StableDiffusionPipeline(
        vae=vae, unet=unet, scheduler=DDIMScheduler(**sched, clip_sample=False, set_alpha_to_one=False),
        text_encoder=CLIPTextModel(_text_config(tokenizer, family == "sd2")), tokenizer=tokenizer,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_tiny_pipeline(family: str, out: Path, seed: int = 0, prediction_type: str = "epsilon",
                       overwrite: bool = False) -> Path:
    """Builds and saves a tiny pipeline as a diffusers folder, whole or not at all (files/atomic.py).
    FileExistsError when `out` holds files, unless overwrite."""
    out = Path(out)
    pipe = build_tiny_pipeline(family, seed=seed, prediction_type=prediction_type)
    needed = sum(t.numel() * t.element_size() for m in pipe.components.values() if isinstance(m, torch.nn.Module)
                 for t in m.state_dict().values())
    return write_folder_atomically(out, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True), needed,
                                   overwrite)
