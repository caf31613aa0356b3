"""Hyper-parameters of the three networks and the noise schedule; `sd15` is SD-1.5 exactly, `tiny` the same
structure made small."""
from dataclasses import dataclass, field, asdict


@dataclass(frozen=True)
class UNetConfig:
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple = (0, 1, 2)   # levels (0 = full latent size) that carry a spatial transformer
    num_heads: int = 8
    context_dim: int = 768
    in_channels: int = 4
    out_channels: int = 4


@dataclass(frozen=True)
class VAEConfig:
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    scaling_factor: float = 0.18215


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072


@dataclass(frozen=True)
class ScheduleConfig:
    """The DDPM noise schedule a model was trained with, over 1000 steps (diffusers' names and meanings)."""
    beta_schedule: str = "scaled_linear"   # β_t = linspace(√beta_start, √beta_end)²; "linear": linspace(beta_start, beta_end)
    beta_start: float = 0.00085
    beta_end: float = 0.012


@dataclass(frozen=True)
class ModelConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def to_dict(self):
        return asdict(self)

    @staticmethod
    def from_dict(d):
        tup = lambda c: {k: tuple(v) if isinstance(v, list) else v for k, v in c.items()}
        return ModelConfig(UNetConfig(**tup(d["unet"])), VAEConfig(**tup(d["vae"])), TextConfig(**tup(d["text"])),
                           ScheduleConfig(**d.get("schedule", {})))


CONFIGS = {
    "sd15": ModelConfig(),
    "tiny": ModelConfig(
        # 64 channels keep two per GroupNorm group at the first level: with one, a res block's
        # per-channel time embedding would be normalised away and its gradient would be rounding noise.
        unet=UNetConfig(model_channels=64, channel_mult=(1, 2, 2, 2), context_dim=64),
        vae=VAEConfig(ch=32),
        text=TextConfig(width=64, layers=2, heads=1, mlp_width=256),   # CLIP heads are 64 wide
    ),
}
