"""The chest-X-ray LDM as one object with StableDiffusion's surface, built with random weights or read from
its folder; a Hugging Face BERT folder (BioBERT) can take the text encoder's place."""
import os
import warnings
from dataclasses import replace

import torch

from ..checkpoint.bert import read_bert_folder
from ..checkpoint.cxr import read_cxr_folder, read_vae, unet_config
from ..checkpoint.files import first_line
from ..checkpoint.reading import check_part, is_cxr_folder
from ..errors import MinisdError
from ..latent_diffusion import LatentDiffusion
from ..wordpiece import WordPieceTokenizer, builtin_vocab
from .config import CONFIGS, CXRConfig
from .text import ReportEncoder
from .unet import CXRUNet
from .vae import CXRVAE


class CXRLatentDiffusion(LatentDiffusion):
    """sd.tokenizer, sd.text_encoder, sd.unet(latents, t, context), sd.vae.encode/decode, sd.schedule: as
    StableDiffusion, with 8 latent channels and 1-channel images inside the VAE (3 at its boundary)."""

    def __init__(self, config: CXRConfig, tokenizer=None, source=""):
        super().__init__()
        self.config, self.source = config, source
        self.unet = CXRUNet(config)
        self.vae = CXRVAE(config.vae)
        self.text_encoder = ReportEncoder(config.text)
        self.tokenizer = tokenizer or WordPieceTokenizer(builtin_vocab(), config.max_length)

    def set_gradient_checkpointing(self, enabled):
        """Recompute the U-Net's blocks, BERT's layers and the VAE's levels in backward instead of storing activations."""
        self.unet.gradient_checkpointing = self.text_encoder.encoder.gradient_checkpointing = enabled
        self.vae.set_gradient_checkpointing(enabled)


def build(config, seed=0, device="cpu", dtype=torch.float32, tokenizer=None, source=""):
    """Random weights, from a fixed seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CXRLatentDiffusion(config, tokenizer, source)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load(source, device="cpu", dtype=torch.float32, text_encoder=None, seed=0):
    """`cxr-ldm` / `cxr-tiny` with random weights (a random BERT with the built-in character vocabulary), or a
    cxr-ldm folder. text_encoder: a BERT folder or hub id (BioBERT) whose weights and vocabulary replace the
    text encoder's — how training from scratch starts: load("cxr-ldm", text_encoder=BIOBERT). `seed`: of the
    random weights."""
    bert = None if text_encoder is None else read_bert_folder(text_encoder)
    if source in CONFIGS:
        config = CONFIGS[source] if bert is None else replace(CONFIGS[source], text=bert.config)
        model = build(config, seed=seed, device=device, dtype=dtype, source=source)
    else:
        model = load_folder(source, device, dtype)
    if bert is not None:
        use_text_encoder(model, bert, dtype)
    return model


def load_folder(folder, device, dtype):
    config, tokenizer, parts, locate = read_cxr_folder(folder)
    try:
        with torch.device("meta"):
            model = CXRLatentDiffusion(config, tokenizer, source=folder)
    except (ValueError, RuntimeError) as e:   # e.g. widths that GroupNorm(32) cannot split
        raise MinisdError(f"{folder}: the architecture it describes cannot be built ({first_line(e)})") from None
    for part, module in model.parts().items():
        module.load_state_dict(check_part(part, module, parts[part], dtype, locate), assign=True)
    return model.to(device).eval().requires_grad_(False)


def use_text_encoder(model, bert, dtype):
    """Put a BERT folder's encoder and tokenizer into `model`. A file without the pooler (saved from a masked-LM
    model) gets a random one, with a warning: the pooler is trained with the U-Net anyway."""
    config_file = os.path.join(os.path.dirname(bert.weights), "config.json")
    if bert.config.hidden_size != model.config.text.hidden_size:
        raise MinisdError(f"{config_file}: hidden_size {bert.config.hidden_size}, but the U-Net takes "
                          f"{model.config.text.hidden_size}-wide text features")
    if bert.config.max_position_embeddings < model.config.max_length:
        raise MinisdError(f"{config_file}: {bert.config.max_position_embeddings} positions, fewer than the "
                          f"model's {model.config.max_length}-token prompts")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = ReportEncoder(bert.config)
    random = {name: value for name, value in encoder.state_dict().items() if name.startswith("pooler.")}
    if not any(name in bert.tensors for name in random):
        warnings.warn(f"{bert.weights}: no pooler weights; the pooler starts random (training updates it)")
        bert.tensors.update(random)
    encoder.load_state_dict(check_part("text_encoder", encoder, bert.tensors, dtype, lambda part, name: (bert.weights, name)))
    model.text_encoder = encoder.to(device=model.device, dtype=dtype).eval().requires_grad_(False)
    model.tokenizer = bert.tokenizer(model.config.max_length, os.path.join(os.path.dirname(bert.weights), "vocab.txt"))
    model.config = replace(model.config, text=bert.config)


def use_vae(model, folder):
    """Put a VAE folder's trained VAE (its weights and scaling factor) into `model`, whose VAE architecture it
    must have: the U-Net's latents are its latents."""
    config, tensors, locate = read_vae(folder)
    check_vae(config, model.config.vae, folder)
    with torch.device("meta"):
        vae = CXRVAE(config)
    vae.load_state_dict(check_part("vae", vae, tensors, model.dtype, locate), assign=True)
    model.vae = vae.to(model.device).eval().requires_grad_(False)
    model.config = replace(model.config, vae=config)


def check_vae(config, expected, folder):
    """An error naming the VAE folder's config.json unless its architecture is `expected` (the scaling factor,
    measured by training, may differ)."""
    if replace(config, scaling_factor=1.0) != replace(expected, scaling_factor=1.0):
        theirs, ours = (f"channels {list(c.channels)}, attention levels {list(c.attention_levels)}, {c.z_channels} latent "
                        f"channels" for c in (config, expected))
        raise MinisdError(f"{os.path.join(folder, 'config.json')}: a VAE of {theirs}, not this model's ({ours})")


def native_resolution(source):
    """The image size a chest-X-ray LDM is trained and sampled at (its U-Net's sample_size × 8), read from its
    config without its weights; None for any other model."""
    source = os.fspath(source)
    if source in CONFIGS:
        return CONFIGS[source].resolution
    if os.path.isdir(source) and is_cxr_folder(source):
        return unet_config(os.path.join(source, "unet")).sample_size * 8
    return None
