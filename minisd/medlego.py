"""Med-LEGO: N adapters merged into one LoRA by a truncated SVD of their weighted sum, layer by layer.

ΔW = Σ wᵢ·sᵢ·Bᵢ Aᵢ (a layer missing from an adapter counts as zero there). With the factors stacked,
B = [w₁s₁B₁ … w_N s_N B_N] [out, Σr] and A = [A₁; …; A_N] [Σr, in], ΔW = B A. QR of B and Aᵀ leaves a small
core: ΔW = Q_B (R_B R_Aᵀ) Q_Aᵀ, and the SVD of the core, R_B R_Aᵀ = U_c Σ V_cᵀ, gives ΔW's:
U = Q_B U_c, V = Q_A V_c. The dense ΔW of a layer is never formed. Keep the smallest k whose σ² reach the
energy fraction v of Σσ² (or a fixed k) and write B = U_k √Σ_k, A = √Σ_k V_kᵀ with scale 1.
"""
import math
import warnings

import torch

from .adapters.io import write_adapter
from .errors import MinisdError
from .export import read_pairs


def low_rank_svd(B, A):
    """(U [out, m], σ [m], V [in, m]) with B A = U diag(σ) Vᵀ, from the factors B [out, R], A [R, in]."""
    Q_B, R_B = torch.linalg.qr(B)
    Q_A, R_A = torch.linalg.qr(A.T)
    U_c, sigma, V_cT = torch.linalg.svd(R_B @ R_A.T, full_matrices=False)
    return Q_B @ U_c, sigma, Q_A @ V_cT.T


def kept_rank(sigma, shape, energy=None, rank=None):
    """How many singular values to keep: all above round-off (numpy's matrix_rank tolerance), then the fixed
    `rank` or the fewest reaching the `energy` fraction of Σσ²."""
    if sigma.numel() == 0 or sigma[0] == 0:
        return 0
    nonzero = int((sigma > sigma[0] * max(shape) * torch.finfo(sigma.dtype).eps).sum())
    if rank is not None:
        return min(rank, nonzero)
    cumulative = torch.cumsum(sigma[:nonzero] ** 2, 0)
    return int((cumulative < energy * cumulative[-1]).sum()) + 1


def stacked_factors(paths, weights, sources):
    """{layer: (B [out, Σr], A [Σr, in])} in float64, each source's weight and scale folded into its B."""
    stacks = {}
    for path, weight, (pairs, meta) in zip(paths, weights, sources):
        for name, (A, B) in pairs.items():
            stack = stacks.setdefault(name, {"A": [], "B": [], "path": path})
            if stack["A"] and (A.shape[1], B.shape[0]) != (stack["A"][0].shape[1], stack["B"][0].shape[0]):
                raise MinisdError(f"{path}: layer {name} is {B.shape[0]}x{A.shape[1]}, "
                                  f"but {stack['B'][0].shape[0]}x{stack['A'][0].shape[1]} in {stack['path']}")
            stack["A"].append(A.double())
            stack["B"].append(B.double() * (weight * meta["scale"]))
    return {name: (torch.cat(stack["B"], 1), torch.cat(stack["A"], 0)) for name, stack in stacks.items()}


def merge_adapters(paths, out, weights=None, energy=None, rank=None):
    """Merge the adapter files `paths` into one LoRA adapter file `out`. weights default to 1/N; keep the
    `energy` fraction of each layer's Σσ² (default 1.0: exact) or a fixed `rank`. Returns the report:
    {"out", "sources", "weights", "energy", "rank", "layers": {layer: {"rank", "source_rank", "kept_energy"}},
    "kept_energy" (over all layers), "total_rank"}."""
    paths = [str(p) for p in paths]
    if not paths:
        raise MinisdError("no adapters to merge")
    if energy is not None and rank is not None:
        raise MinisdError("give --energy or --rank, not both")
    if energy is None and rank is None:
        energy = 1.0
    if energy is not None and not 0 < energy <= 1:
        raise MinisdError(f"--energy must be in (0, 1], got {energy}")
    if rank is not None and rank < 1:
        raise MinisdError(f"--rank must be at least 1, got {rank}")
    weights = [1 / len(paths)] * len(paths) if weights is None else [float(w) for w in weights]
    if len(weights) != len(paths):
        raise MinisdError(f"--weights: {len(weights)} value(s) for {len(paths)} adapter(s)")
    if not all(math.isfinite(w) for w in weights):
        raise MinisdError(f"--weights must be finite numbers, got {' '.join(map(str, weights))}")
    sources = [read_pairs(path) for path in paths]
    if len({meta["fingerprint"] for _, meta in sources}) > 1:
        warnings.warn("the adapters were trained on different base models (their fingerprints differ)")

    tensors, layers, kept_total, energy_total = {}, {}, 0.0, 0.0
    for name, (B, A) in stacked_factors(paths, weights, sources).items():
        U, sigma, V = low_rank_svd(B, A)
        k = kept_rank(sigma, (B.shape[0], A.shape[1]), energy, rank)
        total, kept = float((sigma ** 2).sum()), float((sigma[:k] ** 2).sum())
        kept_total, energy_total = kept_total + kept, energy_total + total
        layers[name] = {"rank": k, "source_rank": A.shape[0], "kept_energy": kept / total if total > 0 else 1.0}
        if k:
            root = sigma[:k].sqrt()
            tensors[f"{name}.lora_A"] = (root[:, None] * V[:, :k].T).float()
            tensors[f"{name}.lora_B"] = (U[:, :k] * root).float()
    ranks = {name: info["rank"] for name, info in layers.items() if info["rank"]}
    if not ranks:
        raise MinisdError("the merged update is zero in every layer (are all --weights zero?)")

    record = {"sources": [{"path": path, "method": meta["method"], "fingerprint": meta["fingerprint"]}
                          for path, (_, meta) in zip(paths, sources)],
              "weights": weights, "energy": energy, "rank": rank,
              "kept_energy": {name: info["kept_energy"] for name, info in layers.items()}}
    write_adapter(out, tensors, "lora", 1.0, 1.0, ranks, sources[0][1]["fingerprint"], merge=record)
    return {"out": str(out), "sources": paths, "weights": weights, "energy": energy, "rank": rank, "layers": layers,
            "kept_energy": kept_total / energy_total, "total_rank": sum(ranks.values())}


def summary(report):
    """The report as a table: one row per layer, then all layers together."""
    width = max(len(name) for name in report["layers"])
    rows = [f"{'layer':<{width}}  {'stacked rank':>12}  {'kept rank':>9}  {'kept energy':>11}"]
    for name, info in report["layers"].items():
        rows.append(f"{name:<{width}}  {info['source_rank']:>12}  {info['rank']:>9}  {info['kept_energy']:>11.4f}")
    stacked = sum(info["source_rank"] for info in report["layers"].values())
    rows.append(f"{'all ' + str(len(report['layers'])) + ' layers':<{width}}  {stacked:>12}  "
                f"{report['total_rank']:>9}  {report['kept_energy']:>11.4f}")
    return "\n".join(rows)
