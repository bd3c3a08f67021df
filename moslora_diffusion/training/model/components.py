"""The base model for training: loaded once, frozen in the weight dtype, adapters attached in fp32."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import set_seed

from ...models.families import Family, ModelInfo, detect_model
from ...models.loading import check_pipeline_folder, empty_components, family_of_single_file, load_pipeline
from ...moslora import step_weights
from ...moslora.inject import adapter_parameters, narrowest_layer
from ...moslora.pipeline import attach_to_pipeline, model_components, pipeline_adapters, targets_by_component
from ..settings.config import ConfigError, TrainConfig
from .conditioning import tokenizer_names, vae_dtype
from .pivotal import attach_trigger_vectors

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FP8_STORAGE = torch.float8_e4m3fn


@dataclass
class BaseModel:
    pipe: object  # the diffusers pipeline; its modules are the ones trained (adapters attached in place)
    info: ModelInfo
    weight_dtype: torch.dtype

    @property
    def family(self) -> Family:
        return self.info.family

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def text_encoders(self) -> list:
        return [getattr(self.pipe, name) for name in self.family.text_encoders]

    @property
    def tokenizers(self) -> list:
        return [getattr(self.pipe, name) for name in tokenizer_names(self.family)]


def check_rank_fits(components: dict[str, torch.nn.Module], config: TrainConfig) -> None:
    """ConfigError when --rank is larger than the narrowest layer the adapters would wrap (its min(in, out)):
    one line naming that layer, its width and the largest --rank allowed."""
    text_targets = "attn" if config.train_text_encoder else None
    wanted = targets_by_component(components, config.unet_targets, text_targets)
    narrowest = []
    for name, targets in wanted.items():
        layer, width = narrowest_layer(components[name], targets)
        narrowest.append((width, f"{name}.{layer}"))
    width, layer = min(narrowest)
    if config.rank > width:
        raise ConfigError(f"--rank {config.rank} is larger than the width of {layer} ({width} features); the "
                          f"largest --rank these targets allow on this model is {width}")


def check_base_before_loading(config: TrainConfig) -> None:
    """For a local diffusers folder, what its small files tell before any weight is read: every component is
    there with .safetensors weights (models/loading.py), and --rank fits the layers (built on the meta device).
    A single file: that it is an SD checkpoint (not an adapter), from its tensor names. A hub id or single file
    is checked for the rank once loaded (attach_adapters)."""
    folder = Path(config.pretrained_model_name_or_path).expanduser()
    if folder.is_file():  # a single file: its tensor names say whether it is a base model at all
        family_of_single_file(folder)
        return
    if not folder.is_dir():
        return
    family = check_pipeline_folder(folder).family
    names = ("unet",) + (family.text_encoders if config.train_text_encoder else ())
    check_rank_fits(empty_components(folder, names), config)


def load_base(config: TrainConfig, device: torch.device) -> BaseModel:
    """The pipeline on `device`, every base weight frozen, in the dtype of --mixed_precision."""
    check_base_before_loading(config)
    weight_dtype = WEIGHT_DTYPES[config.mixed_precision]
    pipe = load_pipeline(config.pretrained_model_name_or_path, revision=config.revision, variant=config.variant,
                         vae=config.pretrained_vae_model_name_or_path, torch_dtype=weight_dtype,
                         config=config.single_file_config)
    info = detect_model(pipe)
    wanted_vae_dtype = vae_dtype(info.family, weight_dtype, config.pretrained_vae_model_name_or_path is not None)
    if pipe.vae.dtype != wanted_vae_dtype:
        pipe.vae.to(dtype=wanted_vae_dtype)
    for name in info.family.components + ("vae",):
        getattr(pipe, name).requires_grad_(False)
    if device.type == "cpu" and weight_dtype == torch.float16:
        # diffusers says this once per module, in a paragraph; the run works, so one line of ours instead
        warnings.warn("--mixed_precision fp16 on a CPU: half precision is meant for a GPU (few CPU kernels); on a "
                      "CPU use --mixed_precision no (fp32) or bf16", stacklevel=2)
    pipe.to(device, silence_dtype_warnings=True)  # device only: a dtype would also cast adapters attached later
    if use_channels_last(config, device):
        pipe.unet.to(memory_format=torch.channels_last)
    pipe.set_progress_bar_config(disable=True)
    return BaseModel(pipe, info, weight_dtype)


def use_channels_last(config: TrainConfig, device: torch.device) -> bool:
    """--channels_last, by default on CUDA only: NHWC convolutions made H100 steps 5-30% faster (README,
    "Training speed on a GPU"), while on CPU they measured slower (1.09x a contiguous step, SD 1.5 128 px)."""
    return config.channels_last if config.channels_last is not None else torch.device(device).type == "cuda"


def attach_adapters(base: BaseModel, config: TrainConfig) -> dict[str, list[torch.nn.Parameter]]:
    """Adapters on the UNet (and the text encoders with --train_text_encoder); their parameters per component.

    Seeded right before, so every process (and every run with this seed) starts from the same A and M.
    """
    check_rank_fits(model_components(base.pipe, base.family), config)
    set_seed(config.seed)
    attach_to_pipeline(base.pipe, config.adapter_config, config.unet_targets,
                       "attn" if config.train_text_encoder else None)
    trained = [base.unet] + (base.text_encoders if config.train_text_encoder else [])
    for module in trained:
        module.train()  # from_pretrained returns eval mode; checkpointing and dropout look at the mode
        if config.gradient_checkpointing:
            if module is base.unet:
                module.enable_gradient_checkpointing()
            else:
                # Non-reentrant, as diffusers' UNet: required by the per-forward adapter weights (step_weights.py).
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    found = {name: adapter_parameters(getattr(base.pipe, name)) for name in pipeline_adapters(base.pipe)}
    if config.train_text_encoder_ti:  # pivotal tuning: the trigger word's vectors, under "embeddings"
        found["embeddings"] = attach_trigger_vectors(base.pipe, config)
    return found


def store_in_fp8(model: torch.nn.Module) -> int:
    """--fp8_base: every frozen nn.Linear / nn.Conv2d of `model` (the adapted layers' bases included) to float8
    e4m3; returns how many. Adapters, norms and embeddings keep their dtype. Autocast casts each weight to the
    compute dtype for its own operation, so compute stays bf16/fp16; with gradient checkpointing those copies
    are dropped after each block instead of being kept for the backward pass."""
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    for layer in layers:
        if any(p.requires_grad for p in layer.parameters()):
            raise ValueError("--fp8_base stores frozen weights only; a trainable layer would lose its precision")
        layer.to(FP8_STORAGE)
    return len(layers)


def check_compile_toolchain(config: TrainConfig, device: torch.device) -> None:
    """--torch_compile with inductor builds kernels with Triton (GPU) or a C++ compiler (CPU). Without one the run
    would fail at its first step, after the model load and the class images: fail here instead, before both."""
    if not config.torch_compile or config.dynamo_backend != "inductor":
        return
    missing = None
    try:
        if torch.device(device).type == "cuda":
            from torch.utils._triton import has_triton

            missing = None if has_triton() else "the triton package (pip install triton)"
        else:
            from torch._inductor.cpp_builder import get_cpp_compiler

            try:
                get_cpp_compiler()
            except Exception as err:  # torch raises its own error types when no compiler is found
                missing = f"a C++ compiler ({err})"
    except ImportError:  # torch moved its helpers: let torch.compile report for itself
        return
    if missing:
        raise ConfigError(f"--torch_compile with --dynamo_backend inductor needs {missing}; install it, or leave "
                          "out --torch_compile (or pass --dynamo_backend aot_eager, which compiles nothing)")


def compile_unet(unet: torch.nn.Module, backend: str) -> None:
    """--torch_compile: the UNet compiled in place (`Module.compile`: the same module object, its parameters
    and state-dict keys unchanged, so checkpoints, EMA and exports see no difference). Inside one compiled
    graph the per-layer casts and M A products are fused anyway, so the per-forward adapter weights
    (step_weights.py) are switched off: their version bookkeeping splits dynamo's graph into pieces."""
    step_weights.uninstall(unet)
    unet.compile(backend=backend)


def adapter_targets(base: BaseModel) -> dict[str, list[str]]:
    """Adapted module paths per component (stored in checkpoints to refuse a mismatched resume)."""
    return {component: sorted(layers) for component, layers in pipeline_adapters(base.pipe).items()}
