"""The MoLE model on a diffusers pipeline: frozen experts, one learned gate per block (arXiv 2404.13628).

For every adapted layer (an nn.Linear or 1x1 nn.Conv2d) in block b:

    y = W x + sum_i g_i(b) * s_i * up_i (down_i x)        g(b): (B, N), per sample

Nothing in the pipeline is replaced: a forward pre-hook on each block computes its gate for the current
forward, a forward hook on each adapted layer adds the experts' path (the experts' ranks concatenated: two
matmuls per layer, computed in the layer's dtype; gates in fp32). So `detach` leaves the pipeline exactly as it
was (its weights are never written), gradient checkpointing is not needed, and everything runs under
torch.no_grad in fp32 / fp16 / bf16. Only the gates are parameters of this module; the experts are frozen
tensors outside any state_dict.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..models.families import detect_family
from ..moslora.pipeline import model_components, model_module_name, pipeline_adapters
from .experts import MIN_EXPERTS, Expert, MoLEError, check_experts, check_scale
from .gates import UNGATED, Block, Gate, find_blocks, text_layer_features, unet_block_features
from .positions import GRANULARITIES, layer_weights, position_features

ATTRIBUTE = "_moslora_mole"  # where the attached MoLE is kept on the pipeline


class LayerExperts:
    """The experts of one layer, ranks concatenated: down (R, in), up (out, R), column -> expert (R,)."""

    def __init__(self, experts: Sequence[Expert], key, block: str, is_conv: bool):
        present = [(i, e.layers[key]) for i, e in enumerate(experts) if key in e.layers]
        self.down = torch.cat([lora.down for _, lora in present])
        self.up = torch.cat([lora.up for _, lora in present], dim=1)
        self.columns = torch.cat([torch.full((lora.rank,), i, dtype=torch.long) for i, lora in present])
        self.block, self.is_conv = block, is_conv
        self._cast: dict = {}

    def _factors(self, dtype: torch.dtype, device: torch.device):
        if (dtype, device) not in self._cast:
            self._cast[(dtype, device)] = (self.down.to(device, dtype), self.up.to(device, dtype),
                                           self.columns.to(device))
        return self._cast[(dtype, device)]

    def delta(self, x: torch.Tensor, dtype: torch.dtype, weights: torch.Tensor) -> torch.Tensor:
        """x (B, ..., in) or (B, in, H, W); weights = g * s, fp32: (B or 1, N) per sample, or per position
        (B, L, N) for x (B, L, in), (B, H, W, N) for a convolution's x (B, in, H, W) -> the experts' output.
        A position whose weights are all 0 gets exactly 0."""
        down, up, columns = self._factors(dtype, x.device)
        column_weights = weights.to(x.device)[..., columns].to(dtype)  # (B, R) or (B, positions..., R)
        x = x.to(dtype)
        if self.is_conv:
            per = column_weights[:, :, None, None] if column_weights.dim() == 2 else column_weights.permute(0, 3, 1, 2)
            return F.conv2d(F.conv2d(x, down[:, :, None, None]) * per, up[:, :, None, None])
        h = F.linear(x, down)
        if column_weights.dim() == 2:
            column_weights = column_weights.view(column_weights.shape[0], *([1] * (h.dim() - 2)), -1)
        return F.linear(h * column_weights, up)


class MoLE(nn.Module):
    """Gates (the only parameters) plus the hooks that apply the experts. Build it with `attach_mole`."""

    def __init__(self, experts: Sequence[Expert], blocks: Sequence[tuple[Block, nn.Module]],
                 layer_blocks: Mapping, components: Mapping[str, nn.Module], family: str, granularity: str = "block"):
        super().__init__()
        self.family = family  # "sd1" / "sd2" / "sdxl"
        self.granularity = granularity  # "block": one gate per UNet block; "position": per position (positions.py)
        self.grids: dict[str, tuple[int, int]] = {}  # (h, w) of each UNet block's latest forward
        self.experts = list(experts)
        self.blocks = [block for block, _ in blocks]
        self.layer_blocks = dict(layer_blocks)
        n = len(self.experts)
        self.gates = nn.ModuleList(Gate(b.features, n).to(next(m.parameters()).device) for b, m in blocks)
        self._index = {block.name: i for i, block in enumerate(self.blocks)}
        self.scales = torch.tensor([e.scale for e in self.experts], dtype=torch.float32)
        self.keep = torch.ones(n, dtype=torch.bool)
        self.fixed: dict[str, torch.Tensor] | None = None  # (1, N) per block when the gates are held constant
        self._fixed_given = None  # as the caller gave them (re-applied when the mask changes)
        self._current: dict[str, torch.Tensor] = {}
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._handles: list = []
        self._layers = {}
        for key, block in self.layer_blocks.items():
            model = components[key[0]]
            module = model.get_submodule(model_module_name(model, key[1]))
            self._layers[key] = (module, LayerExperts(self.experts, key, block, isinstance(module, nn.Conv2d)))
        self._block_modules = {block.name: module for block, module in blocks}

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    @property
    def has_ungated_layers(self) -> bool:
        return UNGATED in self.layer_blocks.values()

    # -- hooks -------------------------------------------------------------------------------------------------
    def install(self) -> None:
        for block in self.blocks:
            hook = self._unet_block_hook if block.kind == "unet" else self._text_layer_hook
            self._handles.append(self._block_modules[block.name].register_forward_pre_hook(
                _bind(hook, block), with_kwargs=True))
        for module, experts in self._layers.values():
            self._handles.append(module.register_forward_hook(_bind(self._layer_hook, experts)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._current.clear()

    def _unet_block_hook(self, block: Block, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if self.fixed is not None:
            self._record(block.name, self.fixed[block.name])
        elif self.granularity == "position":
            self.grids[block.name] = (hidden.shape[-2], hidden.shape[-1]) if hidden.dim() == 4 else (hidden.shape[1], 1)
            self._set_current(block, position_features(hidden, context, block.text_dim))
        else:
            self._set_current(block, unet_block_features(hidden, context, block.text_dim))

    def _text_layer_hook(self, block: Block, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        if self.fixed is None:
            self._set_current(block, text_layer_features(hidden, mask))
        else:
            self._record(block.name, self.fixed[block.name])

    def _set_current(self, block: Block, features: torch.Tensor) -> None:
        gate = self.gates[self._index[block.name]]
        weights = gate(features.to(gate.weight.device), self.keep)
        self._current[block.name] = weights  # (B, N), or (B, L, N) per position
        self._record(block.name, weights.mean(dim=1) if weights.dim() == 3 else weights)

    def _layer_hook(self, experts: LayerExperts, module, args, output):
        x = args[0]
        weights = self.block_weights(experts.block, x.shape[0]).to(x.device)
        if weights.dim() == 3:  # a per-position gate: as this layer's input lays out the block's positions
            weights = layer_weights(weights, self.grids[experts.block], x, experts.is_conv)
        return output + experts.delta(x, output.dtype, weights * self.scales.to(x.device))

    # -- gate weights ------------------------------------------------------------------------------------------
    def _uniform(self) -> torch.Tensor:
        return (self.keep.float() / self.keep.sum()).unsqueeze(0)

    def block_weights(self, block: str, batch: int) -> torch.Tensor:
        """(B or 1, N) fp32 gate weights of `block` for the running forward (before the scales s_i)."""
        if self.fixed is not None:
            return self.fixed[block]
        if block == UNGATED:
            return self._uniform()
        if block not in self._current:
            raise RuntimeError(f"the gate of {block} was not computed: call the whole UNet / text encoder, not a layer")
        weights = self._current[block]
        if weights.shape[0] not in (1, batch):
            raise RuntimeError(f"{block}: gate batch {weights.shape[0]} but layer batch {batch}")
        return weights

    def _record(self, block: str, weights: torch.Tensor) -> None:
        mean = weights.detach().float().mean(dim=0)
        self._sums[block] = self._sums[block] + mean if block in self._sums else mean
        self._counts[block] = self._counts.get(block, 0) + 1

    def current_gates(self) -> dict[str, torch.Tensor]:
        """{block: (B, N)} learned gate weights of each block's latest forward, with gradient (for the losses)."""
        return dict(self._current)

    def clear_gates(self) -> None:
        """Forget the latest forward's gates: call at the start of a training step, before its forwards."""
        self._current.clear()

    def gate_report(self) -> dict[str, list[float]]:
        """{block: [w_1 .. w_N]}: each block's gate weights averaged over batch and every forward since the last
        `reset_report` (e.g. the denoising steps of a generation); `ungated` holds the constant weights."""
        report = {b.name: (self._sums[b.name] / self._counts[b.name]).tolist() for b in self.blocks
                  if b.name in self._sums}
        if self.has_ungated_layers:
            report[UNGATED] = (self.fixed[UNGATED] if self.fixed is not None else self._uniform())[0].tolist()
        return report

    def reset_report(self) -> None:
        self._sums.clear()
        self._counts.clear()

    # -- settings ----------------------------------------------------------------------------------------------
    def _expert_index(self, expert: int | str) -> int:
        if isinstance(expert, int) and 0 <= expert < len(self.experts):
            return expert
        if expert in self.expert_names:
            return self.expert_names.index(expert)
        raise MoLEError(f"no expert {expert!r}; the experts are {', '.join(self.expert_names)}")

    def set_mask(self, masked: Iterable[int | str] | None = None) -> None:
        """Masks experts (by name or index) at inference; the other experts' gates are renormalised (the paper's
        second mode: softmax over the unmasked logits). None or empty: every expert on."""
        keep = torch.ones(len(self.experts), dtype=torch.bool)
        for expert in masked or ():
            keep[self._expert_index(expert)] = False
        if not keep.any():
            raise MoLEError("every expert is masked; keep at least one")
        self.keep = keep
        if self.fixed is not None:
            self.set_fixed_gates(self._fixed_given)

    def set_scales(self, scales: Sequence[float] | Mapping[str, float]) -> None:
        """The per-expert extra scale s_i: a list of N numbers, or {expert name: scale} for some of them."""
        new = self.scales.clone()
        if isinstance(scales, Mapping):
            for name, value in scales.items():
                new[self._expert_index(name)] = check_scale(value, name)
        else:
            if len(scales) != len(self.experts):
                raise MoLEError(f"{len(self.experts)} experts but {len(scales)} scales")
            new = torch.tensor([check_scale(v, n) for v, n in zip(scales, self.expert_names, strict=True)])
        self.scales = new.float()

    def set_fixed_gates(self, weights: Sequence[float] | Mapping[str, Sequence[float]] | None) -> None:
        """Constant gate weights instead of the learned gates: one list of N weights for every block (and the
        ungated layers), or {block name: N weights} covering every block. Each is renormalised over the
        unmasked experts. None: back to the learned gates."""
        self._fixed_given = weights
        if weights is None:
            self.fixed = None
            return
        names = [b.name for b in self.blocks] + ([UNGATED] if self.has_ungated_layers else [])
        if not isinstance(weights, Mapping):
            weights = dict.fromkeys(names, weights)
        missing = [n for n in names if n not in weights and n != UNGATED]
        unknown = sorted(set(weights) - set(names))
        if missing or unknown:
            raise MoLEError(f"fixed gates must cover every block: missing {missing[:3]}, unknown {unknown[:3]}")
        fixed = {}
        for name in names:
            given = weights.get(name)
            fixed[name] = self._uniform() if given is None else self._checked_weights(name, given)
        self.fixed = fixed

    @property
    def fixed_weights_given(self):
        """What `set_fixed_gates` was last given (None: learned gates)."""
        return self._fixed_given

    def _checked_weights(self, block: str, given: Sequence[float]) -> torch.Tensor:
        w = torch.as_tensor(given, dtype=torch.float32).flatten()
        if w.numel() != len(self.experts) or not torch.isfinite(w).all() or (w < 0).any():
            raise MoLEError(f"{block}: fixed gate weights must be {len(self.experts)} finite numbers >= 0, got "
                            f"{w.tolist()}")
        w = w * self.keep
        if not w.sum() > 0:
            raise MoLEError(f"{block}: the fixed gate weights of the unmasked experts are all 0")
        return (w / w.sum()).unsqueeze(0)

    # -- gate state --------------------------------------------------------------------------------------------
    def gate_state(self) -> dict[str, torch.Tensor]:
        """{"<block>.weight" (N, C + D), "<block>.bias" (N,), "<block>.log_temperature" ()}: what a MoLE file and
        a training checkpoint store."""
        return {f"{b.name}.{k}": v.detach().cpu().clone() for b, gate in zip(self.blocks, self.gates, strict=True)
                for k, v in gate.state_dict().items()}

    def load_gate_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Loads gate_state() output; every block and shape is checked first (MoLEError naming the first)."""
        expected = {f"{b.name}.{k}": v for b, gate in zip(self.blocks, self.gates, strict=True)
                    for k, v in gate.state_dict().items()}
        missing, unknown = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unknown:
            raise MoLEError(f"the gates do not fit these experts on this model: missing {missing[:2]}, unexpected "
                            f"{unknown[:2]} (gates trained for other experts or another base model?)")
        for key, value in expected.items():
            if tuple(state[key].shape) != tuple(value.shape):
                raise MoLEError(f"gate {key} has shape {tuple(state[key].shape)}, this model needs "
                                f"{tuple(value.shape)} (gates trained for other experts or another base model?)")
            if not torch.isfinite(state[key]).all():
                raise MoLEError(f"gate {key} has NaN or inf values")
        with torch.no_grad():
            for key, value in expected.items():
                value.copy_(state[key])

    def extra_repr(self) -> str:
        params = sum(p.numel() for p in self.parameters())
        return f"experts={self.expert_names}, blocks={len(self.blocks)}, gate parameters={params}"


def _bind(function, first):
    """A hook with its block / layer bound (not functools.partial: hooks are called with the module first)."""
    return lambda *args, **kwargs: function(first, *args, **kwargs)


def attached_mole(pipe) -> MoLE | None:
    return getattr(pipe, ATTRIBUTE, None)


def check_pipeline(pipe, experts: Sequence[Expert], minimum: int = MIN_EXPERTS) -> dict[str, nn.Module]:
    """The checks before hooking experts into `pipe` (MoLE or a spatial router): none attached yet, no MoSLoRA
    adapters, the experts fit (check_experts), unfused q/k/v. Returns the pipeline's components. MoLEError.
    minimum: the fewest experts taken (1 where fixed one-hot gates only route: composition/ Switch, Composite)."""
    if attached_mole(pipe) is not None:
        raise MoLEError("this pipeline already has MoLE attached; detach_mole(pipe) first")
    if pipeline_adapters(pipe):
        raise MoLEError("this pipeline has MoSLoRA adapters attached; detach them before attaching MoLE")
    check_experts(experts, pipe, minimum)
    components = model_components(pipe)
    if any(getattr(m, "fused_projections", False) for model in components.values() for m in model.modules()):
        # fused q/k/v layers never call to_q / to_k / to_v, so their experts would silently do nothing
        raise MoLEError("the pipeline's attention projections are fused; call pipe.unfuse_qkv_projections() first")
    return components


def attach_mole(pipe, experts: Sequence[Expert], gates: Mapping[str, torch.Tensor] | None = None,
                granularity: str = "block", minimum: int = MIN_EXPERTS) -> MoLE:
    """Hooks MoLE into `pipe` (SD 1.x / 2.x / XL): experts as given by `load_experts`, gates uniform unless a
    gate_state is given. Checks everything first (MoLEError); the pipeline's weights are never modified.
    granularity: "block" (the paper's) or "position" (the UNet gates evaluated per latent position, positions.py;
    the same gate parameters, so a gate_state fits either).

    The gates are created on each block's device in fp32; after moving the pipeline, move them too (`m.to(dev)`).
    minimum: the fewest experts taken (see check_pipeline).
    Refused: a second MoLE, attached MoSLoRA adapters, fused q/k/v projections."""
    if granularity not in GRANULARITIES:
        raise MoLEError(f"unknown gate granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")
    components = check_pipeline(pipe, experts, minimum)
    keys = {key for expert in experts for key in expert.layers}
    blocks, layer_blocks = find_blocks(components, sorted(keys))
    mole = MoLE(experts, blocks, layer_blocks, components, detect_family(pipe).name, granularity)
    if gates is not None:
        mole.load_gate_state(gates)
    mole.install()
    setattr(pipe, ATTRIBUTE, mole)
    return mole


def detach_mole(pipe) -> MoLE:
    """Removes every hook: the pipeline computes exactly what it did before (its weights were never touched).
    Returns the detached MoLE (its gates can still be saved)."""
    mole = attached_mole(pipe)
    if mole is None:
        raise MoLEError("this pipeline has no MoLE attached")
    mole.remove()
    delattr(pipe, ATTRIBUTE)
    return mole


@contextmanager
def hooked(pipe, mole: MoLE) -> Iterator[MoLE]:
    """A MoLE built by `attach_mole` on this `pipe` and since detached, hooked in again for a with block only.

    For a caller that keeps other generations free of MoLE (the web app fuses adapters into the same weights):
    outside the block the pipeline computes exactly what it did before. MoLEError when a MoLE is attached."""
    if attached_mole(pipe) is not None:
        raise MoLEError("this pipeline already has MoLE attached; detach_mole(pipe) first")
    mole.install()
    setattr(pipe, ATTRIBUTE, mole)
    try:
        yield mole
    finally:
        detach_mole(pipe)
