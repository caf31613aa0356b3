"""Rank heat-maps: one PNG per adapted model, rows = kind of layer (q, k, v, out, …), columns = blocks."""
import re

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .checkpoint.names import PREFIXES

CELL, FONT = 26, ImageFont.load_default()


def split_name(part, name):
    """Full layer name -> (column: block, row: layer within the block)."""
    path = name[len(PREFIXES[part]):]
    if part == "text_encoder":
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)", path)
        return (m.group(1), m.group(2)) if m else ("", path)
    m = re.match(r"(input_blocks\.\d+|middle_block|output_blocks\.\d+)\.(\d+)\.(.*)", path)
    if m:
        block, slot, row = m.groups()
        # The middle block holds two res blocks around its transformer: one column each.
        column = f"mid{slot}" if block == "middle_block" else block.replace("input_blocks.", "in").replace("output_blocks.", "out")
        return column, row.replace("transformer_blocks.0.", "")
    return path.split(".")[0], path


def color(value, vmax):
    """A dark-blue to yellow ramp (viridis-like) for value in 0..vmax."""
    stops = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=float)
    x = 0.0 if vmax <= 0 else min(max(value / vmax, 0.0), 1.0) * (len(stops) - 1)
    i = min(int(x), len(stops) - 2)
    return tuple(int(c) for c in stops[i] + (stops[i + 1] - stops[i]) * (x - i))


def rank_heatmap(ranks, part, path, title=""):
    """ranks: {full layer name: rank} -> PNG of `part`'s layers; returns False when it has none."""
    cells = [(*split_name(part, n), r) for n, r in ranks.items() if n.startswith(PREFIXES[part])]
    if not cells:
        return False
    columns = list(dict.fromkeys(c for c, _, _ in cells))
    rows = list(dict.fromkeys(r for _, r, _ in cells))
    vmax = max(r for _, _, r in cells)
    left = max(FONT.getlength(r) for r in rows) + 8
    top = max(FONT.getlength(c) for c in columns) + 24
    image = Image.new("RGB", (int(left + CELL * len(columns) + 8), int(top + CELL * len(rows) + 8)), "white")
    draw = ImageDraw.Draw(image)
    draw.text((4, 4), f"{title} ranks (max {vmax})", fill="black", font=FONT)
    for j, c in enumerate(columns):
        label = Image.new("RGBA", (int(FONT.getlength(c)) + 2, 12), (255, 255, 255, 0))
        ImageDraw.Draw(label).text((0, 0), c, fill="black", font=FONT)
        label = label.rotate(90, expand=True)
        image.paste(label, (int(left + j * CELL + CELL // 2 - 6), int(top - label.height - 2)), label)
    for i, r in enumerate(rows):
        draw.text((4, top + i * CELL + CELL // 2 - 6), r, fill="black", font=FONT)
    for c, r, value in cells:
        x, y = left + columns.index(c) * CELL, top + rows.index(r) * CELL
        fill = color(value, vmax)
        draw.rectangle([x, y, x + CELL - 2, y + CELL - 2], fill=fill)
        text = str(value)
        draw.text((x + (CELL - 2 - FONT.getlength(text)) / 2, y + CELL // 2 - 7), text,
                  fill="black" if sum(fill) > 380 else "white", font=FONT)
    image.save(path)
    return True
