"""The three networks and the tokenizer together, built from a config or loaded from a checkpoint: SD-1.5
here, the chest-X-ray LDM in minisd.cxr (the same surface)."""
import os

import torch

from .checkpoint.configs import config_from_diffusers, infer_config
from .checkpoint.files import first_line, read_tensors
from .checkpoint.reading import check_and_convert, read_checkpoint, read_diffusers_folder, split_single_file
from .config import CONFIGS, ModelConfig
from .cxr import model as cxr
from .cxr.config import CONFIGS as CXR_CONFIGS, CXRConfig
from .errors import MinisdError
from .latent_diffusion import LatentDiffusion
from .text_encoder import TextEncoder
from .tokenizer import Tokenizer
from .unet import UNet
from .vae import VAE

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


class StableDiffusion(LatentDiffusion):
    def __init__(self, config: ModelConfig, source=""):
        super().__init__()
        self.config, self.source = config, source
        self.unet = UNet(config.unet)
        self.vae = VAE(config.vae)
        self.text_encoder = TextEncoder(config.text)
        self.tokenizer = Tokenizer(length=config.text.max_positions)

    def set_gradient_checkpointing(self, enabled):
        """Recompute the U-Net's blocks and the text encoder's layers in backward instead of storing activations."""
        self.unet.gradient_checkpointing = self.text_encoder.text_model.encoder.gradient_checkpointing = enabled


def build(config="tiny", seed=0, device="cpu", dtype=torch.float32):
    """A randomly initialised model (`tiny` for tests and CPU demos, `sd15` for full-size benchmarks;
    `cxr-ldm` and `cxr-tiny` for the chest-X-ray LDM)."""
    name = config if isinstance(config, str) else ""
    if isinstance(config, CXRConfig) or name in CXR_CONFIGS:
        return cxr.build(CXR_CONFIGS.get(name, config), seed=seed, device=device, dtype=dtype, source=name)
    if isinstance(config, str):
        if config not in CONFIGS:
            raise MinisdError(f"unknown config {config!r} (known: {', '.join([*CONFIGS, *CXR_CONFIGS])})")
        config = CONFIGS[config]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = StableDiffusion(config, source=name)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load(source=DEFAULT_MODEL, device="cpu", dtype=torch.float32, text_encoder=None):
    """SD-1.5 from a single .safetensors/.ckpt file, a diffusers folder, a hub id, or 'tiny'; the chest-X-ray LDM
    from its folder, or 'cxr-ldm' / 'cxr-tiny' (random weights). text_encoder (chest-X-ray LDM only): a BERT
    folder or hub id whose weights and vocabulary replace its text encoder's."""
    source = os.fspath(source)
    if source in CXR_CONFIGS:
        return cxr.load(source, device, dtype, text_encoder)
    kind, path = (None, source) if source == "tiny" else read_checkpoint(source)
    if kind == "cxr-ldm":
        return cxr.load(path, device, dtype, text_encoder)
    if text_encoder is not None:
        raise MinisdError(f"a text encoder of its own is for chest-X-ray LDMs; {source} is an SD-1.5 model (CLIP text encoder)")
    if source == "tiny":
        return build("tiny", device=device, dtype=dtype)
    locate = None
    if kind == "single":
        parts = split_single_file(read_tensors(path), path)
        config = infer_config(parts, path)
    else:
        config = config_from_diffusers(path)
    try:
        with torch.device("meta"):
            model = StableDiffusion(config, source=source)
    except (ValueError, RuntimeError) as e:   # e.g. widths that GroupNorm(32) cannot split
        raise MinisdError(f"{path}: the architecture it describes cannot be built ({first_line(e)})") from None
    if kind == "diffusers":
        parts, locate = read_diffusers_folder(path, model)
    parts = check_and_convert(parts, model, path, dtype, locate)
    for part, module in model.parts().items():
        module.load_state_dict(parts[part], assign=True)
    return model.to(device).eval().requires_grad_(False)
