"""The training layout computes the same numbers: half-precision frozen weights under autocast, channels_last;
and on a GPU the attention runs on SDPA's fused kernels."""
import pytest
import torch

from minisd import adapters
from minisd.layout import half_matmul_weights
from helpers import random_model, rel_err


def test_half_frozen_weights_give_autocasts_numbers():
    """Autocast casts an fp32 weight to bf16 at every use: holding it in bf16 is the same rounding, done once.
    Norms, embeddings and the adapters keep their fp32."""
    sd = random_model("tiny")
    adapters.inject(sd, "selora")
    for layer in adapters.adapted_layers(sd).values():
        torch.nn.init.normal_(layer.lora_B, std=0.1)   # adapters that change the output
    g = torch.Generator().manual_seed(0)
    latents, t, ids = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 700]), sd.tokenizer(["a film", "b"])

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            return sd.unet(latents, t, sd.text_encoder(ids)).float()

    before = run()
    for part in (sd.unet, sd.text_encoder):
        half_matmul_weights(part, torch.bfloat16)
    assert sd.unet.input_blocks[0][0].weight.dtype == torch.bfloat16
    assert sd.unet.out[0].weight.dtype == torch.float32   # a GroupNorm
    assert all(p.dtype == torch.float32 for p in sd.parameters() if p.requires_grad)
    assert torch.equal(run(), before)


def test_channels_last_unet_gives_the_same_eps():
    sd = random_model("tiny")
    g = torch.Generator().manual_seed(1)
    latents, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 64, generator=g)
    with torch.no_grad():
        before = sd.unet(latents, torch.tensor([3, 700]), ctx)
        sd.unet.to(memory_format=torch.channels_last)
        after = sd.unet(latents, torch.tensor([3, 700]), ctx)
    assert rel_err(after, before) < 1e-5


@pytest.mark.cuda
def test_attention_runs_on_flash_attention():
    """With only SDPA's flash kernel allowed (it takes bf16/fp16 only; SDPA raises when no allowed kernel
    takes its inputs), training's forward still runs: SeLoRA layers under bf16 autocast, frozen weights in
    bf16, channels_last — and the attention blocks at SD-1.5's head widths 40, 80, 160 (U-Net) and 64 (CLIP)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from minisd.layout import prepare_for_training
    from minisd.text_encoder import CLIPAttention
    from minisd.unet import CrossAttention
    sd = random_model("tiny").cuda()
    adapters.inject(sd, "selora")
    prepare_for_training(sd, torch.bfloat16, "cuda")
    ids = sd.tokenizer(["frontal chest x-ray", "left effusion"]).cuda()
    blocks = [(CrossAttention(dim, 768, 8), 768) for dim in (320, 640, 1280)] + [(CLIPAttention(768, 12), None)]
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.autocast("cuda", dtype=torch.bfloat16):
        eps = sd.unet(torch.randn(2, 4, 28, 28, device="cuda"), torch.tensor([1, 500], device="cuda"), sd.text_encoder(ids))
        assert torch.isfinite(eps).all()
        for block, context_dim in blocks:
            block.cuda()
            x = torch.randn(2, 77, block.to_q.in_features if context_dim else 768, device="cuda")
            out = block(x, torch.randn(2, 77, context_dim, device="cuda")) if context_dim else block(x)
            assert torch.isfinite(out).all()
