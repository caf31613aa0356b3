"""What a comparison grid found, in the form of the paper's tables: comparison.md and comparison.csv, one row
per data set and method (SeLoRA once per λ) with FID at the grid's Inception dims and CLIP score (mean ± std
over every image set of the row: its training seeds × sampling seeds), trainable parameters per part, training
time and peak memory; and ranks.png, the methods' rank heat-maps side by side on one colour scale."""
import csv
import io
import os

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .comparison import cells as grid_cells, duration, evaluation_of, flag_argv, read_record, trained
from .files import atomic_text
from .plots import rank_grid, save_figure

PART_TITLES = {"text_encoder": "text encoder", "unet": "U-Net"}   # the paper's order
MISSING = "—"


def groups(cells):
    """The cells of each table row, {(data, method, λ): [cells]}, in the grid's order."""
    out = {}
    for cell in cells:
        out.setdefault((cell.data, cell.method, cell.lam), []).append(cell)
    return out


def adapter_record(summary):
    """The evaluated adapter's record (the best by validation loss), else the last model's."""
    return summary.get("best") or summary.get("last") or {}


def mean_std(values):
    return (float(np.mean(values)), float(np.std(values))) if values else (None, None)


def row(grid, key, cells, weights):
    """One table row: the numbers of the row's cells that finished, and how many did."""
    data, method, lam = key
    summaries = [read_record(c.file("summary.json")) for c in cells if trained(c)]
    summaries = [s for s in summaries if s]
    reports = [r for r in (evaluation_of(grid, c, weights) for c in cells) if r]
    image_sets = [result for r in reports for result in r["per_seed"].values()]
    out = {"data": data, "method": method, "lambda": lam, "label": cells[0].label,
           "cells_trained": len(summaries), "cells_evaluated": len(reports), "cells": len(cells),
           "image_sets": len(image_sets)}
    for d in grid.evaluation["dims"]:
        values = [r["fid"][str(d)] for r in image_sets]
        out[f"fid{d}_mean"], out[f"fid{d}_std"] = mean_std(values) if None not in values else (None, None)
    out["clip_score_mean"], out["clip_score_std"] = mean_std([r["clip_score"]["mean"] for r in image_sets
                                                              if r.get("clip_score")])
    records = [adapter_record(s) for s in summaries]
    for part in PART_TITLES:
        counts = [r["parameters"][part] for r in records if part in r.get("parameters", {})]
        out[f"{part}_trainable"] = round(np.mean([c["trainable"] for c in counts])) if counts else None
        out[f"{part}_percent"] = float(np.mean([c["percent"] for c in counts])) if counts else None
    ranks = [sum(r["ranks"].values()) for r in records if r.get("ranks")]
    out["total_rank"] = float(np.mean(ranks)) if ranks else None
    out["train_time_s"] = float(np.mean([s["wall_time_s"] for s in summaries])) if summaries else None
    memory = [s["peak_memory"] for s in summaries if (s.get("peak_memory") or {}).get("bytes") is not None]
    out["peak_memory_bytes"] = max(m["bytes"] for m in memory) if memory else None
    out["peak_memory_measure"] = memory[0]["measure"] if memory else None
    out["runs"] = " ".join(c.folder for c in cells)
    return out


# ------------------------------------------------------------------------------------- formatting

def number(x, digits=4):
    return MISSING if x is None else f"{x:.{digits}g}"


def with_spread(mean, std):
    return MISSING if mean is None else f"{number(mean)} ± {number(std, 2)}"


def memory(size):
    if size is None:
        return MISSING
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


def markdown_table(grid, rows):
    dims = grid.evaluation["dims"]
    head = ["method", *(f"FID-{d}" for d in dims), "CLIP score", "trainable % text encoder", "trainable % U-Net",
            "total rank", "time", "peak memory"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        label = r["label"] + ("" if r["cells_trained"] == r["cells"] else f" ({r['cells_trained']} of {r['cells']} trained)")
        values = [label, *(with_spread(r[f"fid{d}_mean"], r[f"fid{d}_std"]) for d in dims),
                  with_spread(r["clip_score_mean"], r["clip_score_std"]),
                  *(MISSING if r[f"{p}_percent"] is None else f"{number(r[f'{p}_percent'], 3)} %" for p in PART_TITLES),
                  MISSING if r["total_rank"] is None else f"{r['total_rank']:.0f}",
                  MISSING if r["train_time_s"] is None else duration(r["train_time_s"]),
                  memory(r["peak_memory_bytes"])]
        lines.append("| " + " | ".join(values) + " |")
    return lines


def markdown(grid, rows, weights, failures, figure):
    e, seeds = grid.evaluation, grid.train_seeds
    measures = sorted({r["peak_memory_measure"] for r in rows if r["peak_memory_measure"]})
    lines = [f"# Comparison {grid.name}", "",
             f"Model `{grid.model}`; each cell trained by train.py (`{' '.join(flag_argv(grid.train)) or 'its defaults'}`) "
             f"and evaluated by eval.py on its run's test split (one image per test prompt per sampling seed, "
             f"{e['steps']} DDIM steps, guidance {e['guidance']:g}).", ""]
    for data in grid.data:
        lines += [f"## {data}", "", *markdown_table(grid, [r for r in rows if r["data"] == data]), ""]
    lines += [f"FID and CLIP score: mean ± std (ddof 0) over the image sets of a row: {len(seeds)} training seed(s) "
              f"({' '.join(map(str, seeds))}) × {len(e['seeds'])} sampling seed(s) ({' '.join(map(str, e['seeds']))}). "
              f"Trainable %: of each part's parameters, adapters included, in the evaluated adapter (best validation "
              f"loss), and total rank, its ranks summed; both means over training seeds. Time: training wall time, mean "
              f"over training seeds. Peak memory: the largest over training seeds of "
              f"{' / '.join(measures) or 'the training process'} (cuda_max_allocated on a GPU, max_rss the process's "
              f"peak resident set on the CPU).", ""]
    if figure:
        lines += ["![The methods' rank heat-maps](ranks.png)", ""]
    if weights["missing"]:
        lines += [f"- Not evaluated: {weights['missing']}"]
    for cell, failure in failures.items():
        lines += [f"- {cell.folder}: {failure}"]
    return "\n".join(lines).rstrip() + "\n"


def csv_text(rows):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------- the figure

def first_ranks(cells):
    """(panel label, ranks of the evaluated adapter) of a row's first trained cell; ranks None if none trained."""
    done = [c for c in cells if trained(c)]
    if not done:
        return cells[0].label, None
    return f"{cells[0].label}, seed {done[0].seed}", adapter_record(read_record(done[0].file("summary.json")) or {}).get("ranks")


def rank_figure(grid, table, path):
    """ranks.png: one heat-map per method/λ (columns) for each data set and part (rows), of the evaluated
    adapter of the row's first trained cell; returns False when no cell has trained."""
    panels = []   # (row title, [(label, rank_grid or None)])
    for data in grid.data:
        entries = [first_ranks(cells) for (d, _, _), cells in table.items() if d == data]
        for part, title in PART_TITLES.items():
            grids = [(label, rank_grid(ranks, part) if ranks else None) for label, ranks in entries]
            if any(g is not None for _, g in grids):
                panels.append((f"{data}: {title}", grids))
    if not panels:
        return False
    vmax = max(np.nanmax(g[2]) for _, entries in panels for _, g in entries if g is not None)
    n_columns = max(len(entries) for _, entries in panels)
    width = max(len(g[0]) for _, entries in panels for _, g in entries if g is not None)
    figure = Figure(figsize=(n_columns * (1.5 + 0.14 * width) + 1, 3.2 * len(panels)), layout="constrained")
    axes = figure.subplots(len(panels), n_columns, squeeze=False)
    image = None
    for i, (title, entries) in enumerate(panels):
        for j, ax in enumerate(axes[i]):
            if j >= len(entries) or entries[j][1] is None:
                ax.set_axis_off()
                if j < len(entries):
                    ax.text(0.5, 0.5, f"{entries[j][0]}\nnot trained", ha="center", va="center", fontsize=8)
                continue
            label, (columns, rows, matrix) = entries[j]
            image = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
            ax.set_xticks(range(len(columns)), columns, rotation=90, fontsize=5)
            ax.set_yticks(range(len(rows)), rows if j == 0 else [""] * len(rows), fontsize=5)
            ax.set_title(f"{label}\n{title}, total rank {int(np.nansum(matrix))}", fontsize=7)
    figure.colorbar(image, ax=axes, label="rank", shrink=0.8, ticks=MaxNLocator(integer=True))
    save_figure(figure, path)
    return True


# ------------------------------------------------------------------------------------- the files

def write_report(grid, weights, failures):
    """comparison.md, comparison.csv and ranks.png in the grid's folder; returns the Markdown."""
    table = groups(grid_cells(grid))
    rows = [row(grid, key, members, weights) for key, members in table.items()]
    figure = os.path.join(grid.folder, "ranks.png")
    if not rank_figure(grid, table, figure) and os.path.exists(figure):
        os.remove(figure)   # of cells that are no longer in the grid
    text = markdown(grid, rows, weights, failures, os.path.exists(figure))
    for name, content in (("comparison.md", text), ("comparison.csv", csv_text(rows))):
        atomic_text(content, os.path.join(grid.folder, name))
    return text

