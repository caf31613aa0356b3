"""Saving images and grids as PNG."""
import math
import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .files import atomic_write

CAPTION_LINES = 3


def to_uint8(image):
    """[3, H, W] float in [0, 1] -> H×W×3 uint8 array (round to nearest, as torchvision's save_image)."""
    return (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def save_png(image, path):
    picture = Image.fromarray(to_uint8(image))
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"), suffix=".png")


def grid(images, columns=None, pad=2, below=0):
    """[N, 3, H, W] in [0, 1] -> one [3, H', W'] image, `columns` per row (default about square), with
    `below` blank pixels under each row (for captions)."""
    n, c, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    out = torch.ones(c, rows * (h + below + pad) + pad, columns * (w + pad) + pad)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        top, left = pad + r * (h + below + pad), pad + col * (w + pad)
        out[:, top:top + h, left:left + w] = image
    return out


def captioned_grid(images, captions, columns=None, pad=2):
    """grid() with each image's caption (its prompt) in up to CAPTION_LINES wrapped lines below it."""
    n, _, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    size = max(8, min(14, w // 14))
    font = ImageFont.load_default(size)
    line = size + 2
    out = Image.fromarray(to_uint8(grid(images, columns, pad, below=CAPTION_LINES * line + pad)))
    draw = ImageDraw.Draw(out)
    width = max(8, int(w / (0.6 * size)))   # characters per line of the default font
    for i, caption in enumerate(captions):
        r, col = divmod(i, columns)
        lines = textwrap.wrap(" ".join(caption.split()), width, max_lines=CAPTION_LINES, placeholder=" …") or [""]
        top = pad + r * (h + CAPTION_LINES * line + 2 * pad) + h + 1
        for k, text in enumerate(lines):
            draw.text((pad + col * (w + pad), top + k * line), text, fill="black", font=font)
    return torch.from_numpy(np.array(out)).permute(2, 0, 1).float() / 255
