"""Where each weight lives: the prefixes of an original (CompVis) single file, the files of a diffusers folder,
and diffusers' names for ours.

The model's module tree uses the original names, so a single file loads by stripping three prefixes.
Diffusers names are derived from ours by a few rules (`to_diffusers_name`), applied to every key of the
model, so one table serves both reading and writing.
"""
import re


# Where each part of the model lives in an original (CompVis) single-file checkpoint.
PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.",
}
CXR_CLASS = "CXRLatentDiffusion"   # model_index.json's `_class_name` in a chest-X-ray LDM's folder
CXR_UNET_CLASS = "CXRUNet"          # unet/config.json's
PART_NAMES = {"unet": "U-Net", "vae": "VAE", "text_encoder": "text encoder"}
# Per part, in order of preference; each may also be sharded: `<name>.index.json` with a weight_map.
DIFFUSERS_FILES = {
    "unet": ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
             "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"],
    "vae": ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"],
    "text_encoder": ["model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin"],
}
# Entries of real files that are not weights of the three networks: the DDPM schedule buffers, EMA
# bookkeeping and weights, the VAE's training loss (LPIPS, discriminator) that some files carry along,
# CLIP's position ids and logit scale.
KNOWN_EXTRAS = re.compile(
    r"^(betas|alphas_cumprod(_prev)?|sqrt_(recip(m1)?_)?alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|posterior_\w+|lvlb_weights|logvar|model_ema\..*|first_stage_model\.loss\..*)$"
    r"|(^|\.)position_ids$|(^|\.)logit_scale$")


RESNET_TO_DIFFUSERS = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                       "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
                       "nin_shortcut": "conv_shortcut"}
VAE_ATTN_TO_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
OLD_VAE_ATTN_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_head(rest, table):
    """Replace the first dotted component(s) of `rest` by table's name for it."""
    for ours, theirs in table.items():
        if rest.startswith(ours + "."):
            return theirs + rest[len(ours):]
    return rest


def to_diffusers_name(part, key, config):
    """Our (original-checkpoint) name of a parameter -> its name in a diffusers folder."""
    if part == "text_encoder":
        return key
    if part == "vae":
        return vae_to_diffusers(key, len(config.vae.ch_mult))
    return unet_to_diffusers(key, config.unet.num_res_blocks)


def unet_to_diffusers(key, n):
    fixed = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
             "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.", "out.2.": "conv_out."}
    for ours, theirs in fixed.items():
        if key.startswith(ours):
            return theirs + key[len(ours):]
    m = re.match(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.?(\d*)\.(.*)", key)
    kind, block, slot, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    if kind == "middle_block":
        slot = block
        name = {0: "mid_block.resnets.0", 1: "mid_block.attentions.0", 2: "mid_block.resnets.1"}[slot]
        return f"{name}.{rename_head(rest, RESNET_TO_DIFFUSERS) if slot != 1 else rest}"
    slot = int(slot)
    if kind == "input_blocks":
        level, j = divmod(block - 1, n + 1)
        if j == n:
            return f"down_blocks.{level}.downsamplers.0.conv.{rest[len('op.'):]}"
        where = "down_blocks"
    else:
        level, j = divmod(block, n + 1)
        if slot > 0 and rest.startswith("conv."):
            return f"up_blocks.{level}.upsamplers.0.{rest}"
        where = "up_blocks"
    if slot == 0:
        return f"{where}.{level}.resnets.{j}.{rename_head(rest, RESNET_TO_DIFFUSERS)}"
    return f"{where}.{level}.attentions.{j}.{rest}"


def vae_to_diffusers(key, n_levels):
    side, rest = key.split(".", 1)
    if side not in ("encoder", "decoder"):
        return key   # quant_conv, post_quant_conv
    m = re.match(r"(down|up)\.(\d+)\.(block\.(\d+)|downsample|upsample)\.(.*)", rest)
    if m:
        kind, level, what, j, tail = m.groups()
        level = int(level) if kind == "down" else n_levels - 1 - int(level)
        if j is not None:
            return f"{side}.{kind}_blocks.{level}.resnets.{j}.{rename_head(tail, RESNET_TO_DIFFUSERS)}"
        return f"{side}.{kind}_blocks.{level}.{what}rs.0.{tail}"
    m = re.match(r"mid\.(block_1|block_2|attn_1)\.(.*)", rest)
    if m:
        what, tail = m.groups()
        if what == "attn_1":
            return f"{side}.mid_block.attentions.0.{rename_head(tail, VAE_ATTN_TO_DIFFUSERS)}"
        return f"{side}.mid_block.resnets.{int(what[-1]) - 1}.{rename_head(tail, RESNET_TO_DIFFUSERS)}"
    return f"{side}.{rename_head(rest, {'norm_out': 'conv_norm_out'})}"


def normalize_diffusers_name(part, key):
    """Older diffusers spellings of the same weights."""
    if part == "vae":
        return re.sub(r"(attentions\.0\.)(query|key|value|proj_attn)\.", lambda m: m.group(1) + OLD_VAE_ATTN_NAMES[m.group(2)] + ".", key)
    if part == "text_encoder" and not key.startswith("text_model."):
        return "text_model." + key
    return key
