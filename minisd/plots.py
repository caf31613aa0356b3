"""Figures of a run, drawn with matplotlib (no display needed): rank heat-maps, one per adapted model
(rows = kind of layer: q, k, v, out, …; columns = blocks, the paper's Fig. 3/4), and the loss curve."""
import re

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .checkpoint.names import PREFIXES
from .files import atomic_write


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


def save_figure(figure, path):
    FigureCanvasAgg(figure)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100), suffix=".png")


def rank_grid(ranks, part):
    """ranks: {full layer name: rank} -> (columns: blocks, rows: layers, matrix [rows, columns] with NaN where a
    block has no such layer) of `part`'s layers, or None when it has none."""
    cells = [(*split_name(part, n), r) for n, r in ranks.items() if n.startswith(PREFIXES[part])]
    if not cells:
        return None
    columns = list(dict.fromkeys(c for c, _, _ in cells))
    rows = list(dict.fromkeys(r for _, r, _ in cells))
    grid = np.full((len(rows), len(columns)), np.nan)
    for c, r, value in cells:
        grid[rows.index(r), columns.index(c)] = value
    return columns, rows, grid


def rank_heatmap(ranks, part, path, title=""):
    """ranks: {full layer name: rank} -> PNG of `part`'s layers; returns False when it has none."""
    layout = rank_grid(ranks, part)
    if layout is None:
        return False
    columns, rows, grid = layout
    vmax = int(np.nanmax(grid))
    figure = Figure(figsize=(max(4.0, 0.3 * len(columns) + 3), max(2.5, 0.25 * len(rows) + 1.5)), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=0, vmax=max(vmax, 1), aspect="auto")
    axes.set_xticks(range(len(columns)), columns, rotation=90, fontsize=7)
    axes.set_yticks(range(len(rows)), rows, fontsize=7)
    axes.set_xlabel("block" if part == "unet" else "layer")
    axes.set_ylabel("adapted linear layer")
    axes.set_title(f"{title} ranks (total {int(np.nansum(grid))}, max {vmax})")
    figure.colorbar(image, ax=axes, label="rank")
    save_figure(figure, path)
    return True


def loss_curve(records, path, ylabel="ε-prediction MSE", smooth=20):
    """Training loss per step (and its moving average over `smooth` steps) and validation loss, from the
    records of a run's log.jsonl, as a PNG; returns False when there is no step yet."""
    steps = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float))]
    if not steps:
        return False
    validations = [(r["step"], r["val_loss"]) for r in records
                   if r.get("event") == "validation" and isinstance(r.get("val_loss"), (int, float))]
    figure = Figure(figsize=(7, 4), layout="constrained")
    axes = figure.add_subplot()
    x, y = np.array(steps, dtype=float).T
    axes.plot(x, y, color="tab:blue", alpha=0.3, linewidth=0.8, label="training loss")
    if len(y) >= smooth:
        average = np.convolve(y, np.ones(smooth) / smooth, mode="valid")
        axes.plot(x[smooth - 1:], average, color="tab:blue", label=f"training loss, mean of {smooth} steps")
    if validations:
        vx, vy = np.array(validations, dtype=float).T
        axes.plot(vx, vy, "o-", color="tab:orange", label="validation loss")
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.set_title("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    save_figure(figure, path)
    return True
