"""The chest-X-ray LDM's denoiser, ≈39.7 M parameters: latents 32×32×8, widths 128 → 256 → 512 and a middle
block of 512, with self- and cross-attention at every resolution (32², 16², 8²).

A resolution holds one residual block (SD's, with the time embedding) and one attention block: self-attention
over the pixels, then cross-attention to the text, each pre-LayerNorm and residual, 8 heads, no feed-forward.
The down path keeps each resolution's output for the up path, which concatenates it before its block. The
768-wide text features are projected to the 512-wide context inside the U-Net (`context_proj`, as diffusers'
`encoder_hid_proj`), so the text encoder's files stay Hugging Face BERT files.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import recompute
from ..unet import CrossAttention, Downsample, ResBlock, Upsample, timestep_embedding


class AttentionBlock(nn.Module):
    def __init__(self, channels, context_dim, heads):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(channels), CrossAttention(channels, channels, heads)
        self.norm2, self.attn2 = nn.LayerNorm(channels), CrossAttention(channels, context_dim, heads)

    def forward(self, x, context):
        b, c, h, w = x.shape
        y = x.flatten(2).transpose(1, 2)
        y = y + self.attn1(self.norm1(y))
        y = y + self.attn2(self.norm2(y), context)
        return y.transpose(1, 2).reshape(b, c, h, w)


class Level(nn.Module):
    """One resolution: residual block, attention block, and the resampling to the next resolution, if any."""

    def __init__(self, cin, cout, emb_dim, context_dim, heads, resample=None):
        super().__init__()
        self.block = ResBlock(cin, cout, emb_dim)
        self.attn = AttentionBlock(cout, context_dim, heads)
        if resample == "down":
            self.downsample = Downsample(cout)
        elif resample == "up":
            self.upsample = Upsample(cout)

    def forward(self, x, emb, context):
        return self.attn(self.block(x, emb), context)


class Mid(nn.Module):
    def __init__(self, channels, emb_dim, context_dim, heads):
        super().__init__()
        self.block_1 = ResBlock(channels, channels, emb_dim)
        self.attn = AttentionBlock(channels, context_dim, heads)
        self.block_2 = ResBlock(channels, channels, emb_dim)

    def forward(self, x, emb, context):
        return self.block_2(self.attn(self.block_1(x, emb), context), emb)


class CXRUNet(nn.Module):
    """eps = unet(latents [B, 8, h, w], t int [B], text features [B, L, 768])."""

    def __init__(self, config):
        super().__init__()
        u = config.unet
        mc, emb_dim, heads, ctx = u.model_channels, 4 * u.model_channels, u.num_heads, u.context_dim
        widths = [mc * m for m in u.channel_mult]
        last = len(widths) - 1
        self.model_channels = mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.context_proj = nn.Linear(config.text.hidden_size, ctx)
        self.conv_in = nn.Conv2d(config.vae.z_channels, mc, 3, padding=1)
        self.down = nn.ModuleList(Level(widths[i - 1] if i else mc, w, emb_dim, ctx, heads, "down" if i < last else None)
                                  for i, w in enumerate(widths))
        self.mid = Mid(widths[-1], emb_dim, ctx, heads)
        # `up` is indexed by resolution level (0 = the latents') and run from the last level back; each block
        # takes the level below's output (or the middle's) and this level's down-path output.
        self.up = nn.ModuleList(Level(widths[min(i + 1, last)] + w, w, emb_dim, ctx, heads, "up" if i > 0 else None)
                                for i, w in enumerate(widths))
        self.norm_out = nn.GroupNorm(32, mc)
        self.conv_out = nn.Conv2d(mc, config.vae.z_channels, 3, padding=1)
        self.gradient_checkpointing = False   # recompute each block in backward instead of storing activations

    def run(self, block, *args):
        return recompute.run(self, block, *args)

    def forward(self, x, t, context):
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(x.dtype))
        context = self.context_proj(context.to(x.dtype))
        x = self.conv_in(x)
        skips = []
        for level in self.down:
            x = self.run(level, x, emb, context)
            skips.append(x)
            x = level.downsample(x) if hasattr(level, "downsample") else x
        x = self.run(self.mid, x, emb, context)
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            x = self.run(level, torch.cat([x, skips[i]], dim=1), emb, context)
            x = level.upsample(x, skips[i - 1].shape[-2:]) if i > 0 else x
        return self.conv_out(F.silu(self.norm_out(x)))
