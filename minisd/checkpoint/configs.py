"""The architecture of a checkpoint, told by its tensors' shapes (single file) or its config.json files
(diffusers folder), and checked to be a text-to-image SD-1.5 model that minisd can run."""
import math
import os

from ..config import ModelConfig, TextConfig, UNetConfig, VAEConfig
from ..errors import MinisdError
from .files import read_json
from .names import PREFIXES


# Other in/out channel counts of SD-1.5-shaped U-Nets, and what they are.
INPUT_CHANNEL_KINDS = {9: "an inpainting model", 8: "an image-editing (InstructPix2Pix) model", 5: "a depth-to-image model"}
CLIP_VOCAB = 49408   # token ids the CLIP tokenizer produces


def require_text_to_image(config, source):
    """What sampling and training rely on beyond the weights' shapes: 4 latent channels in and out,
    text features as wide as the U-Net's cross-attention expects, an embedding for every token id."""
    u, v, t = config.unet, config.vae, config.text
    if u.in_channels != 4:
        kind = f" ({INPUT_CHANNEL_KINDS[u.in_channels]})" if u.in_channels in INPUT_CHANNEL_KINDS else ""
        raise MinisdError(f"{source}: U-Net takes {u.in_channels} input channels{kind}; minisd runs text-to-image SD-1.5 with 4")
    if u.out_channels != 4:
        raise MinisdError(f"{source}: U-Net predicts {u.out_channels} channels; SD-1.5's predicts the 4 latent channels")
    if v.z_channels != 4:
        raise MinisdError(f"{source}: VAE has {v.z_channels} latent channels; SD-1.5's has 4")
    if u.context_dim != t.width:
        raise MinisdError(f"{source}: U-Net cross-attention takes {u.context_dim}-wide text features, "
                          f"but the text encoder gives {t.width}")
    if t.vocab_size < CLIP_VOCAB:
        raise MinisdError(f"{source}: text encoder has {t.vocab_size} token embeddings; the CLIP tokenizer needs {CLIP_VOCAB}")
    if t.width % t.heads or any(u.model_channels * m % u.num_heads for m in u.channel_mult):
        raise MinisdError(f"{source}: attention widths do not split into the heads "
                          f"(text {t.width} / {t.heads} heads, U-Net {u.model_channels}×{u.channel_mult} / {u.num_heads})")
    return config


def infer_config(parts, source="checkpoint"):
    """The architecture of original-named state dicts, read off their shapes."""
    def size(part, key, dim):
        if key not in parts[part]:
            raise MinisdError(f"{source}: missing key {PREFIXES[part] + key!r}, needed to tell the architecture")
        shape = parts[part][key].shape
        if len(shape) <= dim:
            raise MinisdError(f"{source}: {PREFIXES[part] + key!r} has shape {tuple(shape)}, too few dimensions")
        return shape[dim]

    unet, vae, text = parts["unet"], parts["vae"], parts["text_encoder"]
    mc = size("unet", "input_blocks.0.0.weight", 0)
    mults, attention_levels, n_res, level, block = [], [], 0, 0, 1
    while f"input_blocks.{block}.0.in_layers.0.weight" in unet or f"input_blocks.{block}.0.op.weight" in unet:
        if f"input_blocks.{block}.0.op.weight" in unet:
            level, n_res = level + 1, 0
        else:
            n_res += 1
            if n_res == 1:
                mults.append(size("unet", f"input_blocks.{block}.0.out_layers.3.weight", 0) // mc)
            if f"input_blocks.{block}.1.proj_in.weight" in unet and level not in attention_levels:
                attention_levels.append(level)
        block += 1
    unet_cfg = UNetConfig(model_channels=mc, channel_mult=tuple(mults), num_res_blocks=n_res,
                          attention_levels=tuple(attention_levels),
                          context_dim=size("unet", "middle_block.1.transformer_blocks.0.attn2.to_k.weight", 1),
                          in_channels=size("unet", "input_blocks.0.0.weight", 1), out_channels=size("unet", "out.2.weight", 0))
    ch = size("vae", "encoder.conv_in.weight", 0)
    n_levels = len({k.split(".")[2] for k in vae if k.startswith("encoder.down.")})
    vae_cfg = VAEConfig(ch=ch, ch_mult=tuple(size("vae", f"encoder.down.{i}.block.0.conv1.weight", 0) // ch for i in range(n_levels)),
                        num_res_blocks=len({k.split(".")[4] for k in vae if k.startswith("encoder.down.0.block.")}),
                        z_channels=size("vae", "post_quant_conv.weight", 0))
    tm = "text_model."
    width = size("text_encoder", tm + "embeddings.token_embedding.weight", 1)
    text_cfg = TextConfig(vocab_size=size("text_encoder", tm + "embeddings.token_embedding.weight", 0),
                          max_positions=size("text_encoder", tm + "embeddings.position_embedding.weight", 0),
                          width=width, heads=width // 64 or 1,
                          layers=len({k.split(".")[3] for k in text if k.startswith(tm + "encoder.layers.")}),
                          mlp_width=size("text_encoder", tm + "encoder.layers.0.mlp.fc1.weight", 0))
    return require_text_to_image(ModelConfig(unet_cfg, vae_cfg, text_cfg), source)


def positive(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


POSITIVE = (positive, "a positive integer")
POSITIVES = (lambda v: isinstance(v, list) and len(v) > 0 and all(map(positive, v)), "a list of positive integers")
NAMES = (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of names")
NUMBER = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf, "a positive finite number")
REQUIRED = object()


def setting(config, path, key, kind, default=REQUIRED):
    """config[key], checked to be of `kind` (a test and its description); `default` when absent or null."""
    if config.get(key) is None:
        if default is REQUIRED:
            raise MinisdError(f"{path}: lacks {key!r}")
        return default
    test, description = kind
    if not test(config[key]):
        raise MinisdError(f"{path}: {key!r} is {config[key]!r}, expected {description}")
    return config[key]


def config_from_diffusers(folder):
    up, vp, tp = (os.path.join(folder, part, "config.json") for part in ("unet", "vae", "text_encoder"))
    u, v, t = (read_json(path, "a diffusers folder has unet/, vae/ and text_encoder/, each with config.json") for path in (up, vp, tp))
    if os.path.isdir(os.path.join(folder, "text_encoder_2")) or u.get("addition_embed_type") is not None:
        raise MinisdError(f"{folder}: an SDXL pipeline (second text encoder, U-Net with addition_embed_type); minisd runs SD-1.5")
    if u.get("use_linear_projection"):
        raise MinisdError(f"{up}: U-Net with linear projections (SD 2.x) is not SD-1.5")
    if t.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise MinisdError(f"{tp}: hidden_act {t['hidden_act']!r} is not CLIP ViT-L/14's quick_gelu")

    boc = setting(u, up, "block_out_channels", POSITIVES)
    down = setting(u, up, "down_block_types", NAMES)
    if len(down) != len(boc) or any(c % boc[0] for c in boc):
        raise MinisdError(f"{up}: block_out_channels {boc} with down_block_types {down} are not SD-1.5's layout "
                          "(one block type per level, widths multiples of the first)")
    heads = u.get("num_attention_heads") or u.get("attention_head_dim", 8)   # diffusers' SD-1.5 configs say heads here
    if isinstance(heads, list) and len(set(heads)) == 1:
        heads = heads[0]
    if not positive(heads):
        raise MinisdError(f"{up}: attention heads {heads!r} are not SD-1.5's (one head count for every level)")
    unet_cfg = UNetConfig(model_channels=boc[0], channel_mult=tuple(c // boc[0] for c in boc),
                          num_res_blocks=setting(u, up, "layers_per_block", POSITIVE), num_heads=heads,
                          attention_levels=tuple(i for i, b in enumerate(down) if "CrossAttn" in b),
                          context_dim=setting(u, up, "cross_attention_dim", POSITIVE),
                          in_channels=setting(u, up, "in_channels", POSITIVE, 4),
                          out_channels=setting(u, up, "out_channels", POSITIVE, 4))
    vboc = setting(v, vp, "block_out_channels", POSITIVES)
    if any(c % vboc[0] for c in vboc):
        raise MinisdError(f"{vp}: block_out_channels {vboc} are not multiples of the first")
    vae_cfg = VAEConfig(ch=vboc[0], ch_mult=tuple(c // vboc[0] for c in vboc), num_res_blocks=setting(v, vp, "layers_per_block", POSITIVE),
                        z_channels=setting(v, vp, "latent_channels", POSITIVE, 4),
                        scaling_factor=setting(v, vp, "scaling_factor", NUMBER, 0.18215))
    text_cfg = TextConfig(vocab_size=setting(t, tp, "vocab_size", POSITIVE),
                          max_positions=setting(t, tp, "max_position_embeddings", POSITIVE),
                          width=setting(t, tp, "hidden_size", POSITIVE), layers=setting(t, tp, "num_hidden_layers", POSITIVE),
                          heads=setting(t, tp, "num_attention_heads", POSITIVE), mlp_width=setting(t, tp, "intermediate_size", POSITIVE))
    return require_text_to_image(ModelConfig(unet_cfg, vae_cfg, text_cfg), folder)
