"""moslora-diffusion: DreamBooth with MoSLoRA adapters for SD 1.x, SD 2.x and SDXL."""

from ._version import __version__ as __version__
from .console import quiet  # noqa: F401  (its log filters, installed on import: before diffusers is imported below)
from .formats.lora import export_pipeline_loras, fold_pipeline
from .models.families import SD1, SD2, SDXL, Family, ModelInfo, UnsupportedModelError, detect_family, detect_model
from .moslora.inject import AdapterConfig, AdapterError, adapters, attach, bake, detach
from .moslora.layer import MoSLoRALinear
from .moslora.native_file import AdapterFile, load_adapter, read_adapter, save_adapter
from .moslora.pipeline import (
    attach_to_pipeline,
    detach_from_pipeline,
    merge_pipeline,
    pipeline_adapters,
    set_pipeline_scale,
    unmerge_pipeline,
)

__all__ = [
    "AdapterConfig", "AdapterError", "AdapterFile", "Family", "ModelInfo", "MoSLoRALinear", "SD1", "SD2", "SDXL",
    "UnsupportedModelError", "adapters", "attach", "attach_to_pipeline", "bake", "detach", "detach_from_pipeline",
    "detect_family", "detect_model", "export_pipeline_loras", "fold_pipeline", "load_adapter", "merge_pipeline",
    "pipeline_adapters", "read_adapter", "save_adapter", "set_pipeline_scale", "unmerge_pipeline",
]
