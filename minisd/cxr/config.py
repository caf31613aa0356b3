"""Hyper-parameters of the chest-X-ray LDM; `cxr-ldm` is the full model, `cxr-tiny` the same structure made
small for tests and CPU demos."""
from dataclasses import dataclass, field

from ..bert import BertConfig
from ..config import ScheduleConfig
from ..wordpiece import builtin_vocab


@dataclass(frozen=True)
class CXRVAEConfig:
    channels: tuple = (32, 64, 128, 256, 256)   # conv_in's width, then each resolution's residual block
    attention_levels: tuple = (2, 3)            # resolutions (0 = the image's) with self-attention: 64², 32²
    z_channels: int = 8
    scaling_factor: float = 1.0                 # 1 / std of the trained VAE's latents; 1 until it is trained


@dataclass(frozen=True)
class CXRUNetConfig:
    model_channels: int = 128
    channel_mult: tuple = (1, 2, 4)   # 32², 16², 8² latents; a middle block of the last width follows
    num_heads: int = 8
    context_dim: int = 512            # cross-attention width; the text features are projected to it
    sample_size: int = 32             # latent size it is trained and sampled at (diffusers' meaning): 256 px


@dataclass(frozen=True)
class CXRConfig:
    unet: CXRUNetConfig = field(default_factory=CXRUNetConfig)
    vae: CXRVAEConfig = field(default_factory=CXRVAEConfig)
    text: BertConfig = field(default_factory=BertConfig)
    schedule: ScheduleConfig = ScheduleConfig("linear", 1e-4, 0.02)
    max_length: int = 128   # tokens of a prompt, [CLS] and [SEP] included

    @property
    def resolution(self):
        """Image size in pixels the model is trained and sampled at (the VAE halves it three times)."""
        return self.unet.sample_size * 8


BUILTIN_VOCAB_SIZE = len(builtin_vocab())
CONFIGS = {
    # Random weights need a vocabulary without BioBERT's files: the built-in character-level one.
    "cxr-ldm": CXRConfig(text=BertConfig(vocab_size=BUILTIN_VOCAB_SIZE)),
    "cxr-tiny": CXRConfig(
        unet=CXRUNetConfig(model_channels=64, channel_mult=(1, 2), num_heads=2, context_dim=64, sample_size=8),
        vae=CXRVAEConfig(channels=(32, 32, 32, 32, 32)),
        text=BertConfig(vocab_size=BUILTIN_VOCAB_SIZE, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=256),
        max_length=256),   # one token per character: the phantom's reports fit
}
