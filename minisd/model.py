"""The three networks and the tokenizer together, built from a config or loaded from a checkpoint."""
import os

import torch
import torch.nn as nn

from .checkpoint.configs import config_from_diffusers, infer_config
from .checkpoint.files import first_line, read_tensors
from .checkpoint.reading import check_and_convert, read_checkpoint, read_diffusers_folder, split_single_file
from .config import CONFIGS, ModelConfig
from .errors import MinisdError
from .text_encoder import TextEncoder
from .tokenizer import Tokenizer
from .unet import UNet
from .vae import VAE

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


class StableDiffusion(nn.Module):
    def __init__(self, config: ModelConfig, source=""):
        super().__init__()
        self.config, self.source = config, source
        self.unet = UNet(config.unet)
        self.vae = VAE(config.vae)
        self.text_encoder = TextEncoder(config.text)
        self.tokenizer = Tokenizer(length=config.text.max_positions)

    def parts(self):
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}

    @property
    def device(self):
        return self.unet.out[2].weight.device

    @property
    def dtype(self):
        return self.unet.out[2].weight.dtype


def build(config="tiny", seed=0, device="cpu", dtype=torch.float32):
    """A randomly initialised model (`tiny` for tests and CPU demos, `sd15` for full-size benchmarks)."""
    name = config if isinstance(config, str) else ""
    if isinstance(config, str):
        if config not in CONFIGS:
            raise MinisdError(f"unknown config {config!r} (known: {', '.join(CONFIGS)})")
        config = CONFIGS[config]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = StableDiffusion(config, source=name)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load(source=DEFAULT_MODEL, device="cpu", dtype=torch.float32):
    """SD-1.5 from a single .safetensors/.ckpt file, a diffusers folder, a hub id, or 'tiny'."""
    source = os.fspath(source)
    if source == "tiny":
        return build("tiny", device=device, dtype=dtype)
    kind, path = read_checkpoint(source)
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
