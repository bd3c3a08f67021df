"""Third-party log lines that tell our users nothing, dropped at the logger that emits them and nowhere else.

Each filter matches one message of one library logger; everything else those loggers say still shows.
- transformers 5, when diffusers is imported without torchvision: "`CLIPImageProcessor` requires torchvision
  (not installed); falling back to `CLIPImageProcessorPil` ..." (and the same for SiglipImageProcessor). This
  project never uses an image processor of diffusers' pipelines, and there is no CPU build of torchvision to
  install (the PIL fallback is what it would use anyway).
- diffusers, loading a LoRA that adapts the UNet only: "No LoRA keys associated to CLIPTextModel found with the
  prefix='text_encoder'": a UNet-only LoRA (this project's default, and pivotal tuning's) has none by design.
"""

from __future__ import annotations

import logging

# (logger name, the start of the message it drops)
NOISE = (
    ("transformers.utils.import_utils", "requires torchvision (not installed); falling back to"),
    ("diffusers.loaders.lora_base", "No LoRA keys associated to CLIPTextModel"),
    ("diffusers.loaders.peft", "No LoRA keys associated to CLIPTextModel"),
)


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def install() -> None:
    """Adds the filters (once; the libraries need not be imported yet: their loggers are the same objects)."""
    for name, text in NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.text == text for f in logger.filters):
            logger.addFilter(_DropMessage(text))


install()  # on import (moslora_diffusion/__init__.py imports this first): the import-time noise goes too
