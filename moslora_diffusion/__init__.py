"""moslora-diffusion: DreamBooth with MoSLoRA adapters for SD 1.x, SD 2.x and SDXL."""

from .adapter_io import AdapterFile, load_adapter, read_adapter, save_adapter
from .families import SD1, SD2, SDXL, Family, ModelInfo, UnsupportedModelError, detect_family, detect_model
from .inject import AdapterConfig, AdapterError, adapters, attach, bake, detach
from .layer import MoSLoRALinear
from .lora_formats import export_pipeline_loras, fold_pipeline
from .pipeline_adapters import (
                                attach_to_pipeline,
                                detach_from_pipeline,
                                merge_pipeline,
                                pipeline_adapters,
                                set_pipeline_scale,
                                unmerge_pipeline,
)

__version__ = "0.1.0"
__all__ = [
    "AdapterConfig", "AdapterError", "AdapterFile", "Family", "ModelInfo", "MoSLoRALinear", "SD1", "SD2", "SDXL",
    "UnsupportedModelError", "adapters", "attach", "attach_to_pipeline", "bake", "detach", "detach_from_pipeline",
    "detect_family", "detect_model", "export_pipeline_loras", "fold_pipeline", "load_adapter", "merge_pipeline",
    "pipeline_adapters", "read_adapter", "save_adapter", "set_pipeline_scale", "unmerge_pipeline",
]
