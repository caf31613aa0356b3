"""Reading and writing SD-1.5 checkpoints: original single files, diffusers folders and hub ids.

The model's module tree uses the original (CompVis) names, so a single file loads by stripping three
prefixes. Diffusers names are derived from ours by a few rules (`to_diffusers_name`), applied to every
key of the model, so one table serves both reading and writing.
"""
import json
import os
import re

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig, TextConfig, UNetConfig, VAEConfig
from .errors import MinisdError

# Where each part of the model lives in an original (CompVis) single-file checkpoint.
PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.",
}
DIFFUSERS_FILES = {
    "unet": ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
             "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"],
    "vae": ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"],
    "text_encoder": ["model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin"],
}
# Entries of real files that are not weights of the three networks: the DDPM schedule buffers, EMA
# bookkeeping, CLIP's position ids and logit scale.
KNOWN_EXTRAS = re.compile(
    r"^(betas|alphas_cumprod(_prev)?|sqrt_(recip(m1)?_)?alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|posterior_\w+|lvlb_weights|logvar|model_ema\..*)$|(^|\.)position_ids$|(^|\.)logit_scale$")
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


# ---------------------------------------------------------------------------------------------- files

def read_tensors(path):
    """All tensors of a .safetensors file, or of a .ckpt/.bin read with torch.load(weights_only=True)."""
    if not os.path.exists(path):
        raise MinisdError(f"{path}: no such file")
    if path.endswith(PICKLE_SUFFIXES):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise MinisdError(f"{path}: cannot be read as a weights-only checkpoint ({str(e).splitlines()[0]}); "
                              "convert it to .safetensors") from None
        obj = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise MinisdError(f"{path}: holds no state dict of tensors")
        return obj
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise MinisdError(f"{path}: not a readable safetensors file, or truncated ({str(e).splitlines()[0]})") from None


def atomic_save(tensors, path, metadata=None):
    """Write a .safetensors file through a temporary file and a rename, making its folder if needed."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


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

def infer_config(parts):
    """The architecture of original-named state dicts, read off their shapes."""
    unet, vae, text = parts["unet"], parts["vae"], parts["text_encoder"]
    try:
        mc = unet["input_blocks.0.0.weight"].shape[0]
        mults, attention_levels, n_res, level, block = [], [], 0, 0, 1
        while f"input_blocks.{block}.0.in_layers.0.weight" in unet or f"input_blocks.{block}.0.op.weight" in unet:
            if f"input_blocks.{block}.0.op.weight" in unet:
                level, n_res = level + 1, 0
            else:
                n_res += 1
                if n_res == 1:
                    mults.append(unet[f"input_blocks.{block}.0.out_layers.3.weight"].shape[0] // mc)
                if f"input_blocks.{block}.1.proj_in.weight" in unet and level not in attention_levels:
                    attention_levels.append(level)
            block += 1
        context_dim = unet["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
        unet_cfg = UNetConfig(model_channels=mc, channel_mult=tuple(mults), num_res_blocks=n_res,
                              attention_levels=tuple(attention_levels), context_dim=context_dim,
                              in_channels=unet["input_blocks.0.0.weight"].shape[1], out_channels=unet["out.2.weight"].shape[0])
        ch = vae["encoder.conv_in.weight"].shape[0]
        n_levels = len({k.split(".")[2] for k in vae if k.startswith("encoder.down.")})
        vae_cfg = VAEConfig(ch=ch, ch_mult=tuple(vae[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(n_levels)),
                            num_res_blocks=len({k.split(".")[4] for k in vae if k.startswith("encoder.down.0.block.")}),
                            z_channels=vae["post_quant_conv.weight"].shape[0])
        tm = "text_model."
        width = text[tm + "embeddings.token_embedding.weight"].shape[1]
        text_cfg = TextConfig(vocab_size=text[tm + "embeddings.token_embedding.weight"].shape[0],
                              max_positions=text[tm + "embeddings.position_embedding.weight"].shape[0],
                              width=width, heads=width // 64 or 1,
                              layers=len({k.split(".")[3] for k in text if k.startswith(tm + "encoder.layers.")}),
                              mlp_width=text[tm + "encoder.layers.0.mlp.fc1.weight"].shape[0])
    except KeyError as e:
        raise MinisdError(f"checkpoint is missing key {e.args[0]!r} needed to tell its architecture") from None
    return ModelConfig(unet_cfg, vae_cfg, text_cfg)


def config_from_diffusers(folder):
    def read(part):
        path = os.path.join(folder, part, "config.json")
        if not os.path.exists(path):
            raise MinisdError(f"{path}: missing (a diffusers folder has unet/, vae/ and text_encoder/, each with config.json)")
        try:
            with open(path) as f:
                return json.load(f)
        except json.JSONDecodeError as e:
            raise MinisdError(f"{path}: not valid JSON ({e})") from None

    u, v, t = read("unet"), read("vae"), read("text_encoder")
    try:
        if u.get("use_linear_projection"):
            raise MinisdError(f"{folder}: U-Net with linear projections (SD 2.x) is not SD-1.5")
        boc = u["block_out_channels"]
        heads = u.get("num_attention_heads") or u.get("attention_head_dim", 8)
        if isinstance(heads, (list, tuple)):
            if len(set(heads)) != 1:
                raise MinisdError(f"{folder}/unet/config.json: per-level head counts {heads} are not SD-1.5's")
            heads = heads[0]
        unet_cfg = UNetConfig(model_channels=boc[0], channel_mult=tuple(c // boc[0] for c in boc),
                              num_res_blocks=u["layers_per_block"], num_heads=heads,
                              attention_levels=tuple(i for i, b in enumerate(u["down_block_types"]) if "CrossAttn" in b),
                              context_dim=u["cross_attention_dim"], in_channels=u.get("in_channels", 4),
                              out_channels=u.get("out_channels", 4))
        vboc = v["block_out_channels"]
        vae_cfg = VAEConfig(ch=vboc[0], ch_mult=tuple(c // vboc[0] for c in vboc), num_res_blocks=v["layers_per_block"],
                            z_channels=v.get("latent_channels", 4), scaling_factor=v.get("scaling_factor", 0.18215))
        if t.get("hidden_act", "quick_gelu") != "quick_gelu":
            raise MinisdError(f"{folder}/text_encoder/config.json: hidden_act {t['hidden_act']!r} is not CLIP ViT-L/14's quick_gelu")
        text_cfg = TextConfig(vocab_size=t["vocab_size"], max_positions=t["max_position_embeddings"], width=t["hidden_size"],
                              layers=t["num_hidden_layers"], heads=t["num_attention_heads"], mlp_width=t["intermediate_size"])
    except KeyError as e:
        raise MinisdError(f"{folder}: config.json lacks {e.args[0]!r}") from None
    return ModelConfig(unet_cfg, vae_cfg, text_cfg)


# --------------------------------------------------------------------------------------- reading

def split_single_file(tensors, path):
    """Original single file -> per-part dicts with our names; unknown keys are an error."""
    parts = {part: {} for part in PREFIXES}
    for key, value in tensors.items():
        if KNOWN_EXTRAS.search(key):
            continue
        for part, prefix in PREFIXES.items():
            if key.startswith(prefix):
                name = key[len(prefix):]
                if part == "text_encoder" and not name.startswith("text_model."):
                    name = "text_model." + name
                parts[part][name] = value
                break
        else:
            raise MinisdError(f"{path}: unexpected key {key!r}")
    if not any(parts.values()):
        raise MinisdError(f"{path}: no SD-1.5 weights found (keys like 'model.diffusion_model.…' expected)")
    return parts


def find_part_file(folder, part):
    for name in DIFFUSERS_FILES[part]:
        path = os.path.join(folder, part, name)
        if os.path.exists(path):
            return path
    raise MinisdError(f"{os.path.join(folder, part)}: no weights file (expected one of {', '.join(DIFFUSERS_FILES[part])})")


def read_diffusers_folder(folder, model):
    """Diffusers folder -> per-part dicts with our names, mapped through `to_diffusers_name`."""
    parts = {}
    for part, module in model.parts().items():
        path = find_part_file(folder, part)
        tensors = {normalize_diffusers_name(part, k): v for k, v in read_tensors(path).items()}
        ours = {}
        for name in module.state_dict():
            theirs = to_diffusers_name(part, name, model.config)
            if theirs in tensors:
                ours[name] = tensors.pop(theirs)
        for key in tensors:
            if not KNOWN_EXTRAS.search(key):
                raise MinisdError(f"{path}: unexpected key {key!r}")
        parts[part] = ours
    return parts


def check_and_convert(parts, model, source, dtype):
    """Every parameter present with the right shape; VAE attention accepted as [C,C] or [C,C,1,1]."""
    out = {}
    for part, module in model.parts().items():
        expected = module.state_dict()
        given = parts.get(part, {})
        for name in given:
            if name not in expected:
                raise MinisdError(f"{source}: unexpected key {PREFIXES[part] + name!r}")
        out[part] = {}
        for name, ref in expected.items():
            if name not in given:
                raise MinisdError(f"{source}: missing key {PREFIXES[part] + name!r}")
            value = given[name]
            if value.shape != ref.shape and value.numel() == ref.numel() and part == "vae" and ".attn_1." in name:
                value = value.reshape(ref.shape)
            if value.shape != ref.shape:
                raise MinisdError(f"{source}: {PREFIXES[part] + name!r} has shape {tuple(value.shape)}, expected {tuple(ref.shape)}")
            if not value.is_floating_point():
                raise MinisdError(f"{source}: {PREFIXES[part] + name!r} has dtype {value.dtype}, expected floating point")
            out[part][name] = value.to(dtype)
    return out


HUB_FILES = ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
             "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
             "text_encoder/model.safetensors"]


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
        raise MinisdError(f"model {repo_id!r} is not in the local huggingface cache and could not be downloaded "
                          f"({type(e).__name__}); pass a local path: --model PATH (a single .safetensors file or a diffusers folder)") from None


def read_checkpoint(source):
    """path | diffusers folder | hub id -> (kind, config or None, parts or loader needing the model)."""
    if os.path.isdir(source):
        if not os.path.isdir(os.path.join(source, "unet")):
            raise MinisdError(f"{source}: unknown layout (expected a diffusers folder with unet/, vae/ and text_encoder/)")
        return "diffusers", source
    if os.path.exists(source):
        if not source.endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES):
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
