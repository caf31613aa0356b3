"""Reading and writing SD-1.5 checkpoints: original single files, diffusers folders and hub ids.

The model's module tree uses the original (CompVis) names, so a single file loads by stripping three
prefixes. Diffusers names are derived from ours by a few rules (`to_diffusers_name`), applied to every
key of the model, so one table serves both reading and writing.
"""
import contextlib
import json
import os
import re

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ModelConfig, TextConfig, UNetConfig, VAEConfig
from .errors import MinisdError

# Where each part of the model lives in an original (CompVis) single-file checkpoint.
PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.",
}
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
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# Files that are not an SD-1.5 checkpoint, told by their keys: the first rule that some key matches names
# the file. OTHER_MODELS never match an SD-1.5 key; PARTS_ALONE apply when no key has an SD-1.5 prefix.
OTHER_MODELS = [
    (r"^lora_(unet|te\d?)_|\.(lora_down|lora_up|lora_A|lora_B)(\.weight)?$|_lora\.(down|up)\.weight$|\.(hada_w1_a|lokr_w1)$",
     "is a LoRA adapter, not a model"),
    (r"^conditioner\.embedders\.", "is an SDXL checkpoint"),
    (r"^cond_stage_model\.model\.", "is an SD 2.x checkpoint with an OpenCLIP text encoder"),
    (r"^(model\.diffusion_model\.)?joint_blocks\.", "is an SD3 checkpoint"),
    (r"^(model\.diffusion_model\.)?double_blocks\.", "is a Flux checkpoint"),
    (r"^control_model\.|^controlnet_", "is a ControlNet, not a base model"),
    (r"^emb_params$", "is a textual-inversion embedding, not a model"),
]
PARTS_ALONE = [
    (r"^(encoder|decoder|quant_conv|post_quant_conv)\.", "holds a VAE alone"),
    (r"^(input_blocks|middle_block|output_blocks|time_embed|down_blocks|mid_block|up_blocks|time_embedding|conv_in)\.",
     "holds a U-Net alone"),
    (r"^(transformer\.)?text_model\.|^embeddings\.token_embedding\.", "holds a text encoder alone"),
]


# ---------------------------------------------------------------------------------------------- files

def first_line(e):
    """The first sentence of an exception's message, for one-line errors."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]


def read_tensors(path):
    """The tensors of a .safetensors file (known extras left unread), or of a .ckpt/.pt/.bin read with
    torch.load(weights_only=True); a `state_dict` entry is unwrapped and non-tensor entries are dropped."""
    if not os.path.exists(path):
        raise MinisdError(f"{path}: no such file")
    if os.path.isdir(path):
        raise MinisdError(f"{path}: is a folder, expected a weights file")
    if os.path.getsize(path) == 0:
        raise MinisdError(f"{path}: is empty (0 bytes)")
    if path.lower().endswith(PICKLE_SUFFIXES):
        return read_pickle(path)
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if not KNOWN_EXTRAS.search(k)}
    except OSError as e:
        raise MinisdError(f"{path}: cannot be read ({e.strerror or first_line(e)})") from None
    except Exception as e:
        raise MinisdError(f"{path}: not a readable safetensors file, or truncated ({first_line(e)})") from None


def read_pickle(path):
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise MinisdError(f"{path}: cannot be read ({e.strerror or first_line(e)})") from None
    except Exception as e:
        needs = re.findall(r"GLOBAL ([\w.]+)", str(e))   # torch names the first object it refused
        if needs:
            raise MinisdError(f"{path}: cannot be read weights-only: its pickle needs the Python object {needs[0]}, "
                              "and minisd never runs pickled code; convert it to .safetensors where you trust it") from None
        raise MinisdError(f"{path}: not a readable PyTorch checkpoint, or truncated ({first_line(e)})") from None
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]   # Lightning checkpoints: {"state_dict": …, "global_step": …, "epoch": …}
    if not isinstance(obj, dict):
        raise MinisdError(f"{path}: holds a {type(obj).__name__}, not a state dict of named tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        entries = ", ".join(f"{k!r} ({type(v).__name__})" for k, v in list(obj.items())[:4])
        raise MinisdError(f"{path}: holds no tensors, so no state dict (entries: {entries or 'none'})")
    return tensors


def read_json(path, missing):
    """A JSON object from a file; `missing` says what the file is for when it is absent."""
    if not os.path.exists(path):
        raise MinisdError(f"{path}: missing ({missing})")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise MinisdError(f"{path}: cannot be read ({e.strerror or first_line(e)})") from None
    except ValueError as e:   # JSONDecodeError, UnicodeDecodeError
        raise MinisdError(f"{path}: not valid JSON ({first_line(e)})") from None
    if not isinstance(data, dict):
        raise MinisdError(f"{path}: holds a JSON {type(data).__name__}, expected an object")
    return data


def atomic_save(tensors, path, metadata=None):
    """Write a .safetensors file through a temporary file and a rename, making its folder if needed; a
    path that cannot be written is one error naming it, and leaves no temporary file behind."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise MinisdError(f"{path}: is a folder, expected a file name")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise MinisdError(f"{path}: cannot write ({getattr(e, 'strerror', None) or first_line(e)})") from None


# ------------------------------------------------------------------------------------ name mapping

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


# ----------------------------------------------------------------------------- configs from files

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
NUMBER = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, "a positive number")
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


# --------------------------------------------------------------------------------------- reading

def name_other_models(keys, path):
    """A file that is another model, an adapter or one part alone is named for what it is."""
    keys = list(keys)
    has_sd15_part = any(k.startswith(tuple(PREFIXES.values())) for k in keys)
    for pattern, what in OTHER_MODELS + ([] if has_sd15_part else PARTS_ALONE):
        key = next((k for k in keys if re.search(pattern, k)), None)
        if key is not None:
            raise MinisdError(f"{path}: {what} (key {key!r}); minisd loads whole SD-1.5 models (U-Net, VAE and text encoder)")


def split_single_file(tensors, path):
    """Original single file -> per-part dicts with our names; unknown keys are an error."""
    name_other_models(tensors, path)
    parts = {part: {} for part in PREFIXES}
    for key, value in tensors.items():
        if KNOWN_EXTRAS.search(key):
            continue
        for part, prefix in PREFIXES.items():
            if key.startswith(prefix):
                name = key[len(prefix):]
                if part == "text_encoder" and not name.startswith("text_model."):
                    name = "text_model." + name
                if name in parts[part]:   # spelled both with and without `text_model.`
                    raise MinisdError(f"{path}: holds the weight {name!r} twice ({prefix + name!r} and "
                                      f"{prefix + name[len('text_model.'):]!r}); keep one")
                parts[part][name] = value
                break
        else:
            raise MinisdError(f"{path}: unexpected key {key!r}")
    if not any(parts.values()):
        raise MinisdError(f"{path}: no SD-1.5 weights found (keys like 'model.diffusion_model.…' expected)")
    missing = [f"no {PART_NAMES[part]} (keys '{PREFIXES[part]}…')" for part in PREFIXES if not parts[part]]
    if missing:
        raise MinisdError(f"{path}: has {' and '.join(missing)}; minisd needs U-Net, VAE and text encoder in one file")
    return parts


def find_part_files(folder, part):
    """(what to name in messages, weights files) of one diffusers part: a file, or the shards its index lists."""
    for name in DIFFUSERS_FILES[part]:
        path = os.path.join(folder, part, name)
        if os.path.exists(path):
            return path, [path]
        if os.path.exists(path + ".index.json"):
            return path + ".index.json", shard_files(path + ".index.json")
    raise MinisdError(f"{os.path.join(folder, part)}: no weights file (expected one of {', '.join(DIFFUSERS_FILES[part])}, "
                      "or a sharded one's .index.json)")


def shard_files(index):
    weight_map = read_json(index, "").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(f, str) for f in weight_map.values()):
        raise MinisdError(f"{index}: no 'weight_map' naming a shard file for each key")
    shards = []
    for name in dict.fromkeys(weight_map.values()):
        path = os.path.join(os.path.dirname(index), name)
        if not os.path.exists(path):
            raise MinisdError(f"{index}: shard file {name!r} is missing")
        shards.append(path)
    return shards


def read_diffusers_folder(folder, model):
    """Diffusers folder -> (per-part dicts with our names, mapped through `to_diffusers_name`;
    locate(part, name) -> (file, key) that names a weight as the folder holds it)."""
    parts, origins = {}, {}
    for part, module in model.parts().items():
        origin, files = find_part_files(folder, part)
        tensors = {}
        for path in files:
            for key, value in read_tensors(path).items():
                name = normalize_diffusers_name(part, key)
                if name in tensors:
                    raise MinisdError(f"{path}: {key!r} holds the same weight as another key ({name!r})")
                tensors[name] = value
        ours = {}
        for name in module.state_dict():
            theirs = to_diffusers_name(part, name, model.config)
            if theirs in tensors:
                ours[name] = tensors.pop(theirs)
        for key in tensors:
            if not KNOWN_EXTRAS.search(key):
                raise MinisdError(f"{origin}: unexpected key {key!r}")
        parts[part], origins[part] = ours, origin
    return parts, lambda part, name: (origins[part], to_diffusers_name(part, name, model.config))


def all_finite(t):
    """No NaN or inf, in one vectorised pass: min and max propagate NaN, and an inf is an extreme."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(lo.isfinite() & hi.isfinite())


def check_and_convert(parts, model, source, dtype, locate=None):
    """Every parameter present with the right shape and finite values, converted to dtype (the file's
    tensors are released as they are converted); VAE attention accepted as [C,C] or [C,C,1,1].
    locate(part, name) -> (file, key) names a weight in messages; by default the single-file key in `source`."""
    locate = locate or (lambda part, name: (source, PREFIXES[part] + name))
    out = {}
    for part, module in model.parts().items():
        expected = module.state_dict()
        given = parts.get(part, {})
        for name in given:
            if name not in expected:
                raise MinisdError("{}: unexpected key {!r}".format(*locate(part, name)))
        out[part] = {}
        for name, ref in expected.items():
            file, key = locate(part, name)
            if name not in given:
                raise MinisdError(f"{file}: missing key {key!r}")
            original = given.pop(name)
            value = original
            if value.shape != ref.shape and value.numel() == ref.numel() and part == "vae" and ".attn_1." in name:
                value = value.reshape(ref.shape)
            if value.shape != ref.shape:
                raise MinisdError(f"{file}: {key!r} has shape {tuple(value.shape)}, expected {tuple(ref.shape)}")
            if not value.is_floating_point():
                raise MinisdError(f"{file}: {key!r} has dtype {value.dtype}, expected floating point")
            value = value.to(dtype)
            if not all_finite(value):
                if bool(torch.isfinite(original).all()):
                    raise MinisdError(f"{file}: {key!r} has values beyond {str(dtype).replace('torch.', '')} range (largest magnitude "
                                      f"{original.abs().max().item():.3g}); load the model in float32 or bfloat16")
                raise MinisdError(f"{file}: {key!r} holds NaN or infinite values (a broken checkpoint: it would give "
                                  "black or noise images)")
            out[part][name] = value
    return out


HUB_FILES = ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
             "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
             "text_encoder/model.safetensors",
             "unet/diffusion_pytorch_model.safetensors.index.json", "unet/diffusion_pytorch_model-*-of-*.safetensors",
             "text_encoder/model.safetensors.index.json", "text_encoder/model-*-of-*.safetensors"]


def resolve_hub_id(repo_id):
    """Local huggingface cache first, then a download; offline and uncached is a clear error."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise MinisdError(f"{repo_id!r} is not a local path, and huggingface_hub is not installed to fetch it") from None
    try:
        return snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True)
    except Exception:
        pass
    try:
        return snapshot_download(repo_id, allow_patterns=HUB_FILES)
    except Exception as e:
        raise MinisdError(f"{repo_id!r}: no such local file or folder, and as a hub model it is not in the local huggingface "
                          f"cache and could not be downloaded ({type(e).__name__}); pass a local path: --model PATH "
                          "(a single .safetensors file or a diffusers folder)") from None


def diffusers_root(folder):
    """The diffusers folder whose unet/, vae/ or text_encoder/ (with its config.json) `folder` is, or None."""
    folder = os.path.abspath(folder)
    root = os.path.dirname(folder)
    if os.path.basename(folder) in PREFIXES and os.path.isfile(os.path.join(folder, "config.json")) \
            and os.path.isdir(os.path.join(root, "unet")):
        return root
    return None


def not_a_diffusers_folder(folder):
    """One line saying what a folder without unet/ is, and what to pass instead."""
    folder = os.path.abspath(folder)
    if diffusers_root(folder):
        return f"{folder}: the {os.path.basename(folder)}/ of a diffusers folder; pass the folder itself: {diffusers_root(folder)}"
    index = os.path.join(folder, "model_index.json")
    if os.path.isfile(index):
        pipeline = read_json(index, "").get("_class_name", "pipeline")
        return f"{folder}: a {pipeline} folder without unet/; minisd loads SD-1.5 (unet/, vae/ and text_encoder/)"
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES))
    if files:
        return f"{folder}: not a diffusers folder (no unet/); pass a checkpoint file in it instead, e.g. {os.path.join(folder, files[0])}"
    return f"{folder}: unknown layout: a folder, but neither a diffusers folder (unet/, vae/, text_encoder/) nor one holding a checkpoint file"


def read_checkpoint(source):
    """path | diffusers folder | hub id -> (kind, path): ("single", file) or ("diffusers", folder)."""
    source = os.path.expanduser(os.fspath(source))
    if os.path.isdir(source):
        if not os.path.isdir(os.path.join(source, "unet")):
            raise MinisdError(not_a_diffusers_folder(source))
        return "diffusers", source
    if os.path.exists(source):
        folder = os.path.dirname(os.path.abspath(source))
        if os.path.basename(source) == "model_index.json" and os.path.isdir(os.path.join(folder, "unet")):
            raise MinisdError(f"{source}: the index of a diffusers folder; pass the folder itself: {folder}")
        if diffusers_root(folder):
            raise MinisdError(f"{source}: one part of a diffusers folder; pass the folder itself: {diffusers_root(folder)}")
        if not source.lower().endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES):
            raise MinisdError(f"{source}: unknown checkpoint type (expected .safetensors, .ckpt or a diffusers folder)")
        return "single", source
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.startswith((".", "/")) and not source.endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES):
        return "diffusers", resolve_hub_id(source)
    raise MinisdError(f"{source}: no such file or folder (give a .safetensors file, a diffusers folder, a hub id or 'tiny')")


# --------------------------------------------------------------------------------------- writing

def save_single_file(model, path, dtype=None):
    """The whole model as an original-layout single file (what other SD tools open)."""
    tensors = {PREFIXES[part] + k: (v.to(dtype) if dtype else v).cpu()
               for part, module in model.parts().items() for k, v in module.state_dict().items()}
    atomic_save(tensors, path)


def diffusers_configs(config):
    u, v, t = config.unet, config.vae, config.text
    down = ["CrossAttnDownBlock2D" if i in u.attention_levels else "DownBlock2D" for i in range(len(u.channel_mult))]
    up = ["CrossAttnUpBlock2D" if i in u.attention_levels else "UpBlock2D" for i in reversed(range(len(u.channel_mult)))]
    return {
        "unet": {"_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": u.in_channels,
                 "out_channels": u.out_channels, "down_block_types": down, "up_block_types": up,
                 "mid_block_type": "UNetMidBlock2DCrossAttn",
                 "block_out_channels": [u.model_channels * m for m in u.channel_mult],
                 "layers_per_block": u.num_res_blocks, "attention_head_dim": u.num_heads,
                 "cross_attention_dim": u.context_dim, "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu",
                 "center_input_sample": False, "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0,
                 "mid_block_scale_factor": 1, "use_linear_projection": False},
        "vae": {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
                "down_block_types": ["DownEncoderBlock2D"] * len(v.ch_mult), "up_block_types": ["UpDecoderBlock2D"] * len(v.ch_mult),
                "block_out_channels": [v.ch * m for m in v.ch_mult], "layers_per_block": v.num_res_blocks,
                "latent_channels": v.z_channels, "norm_num_groups": 32, "act_fn": "silu", "sample_size": 512,
                "scaling_factor": v.scaling_factor},
        "text_encoder": {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": t.width,
                         "intermediate_size": t.mlp_width, "num_attention_heads": t.heads, "num_hidden_layers": t.layers,
                         "max_position_embeddings": t.max_positions, "vocab_size": t.vocab_size, "hidden_act": "quick_gelu",
                         "layer_norm_eps": 1e-5, "projection_dim": t.width, "bos_token_id": 49406, "eos_token_id": 49407,
                         "pad_token_id": 49407},
    }


def save_diffusers(model, folder, dtype=None):
    """The whole model as a diffusers folder (unet/, vae/, text_encoder/ with config.json each)."""
    configs = diffusers_configs(model.config)
    for part, module in model.parts().items():
        os.makedirs(os.path.join(folder, part), exist_ok=True)
        tensors = {}
        for name, value in module.state_dict().items():
            if part == "vae" and ".attn_1." in name and value.dim() == 4:
                value = value[:, :, 0, 0]   # diffusers keeps the VAE attention as linear layers
            tensors[to_diffusers_name(part, name, model.config)] = (value.to(dtype) if dtype else value).cpu()
        atomic_save(tensors, os.path.join(folder, part, DIFFUSERS_FILES[part][0]))
        with open(os.path.join(folder, part, "config.json"), "w") as f:
            json.dump(configs[part], f, indent=2)
    write_pipeline_files(model, folder)


def write_pipeline_files(model, folder):
    """Tokenizer, scheduler and model_index.json, so that the folder opens as a whole pipeline."""
    os.makedirs(os.path.join(folder, "tokenizer"), exist_ok=True)
    with open(os.path.join(folder, "tokenizer", "vocab.json"), "w") as f:
        json.dump(model.tokenizer.encoder, f)
    with open(os.path.join(folder, "tokenizer", "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(pair) for pair in model.tokenizer.ranks) + "\n")
    with open(os.path.join(folder, "tokenizer", "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": model.config.text.max_positions, "pad_token": "<|endoftext|>",
                   "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, f)
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump({"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                   "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
                   "prediction_type": "epsilon"}, f, indent=2)
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
             "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
