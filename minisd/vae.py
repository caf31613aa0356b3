"""SD-1.5 AutoencoderKL with the CompVis module names (`encoder.down.i.block.j`, 1×1-conv attention)."""
import torch.nn as nn
import torch.nn.functional as F


def norm(channels):
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels; q/k/v/proj_out are 1×1 convs as in the original file."""

    def __init__(self, channels):
        super().__init__()
        self.norm = norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (p(y).flatten(2).transpose(1, 2)[:, None] for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(channels, channels), AttnBlock(channels), ResnetBlock(channels, channels)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution of the encoder (`block` + `downsample`) or decoder (`block` + `upsample`)."""

    def __init__(self, cin, cout, n_blocks, resample=None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout) for i in range(n_blocks))
        self.resample = resample   # "downsample", "upsample" or None: the checkpoint names the layer so
        if resample == "downsample":
            self.downsample = Downsample(cout)
        elif resample == "upsample":
            self.upsample = Upsample(cout)

    def forward(self, x):
        for block in self.block:
            x = block(x)
        return getattr(self, self.resample)(x) if self.resample else x


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        chans = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        last = len(chans) - 1
        self.down = nn.ModuleList(
            Level(cfg.ch if i == 0 else chans[i - 1], c, cfg.num_res_blocks, "downsample" if i != last else None)
            for i, c in enumerate(chans))
        self.mid = Mid(chans[-1])
        self.norm_out = norm(chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        chans = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, chans[-1], 3, padding=1)
        self.mid = Mid(chans[-1])
        # `up` is indexed by resolution level (0 = full size) and run from the last level back.
        self.up = nn.ModuleList(
            Level(chans[min(i + 1, len(chans) - 1)], c, cfg.num_res_blocks + 1, "upsample" if i != 0 else None)
            for i, c in enumerate(chans))
        self.norm_out = norm(chans[0])
        self.conv_out = nn.Conv2d(chans[0], 3, 3, padding=1)

    def forward(self, z):
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class VAE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.scaling_factor = cfg.scaling_factor
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def encode(self, x):
        """x in [-1, 1] -> (mean, logvar) of the latent distribution, logvar clamped as in the original."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        """z = latents / scaling_factor -> image in about [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))
