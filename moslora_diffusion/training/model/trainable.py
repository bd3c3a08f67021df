"""What a run trains, behind one interface, so that one loop (trainer/loop.py), one checkpoint format and one resume
path serve both trainers: DreamBooth's MoSLoRA adapters (AdapterTrainable, here) and MoLE's gates
(mole/gate_training.py: GateTrainable).
"""

from __future__ import annotations

from typing import Protocol

import torch

from ...moslora.pipeline import pipeline_adapters
from ..run_folder.checkpoints import CheckpointInfo, adapter_tensors, check_compatible
from ..settings.config import TrainConfig
from . import pivotal
from .components import BaseModel, adapter_targets
from .optim import param_groups


class Trainable(Protocol):
    params: list[torch.nn.Parameter]  # every trained parameter (fp32)
    prepared_components: list[str]  # pipeline components holding trained weights: DDP-wrapped when distributed
    caches_prompts: bool  # the text encoders' output is constant: prompts are encoded once

    def param_groups(self, config: TrainConfig) -> list[dict]:
        """Optimizer parameter groups with their learning rates."""

    def identity(self) -> dict:
        """JSON-able description of what the trained tensors fit (stored in every checkpoint's state.json)."""

    def check_checkpoint(self, info: CheckpointInfo) -> None:
        """CheckpointError unless the checkpoint's tensors fit this run (another family, shape or expert set)."""

    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """{checkpoint file stem: tensors} of the trained state."""

    def load(self, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        """Copies a checkpoint's tensors (as `tensors()` gave them) into the trained parameters."""

    def extra_loss(self) -> torch.Tensor | None:
        """A term added to every micro-step's loss after its forward (MoLE's gate balance), or None."""

    def before_update(self, accelerator) -> None:
        """Called after the micro-steps' backward passes, before clipping and the optimizer step."""


class AdapterTrainable:
    """DreamBooth: the MoSLoRA adapters on the UNet (and on the text encoders with --train_text_encoder), and the
    trigger word's vectors with --train_text_encoder_ti (training/model/pivotal.py)."""

    def __init__(self, base: BaseModel, config: TrainConfig, trained: dict[str, list[torch.nn.Parameter]]):
        self.base, self.config = base, config
        self.unet_params = trained["unet"]
        self.text_params = [p for name in base.family.text_encoders for p in trained.get(name, [])]
        self.embedding_params = trained.get("embeddings", [])
        self.params = self.unet_params + self.text_params + self.embedding_params
        self.prepared_components = ["unet"] + [n for n in base.family.text_encoders
                                               if n in trained or self.embedding_params]
        self.caches_prompts = not (config.train_text_encoder or self.embedding_params)

    def param_groups(self, config: TrainConfig) -> list[dict]:
        return param_groups(config, self.unet_params, self.text_params) + pivotal.embedding_group(
            config, self.embedding_params)

    def identity(self) -> dict:
        return {"family": self.base.family.name, "adapter": self.config.adapter_config.to_dict(),
                "targets": adapter_targets(self.base), **pivotal.identity(self.config)}

    def check_checkpoint(self, info: CheckpointInfo) -> None:
        check_compatible(info, self.base.family.name, self.config.adapter_config.to_dict(), adapter_targets(self.base))
        pivotal.check_same_word(info, self.config)

    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"adapter": adapter_tensors(pipeline_adapters(self.base.pipe)), **pivotal.tensors(self.base.pipe)}

    def load(self, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        layers = pipeline_adapters(self.base.pipe)
        with torch.no_grad():
            for key, value in tensors["adapter"].items():
                component, rest = key.split(".", 1)
                module, part = rest.rsplit(".", 1)
                getattr(layers[component][module], f"lora_{part}").copy_(value)
        pivotal.load(self.base.pipe, tensors)

    def extra_loss(self) -> None:
        return None

    def before_update(self, accelerator) -> None:
        """DDP already averaged the gradients during the last micro-step's backward."""
