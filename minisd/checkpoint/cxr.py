"""The chest-X-ray LDM's folder: diffusers' layout, with minisd's own networks in it.

    MODEL/model_index.json                      {"_class_name": "CXRLatentDiffusion", …}
    MODEL/scheduler/scheduler_config.json       the noise schedule (diffusers' DDIMScheduler config)
    MODEL/vae/config.json, model.safetensors    minisd's names (encoder.down.2.attn.q.weight, …)
    MODEL/unet/config.json, model.safetensors
    MODEL/text_encoder/                         a Hugging Face BERT folder (config.json, model.safetensors,
                                                vocab.txt, tokenizer_config.json) that transformers opens

Each part is its own file, so that training one part rewrites only that part's files. Every file is written
atomically, model_index.json last: an interrupted first write leaves no folder that loads.
"""
import os
from dataclasses import asdict

from ..config import ScheduleConfig
from ..cxr.config import CXRConfig, CXRUNetConfig, CXRVAEConfig
from ..errors import MinisdError
from .bert import read_bert_folder, save_bert_folder
from .configs import NUMBER, POSITIVE, POSITIVES, setting
from ..files import atomic_json
from .files import atomic_save, read_json, read_tensors
from .names import CXR_CLASS, CXR_UNET_CLASS
from .writing import write_scheduler

WEIGHTS = "model.safetensors"
PART_CLASSES = {"vae": "CXRVAE", "unet": CXR_UNET_CLASS}
LEVELS = (lambda v: isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v),
          "a list of level indices")
BETA_SCHEDULES = ("linear", "scaled_linear")


def part_config(folder, part):
    """The config.json of `part` in its folder (MODEL/vae, MODEL/unet)."""
    path = os.path.join(folder, "config.json")
    c = read_json(path, f"a cxr-ldm folder has {part}/config.json")
    if c.get("_class_name") != PART_CLASSES[part]:
        raise MinisdError(f"{path}: _class_name {c.get('_class_name')!r}, expected {PART_CLASSES[part]!r}")
    return path, c


def vae_config(folder):
    path, c = part_config(folder, "vae")
    channels = setting(c, path, "channels", POSITIVES)
    levels = setting(c, path, "attention_levels", LEVELS)
    if len(channels) < 2 or any(level >= len(channels) - 1 for level in levels):
        raise MinisdError(f"{path}: attention_levels {levels} do not fit the {len(channels) - 1} levels of channels {channels}")
    return CXRVAEConfig(channels=tuple(channels), attention_levels=tuple(levels), z_channels=setting(c, path, "z_channels", POSITIVE),
                        scaling_factor=setting(c, path, "scaling_factor", NUMBER))


def unet_config(folder):
    path, c = part_config(folder, "unet")
    config = CXRUNetConfig(model_channels=setting(c, path, "model_channels", POSITIVE),
                           channel_mult=tuple(setting(c, path, "channel_mult", POSITIVES)),
                           num_heads=setting(c, path, "num_heads", POSITIVE), context_dim=setting(c, path, "context_dim", POSITIVE),
                           sample_size=setting(c, path, "sample_size", POSITIVE, CXRUNetConfig.sample_size))
    widths = [config.model_channels * m for m in config.channel_mult]
    if any(w % config.num_heads for w in widths) or config.context_dim % config.num_heads:
        raise MinisdError(f"{path}: widths {widths} and context_dim {config.context_dim} do not split into {config.num_heads} heads")
    return config


def schedule_config(folder):
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    c = read_json(path, "a cxr-ldm folder has scheduler/scheduler_config.json")
    kind = c.get("beta_schedule")
    if kind not in BETA_SCHEDULES:
        raise MinisdError(f"{path}: beta_schedule {kind!r}, expected one of {', '.join(BETA_SCHEDULES)}")
    for key, wanted in (("num_train_timesteps", 1000), ("prediction_type", "epsilon")):
        if c.get(key, wanted) != wanted:
            raise MinisdError(f"{path}: {key} {c[key]!r}; minisd samples and trains with {wanted!r}")
    return ScheduleConfig(kind, setting(c, path, "beta_start", NUMBER), setting(c, path, "beta_end", NUMBER))


def read_cxr_folder(folder):
    """(CXRConfig, tokenizer, per-part {name: tensor}, locate(part, name) -> (file, key)) of a cxr-ldm folder."""
    text_folder = os.path.join(folder, "text_encoder")
    bert = read_bert_folder(text_folder)
    length = bert.tokenizer_settings["model_max_length"]
    tokenizer_config = os.path.join(text_folder, "tokenizer_config.json")
    if not (isinstance(length, int) and 2 < length <= bert.config.max_position_embeddings):
        raise MinisdError(f"{tokenizer_config}: model_max_length {length!r}, expected the prompt length in tokens "
                          f"(3 … {bert.config.max_position_embeddings}, the position embeddings)")
    config = CXRConfig(unet=unet_config(os.path.join(folder, "unet")), vae=vae_config(os.path.join(folder, "vae")), text=bert.config,
                       schedule=schedule_config(folder), max_length=length)
    files = {part: os.path.join(folder, part, WEIGHTS) for part in PART_CLASSES}
    parts = {part: read_tensors(path) for part, path in files.items()}
    parts["text_encoder"], files["text_encoder"] = bert.tensors, bert.weights
    return config, bert.tokenizer(length, os.path.join(text_folder, "vocab.txt")), parts, lambda part, name: (files[part], name)


def read_vae(folder):
    """(CXRVAEConfig, {name: tensor}, locate) of a VAE folder (MODEL/vae: config.json, model.safetensors)."""
    config, path = vae_config(folder), os.path.join(folder, WEIGHTS)
    return config, read_tensors(path), lambda part, name: (path, name)


def save_part(model, part, folder, dtype=None):
    """One part of the model (vae or unet) as its folder: config.json and model.safetensors."""
    os.makedirs(folder, exist_ok=True)
    atomic_save({k: (v.to(dtype) if dtype else v).cpu() for k, v in getattr(model, part).state_dict().items()},
                os.path.join(folder, WEIGHTS))
    atomic_json({"_class_name": PART_CLASSES[part], **asdict(getattr(model.config, part))}, os.path.join(folder, "config.json"))


def save_cxr_folder(model, folder, dtype=None):
    """Write the whole model as a cxr-ldm folder."""
    folder = os.fspath(folder)
    for part in PART_CLASSES:
        save_part(model, part, os.path.join(folder, part), dtype)
    save_bert_folder(model.text_encoder, model.tokenizer, os.path.join(folder, "text_encoder"), dtype)
    write_scheduler(model.schedule, folder)
    atomic_json({"_class_name": CXR_CLASS, "vae": ["minisd", PART_CLASSES["vae"]], "unet": ["minisd", PART_CLASSES["unet"]],
                 "text_encoder": ["transformers", "BertModel"], "tokenizer": ["transformers", "BertTokenizer"],
                 "scheduler": ["diffusers", "DDIMScheduler"]}, os.path.join(folder, "model_index.json"))
