"""diffusers <-> original (LDM / SGM) UNet module names, derived from the UNet's config.

The original layout numbers blocks flatly: `input_blocks.N` holds one resnet (`.0`) and optionally
one transformer (`.1`), `output_blocks.N` likewise plus an upsampler, `middle_block.{0,1,2}`. Which N
a diffusers block maps to depends on the number of down blocks and layers per block, so the table
is computed from the config: the same code serves the tiny test models and full-size SD 1.5 / SDXL.
"""

from __future__ import annotations

from collections.abc import Mapping


def _per_block(value, count: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [int(value)] * count


def unet_block_prefixes(unet_config: Mapping) -> dict[str, str]:
    """{diffusers module prefix: LDM module prefix} for every block-level module of the UNet."""
    down_types = list(unet_config["down_block_types"])
    up_types = list(unet_config["up_block_types"])
    layers = _per_block(unet_config.get("layers_per_block", 2), len(down_types))
    table = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2",
             "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
             "mid_block.resnets.1": "middle_block.2"}
    index = 1  # input_blocks.0 is conv_in
    for i, block_type in enumerate(down_types):
        for j in range(layers[i]):
            table[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{index}.0"
            if "CrossAttn" in block_type:
                table[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        if i < len(down_types) - 1:  # every down block but the last ends in a downsampler
            table[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1
    up_layers = list(reversed(layers))
    index = 0
    for i, block_type in enumerate(up_types):
        has_attention = "CrossAttn" in block_type
        for j in range(up_layers[i] + 1):  # up blocks have one layer more than down blocks
            table[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{index}.0"
            if has_attention:
                table[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{index}.1"
            index += 1
        if i < len(up_types) - 1:  # the upsampler sits in the block's last output block
            table[f"up_blocks.{i}.upsamplers.0"] = f"output_blocks.{index - 1}.{2 if has_attention else 1}"
    return table


def to_ldm_unet_name(name: str, prefixes: Mapping[str, str]) -> str:
    """Renames the block part of a diffusers UNet module/parameter name (longest prefix wins)."""
    for prefix in sorted(prefixes, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "."):
            return prefixes[prefix] + name[len(prefix):]
    raise KeyError(f"UNet module {name!r} has no place in the original (LDM) layout")
