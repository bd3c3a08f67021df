"""diffusers <-> original (LDM / SGM) UNet and VAE names, derived from the models' configs.

The original layout numbers blocks flatly: `input_blocks.N` holds one resnet (`.0`) and optionally
one transformer (`.1`), `output_blocks.N` likewise plus an upsampler, `middle_block.{0,1,2}`. Which N
a diffusers block maps to depends on the number of down blocks and layers per block, so the table
is computed from the config: the same code serves the tiny test models and full-size SD 1.5 / SDXL.
The VAE works the same way (`encoder.down.N.block.M`, `decoder.up.N` numbered in reverse, `mid.attn_1`).
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


def _split_prefix(name: str, prefixes: Mapping[str, str]) -> tuple[str, str] | None:
    """(longest prefix of `name` in the table, the rest starting with "." or empty), or None."""
    for prefix in sorted(prefixes, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "."):
            return prefix, name[len(prefix):]
    return None


def to_ldm_unet_name(name: str, prefixes: Mapping[str, str]) -> str:
    """Renames the block part of a diffusers UNet module/parameter name (longest prefix wins)."""
    split = _split_prefix(name, prefixes)
    if split is None:
        raise KeyError(f"UNet module {name!r} has no place in the original (LDM) layout")
    return prefixes[split[0]] + split[1]


# Inside a block the layouts mostly agree (a transformer's attn1.to_q, ff.net.2, proj_in are named
# alike); resnets and the VAE's mid-block attention are where the names differ.
UNET_RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                     "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET_NAMES = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_inner(rest: str, names: Mapping[str, str]) -> str:
    """".norm1.weight" -> ".in_layers.0.weight" for names = UNET_RESNET_NAMES; unknown names pass."""
    inner = rest[1:]
    for old in sorted(names, key=len, reverse=True):
        if inner.startswith(old + "."):
            return "." + names[old] + inner[len(old):]
    return rest


def ldm_unet_key(key: str, prefixes: Mapping[str, str]) -> str:
    """Full LDM name of a diffusers UNet parameter, e.g. down_blocks.0.resnets.1.norm1.weight ->
    input_blocks.2.0.in_layers.0.weight. prefixes: `unet_block_prefixes(unet.config)`."""
    split = _split_prefix(key, prefixes)
    if split is None:
        raise KeyError(f"UNet parameter {key!r} has no place in the original (LDM) layout")
    prefix, rest = split
    if ".resnets." in prefix:
        rest = _rename_inner(rest, UNET_RESNET_NAMES)
    return prefixes[prefix] + rest


def vae_block_prefixes(vae_config: Mapping) -> dict[str, str]:
    """{diffusers prefix: LDM prefix} for an AutoencoderKL, from its block types and layers per block.

    The LDM decoder numbers its up blocks from the bottom (`up.0` runs last) where diffusers numbers
    them in execution order, so the index is reversed. Decoder blocks have one resnet more.
    """
    table = {name: name for name in ("quant_conv", "post_quant_conv")}
    for side in ("encoder", "decoder"):
        table.update({f"{side}.conv_in": f"{side}.conv_in", f"{side}.conv_out": f"{side}.conv_out",
                      f"{side}.conv_norm_out": f"{side}.norm_out",
                      f"{side}.mid_block.attentions.0": f"{side}.mid.attn_1"})
        for k in range(2):  # the VAE mid block always has two resnets around its attention
            table[f"{side}.mid_block.resnets.{k}"] = f"{side}.mid.block_{k + 1}"
    layers = int(vae_config.get("layers_per_block", 1))
    for i in range(len(vae_config["down_block_types"])):
        for j in range(layers):
            table[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
        table[f"encoder.down_blocks.{i}.downsamplers.0"] = f"encoder.down.{i}.downsample"
    count = len(vae_config["up_block_types"])
    for i in range(count):
        for j in range(layers + 1):
            table[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{count - 1 - i}.block.{j}"
        table[f"decoder.up_blocks.{i}.upsamplers.0"] = f"decoder.up.{count - 1 - i}.upsample"
    return table


def ldm_vae_key(key: str, prefixes: Mapping[str, str]) -> str:
    """Full LDM name of a diffusers VAE parameter (prefixes: `vae_block_prefixes(vae.config)`)."""
    split = _split_prefix(key, prefixes)
    if split is None:
        raise KeyError(f"VAE parameter {key!r} has no place in the original (LDM) layout")
    prefix, rest = split
    if ".resnets." in prefix:
        rest = _rename_inner(rest, VAE_RESNET_NAMES)
    elif ".attentions." in prefix:
        rest = _rename_inner(rest, VAE_ATTENTION_NAMES)
    return prefixes[prefix] + rest
