"""Saving images and grids as PNG."""
import math
import os

import numpy as np
import torch
from PIL import Image


def to_uint8(image):
    """[3, H, W] float in [0, 1] -> H×W×3 uint8 array (round to nearest, as torchvision's save_image)."""
    return (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def save_png(image, path):
    tmp = f"{path}.tmp{os.getpid()}.png"
    Image.fromarray(to_uint8(image)).save(tmp)
    os.replace(tmp, path)


def grid(images, columns=None, pad=2):
    """[N, 3, H, W] in [0, 1] -> one [3, H', W'] image, `columns` per row (default about square)."""
    n, c, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    out = torch.ones(c, rows * (h + pad) + pad, columns * (w + pad) + pad)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        out[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = image
    return out
