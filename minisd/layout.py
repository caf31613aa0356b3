"""How the frozen networks are held for fast mixed-precision training on a GPU.

- Under bf16/fp16 autocast every linear and convolution casts its fp32 weight and bias to the half dtype at
  each use. Holding the frozen weights of those layers in that dtype gives the same products (the cast is
  the same rounding, done once), with half the weight memory and none of the cast kernels. Norms and
  embeddings, which autocast runs in fp32, and every adapter parameter stay as they are.
- channels_last: cuDNN's convolutions run on NHWC tensors natively, and the U-Net's spatial transformers
  then flatten pixels to tokens without a copy.
"""
import torch
from torch import nn

from .adapters import AdapterLayer


def half_matmul_weights(module, dtype):
    """Cast the frozen weight and bias of every nn.Linear / nn.Conv2d / adapter base in `module` to `dtype`."""
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d, AdapterLayer)):
            for name in ("weight", "bias"):
                param = getattr(layer, name, None)
                if param is not None and not param.requires_grad and param.is_floating_point():
                    param.data = param.data.to(dtype)


def prepare_for_training(sd, autocast_dtype, device):
    """The layout above, on a CUDA device (the CPU keeps the model as loaded)."""
    if torch.device(device).type != "cuda":
        return
    if autocast_dtype is not None:
        for part in (sd.unet, sd.vae, sd.text_encoder):
            half_matmul_weights(part, autocast_dtype)
    prepare_for_sampling(sd, device)


def prepare_for_sampling(sd, device):
    """channels_last for the U-Net and the VAE on a CUDA device."""
    if torch.device(device).type == "cuda":
        for part in (sd.unet, sd.vae):
            part.to(memory_format=torch.channels_last)
