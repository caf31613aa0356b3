"""The chest-X-ray LDM's autoencoder: 256×256×1 images <-> 32×32×8 latents, ≈3.2 M parameters.

Encoder: conv 1→32, then one residual block per resolution (32→64 at 256², 64→128 at 128², 128→256 at 64²,
256→256 at 32²) with self-attention after the blocks at 64² and 32², 2×2 average pooling between resolutions,
GroupNorm + SiLU + conv 256→16 (mean ‖ log-variance). The decoder is the encoder run backwards (nearest
upsampling). A residual block is GroupNorm, SiLU and one 3×3 conv beside a (1×1-projected) shortcut: with the
two convs of SD's blocks these widths would need 5.3 M parameters or more.
"""
import torch.nn as nn
import torch.nn.functional as F

from .. import recompute
from ..vae import AttnBlock, norm


class ResBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm, self.conv = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        return self.nin_shortcut(x) + self.conv(F.silu(self.norm(x)))


class Level(nn.Module):
    """One resolution: a residual block cin→cout and, at attention levels, self-attention at `attention_width`
    (after the block in the encoder, before it in the decoder)."""

    def __init__(self, cin, cout, attention_width=None):
        super().__init__()
        self.block = ResBlock(cin, cout)
        self.attn = AttnBlock(attention_width) if attention_width else None

    def encode(self, x):
        x = self.block(x)
        return self.attn(x) if self.attn else x

    def decode(self, x):
        return self.block(self.attn(x) if self.attn else x)


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        c, attending = cfg.channels, cfg.attention_levels
        self.conv_in = nn.Conv2d(1, c[0], 3, padding=1)
        self.down = nn.ModuleList(Level(c[i], c[i + 1], c[i + 1] if i in attending else None) for i in range(len(c) - 1))
        self.norm_out = norm(c[-1])
        self.conv_out = nn.Conv2d(c[-1], 2 * cfg.z_channels, 3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, x):
        x = self.conv_in(x)
        for i, level in enumerate(self.down):
            x = recompute.run(self, level.encode, x)
            x = F.avg_pool2d(x, 2) if i < len(self.down) - 1 else x
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        c, attending = cfg.channels, cfg.attention_levels
        self.conv_in = nn.Conv2d(cfg.z_channels, c[-1], 3, padding=1)
        # `up` is indexed by resolution level (0 = the image's) and run from the last level back.
        self.up = nn.ModuleList(Level(c[i + 1], c[i], c[i + 1] if i in attending else None) for i in range(len(c) - 1))
        self.norm_out = norm(c[0])
        self.conv_out = nn.Conv2d(c[0], 1, 3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, z):
        x = self.conv_in(z)
        for i, level in reversed(list(enumerate(self.up))):
            x = recompute.run(self, level.decode, x)
            x = F.interpolate(x, scale_factor=2.0, mode="nearest") if i > 0 else x
        return self.conv_out(F.silu(self.norm_out(x)))


class CXRVAE(nn.Module):
    """One channel inside, minisd's three at the boundary: encode averages the channels (grayscale data
    holds three equal ones, so nothing is lost) and decode repeats its one channel."""

    def __init__(self, cfg):
        super().__init__()
        self.scaling_factor = cfg.scaling_factor
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)

    def set_gradient_checkpointing(self, enabled):
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = enabled

    def encode(self, x):
        """x in [-1, 1], [B, 1 or 3, H, W] -> (mean, logvar) [B, 8, H/8, W/8], logvar clamped as SD's VAE does."""
        mean, logvar = self.encoder(x.mean(dim=1, keepdim=True)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        """z = latents / scaling_factor -> image [B, 3, H, W] in about [-1, 1]."""
        return self.decoder(z).repeat(1, 3, 1, 1)
