"""SeLoRA: a LoRA whose rank grows, layer by layer, where Fisher information says a new rank would help.

Every layer starts at rank 1. While `track_fisher` is on, the training step's own backward accumulates,
per sample i, F_A = Σ G_A,i², F_B = Σ G_B,i² and F_new for a candidate A row K (its B column being zero,
the output and all other gradients are unchanged). At each test the controller grows every layer whose
FI-ratio (ΣF_A + ΣF_B + F_new) / (ΣF_A + ΣF_B) reaches λ, adopting K and a zero B column.

Two estimators of F: "sample", the per-sample sums above (the paper's Eq. 3), and "batch", the squares of
the step's batch gradients g_A, g_B and g_new (the authors' released code), taken from the same backward
once the step's gradients are complete.
"""
import math
from types import SimpleNamespace

import torch

from ..errors import MinisdError
from . import fused, op
from .lora import AdapterLayer, compute_dtype

ESTIMATORS = ("sample", "batch")
REFERENCE_OPS = SimpleNamespace(forward=op.selora_forward, backward=op.selora_backward)


def _ops(x):
    """The op implementation for x: the fused CUDA op where it runs, else the reference."""
    ops = fused.selora_ops(x)
    return ops if ops is not None else REFERENCE_OPS


class _SeLoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, layer, n_samples):
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            raise RuntimeError("SeLoRALinear keeps its base weight and bias frozen")
        ops = _ops(x)
        # The candidate is read at forward time (its projection is u's last column), so that a
        # checkpointed recompute sees the same one.
        candidate = layer.candidate.to(x.device) if layer.track_fisher else None
        with torch.autocast(x.device.type, enabled=False):
            y, u = ops.forward(x, weight, bias, lora_A, lora_B, layer.scale, candidate)
        ctx.save_for_backward(x, weight, lora_A, lora_B, u)
        ctx.ops, ctx.layer, ctx.n_samples, ctx.scale = ops, layer, n_samples, layer.scale
        ctx.fisher = layer.fisher_mode if candidate is not None else None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_A, lora_B, u = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            grad_x, grad_A, grad_B, fisher_A, fisher_B, fisher_new, grad_new = ctx.ops.backward(
                grad_y.contiguous(), x, weight, lora_A, lora_B, u, ctx.scale, ctx.n_samples,
                ctx.fisher, ctx.needs_input_grad[0])
        if ctx.fisher is not None:
            ctx.layer.accumulate_fisher(fisher_A, fisher_B, fisher_new, grad_new)
        return grad_x, None, None, grad_A, grad_B, None, None


def grow_parameter(param, data, optimizer=None):
    """Give `param` the larger `data`, whose leading block is the old value, keeping the Parameter object.

    The optimizer's per-entry state (Adam's exp_avg, exp_avg_sq, max_exp_avg_sq, and minisd.optim.Adam's
    per-entry step count) and a pending grad are padded the same way: old entries keep their values, new
    entries start at zero, as a fresh Adam would; torch.optim.Adam's one-number `step` is untouched.
    """
    old = tuple(slice(0, n) for n in param.shape)

    def pad(t):
        out = t.new_zeros(data.shape)
        out[old] = t
        return out

    state = optimizer.state.get(param, {}) if optimizer is not None else {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == param.shape:
            state[key] = pad(value)
    grad, param.grad = param.grad, None
    param.data = data
    if grad is not None:
        param.grad = pad(grad)


def check_lambda(lam):
    """The FI-ratio is at least 1 by construction: λ < 1 would grow every layer at every test."""
    if not lam >= 1:
        raise MinisdError(f"--lambda must be at least 1 (the FI-ratio is never below 1, so a smaller λ grows "
                          f"every layer at every test), got {lam}")


def draw_candidate(in_features, generator=None):
    """K ~ U(-1/√in, 1/√in) (Kaiming-uniform, a=√5, of a [1, in] row), drawn on the CPU."""
    bound = 1 / math.sqrt(in_features)
    return torch.empty(in_features).uniform_(-bound, bound, generator=generator)


def fisher_totals(layers):
    """[L, 2] float64: (ΣF_A + ΣF_B, F_new) per layer, in a few launches on the device (the terms are
    non-negative: their sum is the 1-norm), to be read with one synchronisation, not one per layer."""
    layers = list(layers)
    orig = [torch.stack(torch._foreach_norm([getattr(layer, name) for layer in layers], 1))
            for name in ("fisher_A", "fisher_B")]
    new = torch.stack([layer.fisher_new.reshape(()) for layer in layers])
    return torch.stack([orig[0] + orig[1], new.to(orig[0].dtype)], 1).double()


def reset_fishers(layers, generator=None):
    """`reset_fisher` of every layer in turn (the same candidates), done in place in a few launches where
    the buffers fit: the accumulators zeroed, the candidates copied into the tensors a captured training
    step (minisd.graphs) reads."""
    layers = list(layers)
    device, dtype = layers[0].lora_A.device, layers[0].lora_A.dtype
    accumulators = [t for layer in layers for t in (layer.fisher_A, layer.fisher_B, layer.fisher_new, layer.grad_new)]
    if any(t.device != device or t.dtype != dtype for t in accumulators + [layer.candidate for layer in layers]):
        for layer in layers:
            layer.reset_fisher(generator)
        return
    draws = torch.cat([draw_candidate(layer.in_features, generator) for layer in layers]).to(dtype)
    draws = draws.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else draws.to(device)
    torch._foreach_copy_([layer.candidate for layer in layers], list(draws.split([l.in_features for l in layers])))
    torch._foreach_zero_(accumulators)


def fi_ratio(fisher_orig, fisher_new):
    """(F_orig + F_new) / F_orig, or None when there is no usable information: F_orig zero (no gradient
    reached the layer) or a term not finite (an overflowed fp16 step)."""
    if not (math.isfinite(fisher_orig) and math.isfinite(fisher_new)) or fisher_orig <= 0:
        return None
    return (fisher_orig + fisher_new) / fisher_orig


class SeLoRALinear(AdapterLayer):
    """SeLoRA layer: rank 1 at start, Fisher terms from the training backward, `expand()` to grow."""

    def __init__(self, base, alpha=1.0):
        super().__init__(base)
        self.scale = alpha  # alpha / r_init with r_init = 1; constant as the rank grows
        self.max_rank = min(self.in_features, self.out_features)
        self.init_lora(1)
        self.track_fisher = False
        self.fisher_mode = "sample"  # or "batch": see accumulate_batch_fisher
        self.reset_fisher()

    @property
    def rank(self):
        return self.lora_A.shape[0]

    def forward_rows(self, x, n_samples):
        dtype = compute_dtype(x)
        bias = None if self.bias is None else self.bias.to(dtype)
        return _SeLoRAFunction.apply(x.to(dtype), self.base_weight().to(dtype), bias,
                                     self.lora_A.to(dtype), self.lora_B.to(dtype), self, n_samples)

    def accumulate_fisher(self, fisher_A, fisher_B, fisher_new, grad_new):
        """What a tracked backward hands over: per-sample Fisher terms ("sample"), or the gradient of the
        candidate's zero B column, summed until the step's gradients are complete ("batch")."""
        if self.fisher_mode == "batch":
            self.add_into("grad_new", grad_new)
            return
        for name, term in (("fisher_A", fisher_A), ("fisher_B", fisher_B), ("fisher_new", fisher_new)):
            self.add_into(name, term)

    def add_into(self, name, term):
        """Accumulator `name` += term, in place: a captured training step (minisd.graphs) adds into the
        same storage at every replay."""
        acc = getattr(self, name)
        if acc.device != term.device:   # the layer moved since the last reset
            acc = acc.to(term.device)
            setattr(self, name, acc)
        acc.add_(term.to(acc.dtype))

    @torch.no_grad()
    def accumulate_batch_fisher(self, loss_scale=1.0):
        """The "batch" estimator's terms of one step, from its complete gradients (lora_A.grad, lora_B.grad
        and grad_new, each summed over micro-batches and averaged over processes): F_A += g_A², F_B += g_B²,
        F_new += ‖g_new‖², all divided by the step's loss scale² so that steps of a window weigh alike."""
        dtype = self.fisher_A.dtype
        if self.lora_A.grad is not None:
            self.add_into("fisher_A", (self.lora_A.grad.to(dtype) / loss_scale).square())
        if self.lora_B.grad is not None:
            self.add_into("fisher_B", (self.lora_B.grad.to(dtype) / loss_scale).square())
        self.add_into("fisher_new", (self.grad_new.to(dtype) / loss_scale).square().sum())
        self.grad_new.zero_()

    def fisher_sums(self):
        """(ΣF_A + ΣF_B, F_new) as floats."""
        return float(self.fisher_A.sum() + self.fisher_B.sum()), float(self.fisher_new)

    def fisher_ratio(self):
        """(ΣF_A + ΣF_B + F_new) / (ΣF_A + ΣF_B); 1.0 when the layer saw no usable gradient."""
        ratio = fi_ratio(*self.fisher_sums())
        return 1.0 if ratio is None else ratio

    @torch.no_grad()
    def expand(self, optimizer=None):
        """rank += 1: the candidate becomes the new A row, with a zero B column (output unchanged).
        With an Adam/AdamW `optimizer`, its state for lora_A/lora_B grows too (new entries zero)."""
        if self.rank >= self.max_rank:
            raise ValueError(f"rank {self.rank} is already the maximum {self.max_rank} of this layer")
        A, B = self.lora_A, self.lora_B
        grow_parameter(A, torch.cat([A.data, self.candidate.to(A)[None]]), optimizer)
        grow_parameter(B, torch.cat([B.data, B.new_zeros(self.out_features, 1)], 1), optimizer)
        self.fisher_A = torch.cat([self.fisher_A, self.fisher_A.new_zeros(1, self.in_features)])
        self.fisher_B = torch.cat([self.fisher_B, self.fisher_B.new_zeros(self.out_features, 1)], 1)
        self.fisher_new = torch.zeros_like(self.fisher_new)
        self.grad_new = torch.zeros_like(self.grad_new)

    def reset_fisher(self, generator=None):
        """Zero the accumulators; draw a new candidate K ~ U(-1/√in, 1/√in) (Kaiming-uniform, a=√5, of a
        [1, in] row) on the CPU from `generator`, so every process that shares its seed draws the same K."""
        self.candidate = draw_candidate(self.in_features, generator).to(self.lora_A)
        self.fisher_A = torch.zeros_like(self.lora_A.data)
        self.fisher_B = torch.zeros_like(self.lora_B.data)
        self.fisher_new = self.lora_A.new_zeros(())
        self.grad_new = self.lora_A.new_zeros(self.out_features)

    @torch.no_grad()
    def set_rank(self, rank):
        """Resize to `rank` with zero A/B (placeholders that a checkpoint then overwrites)."""
        self.lora_A.grad = self.lora_B.grad = None
        self.lora_A.data = self.lora_A.new_zeros(rank, self.in_features)
        self.lora_B.data = self.lora_B.new_zeros(self.out_features, rank)
        self.fisher_A = torch.zeros_like(self.lora_A.data)
        self.fisher_B = torch.zeros_like(self.lora_B.data)


class SeLoRAController:
    """Decides when to track Fisher information and which layers grow.

    Call `begin_step(step)` before the step's forward passes and `end_step(step, optimizer)` after
    `optimizer.step()`; steps count optimizer steps from 1. Tests happen at steps divisible by `every`;
    Fisher terms accumulate over the last `fisher_window` steps before each test (all micro-batches).
    With `fisher="batch"`, also call `end_backward(loss_scale)` once the step's gradients are complete
    (after the all-reduce, which `batch_gradients()` must join) and before the optimizer unscales them.
    """

    def __init__(self, named_layers, lam=1.1, every=40, max_rank=None, fisher_window=1, seed=0, distributed=False,
                 fisher="sample"):
        check_lambda(lam)
        if fisher not in ESTIMATORS:
            raise MinisdError(f"--fisher must be one of {', '.join(ESTIMATORS)}, got {fisher!r}")
        if every < 1:
            raise MinisdError(f"--expand-every must be at least 1, got {every}")
        if not 1 <= fisher_window <= every:
            raise MinisdError(f"--fisher-window must be between 1 and the test interval {every}, got {fisher_window}")
        if max_rank is not None and max_rank < 1:
            raise MinisdError(f"--max-rank must be at least 1, got {max_rank}")
        self.layers = dict(named_layers)
        self.lam, self.every, self.max_rank, self.fisher_window = lam, every, max_rank, fisher_window
        self.distributed, self.fisher, self.tracked = distributed, fisher, False
        self.generator = torch.Generator().manual_seed(seed)
        for layer in self.layers.values():
            layer.fisher_mode = fisher
            layer.reset_fisher(self.generator)

    def tracking(self, step):
        return (-step) % self.every < self.fisher_window

    def begin_step(self, step):
        self.tracked = self.tracking(step)
        for layer in self.layers.values():
            layer.track_fisher = self.tracked

    def batch_gradients(self):
        """The candidates' gradients g_new of a tracked step of the batch estimator (else none): they are
        averaged over processes with the parameters' gradients."""
        return [layer.grad_new for layer in self.layers.values()] if self.fisher == "batch" and self.tracked else []

    def end_backward(self, loss_scale=1.0):
        """Batch estimator, at a tracked step whose gradients are complete: add their squares to F."""
        if self.fisher == "batch" and self.tracked:
            for layer in self.layers.values():
                layer.accumulate_batch_fisher(loss_scale)

    def cap(self, layer):
        return layer.max_rank if self.max_rank is None else min(layer.max_rank, self.max_rank)

    def end_step(self, step, optimizer=None):
        """At a test step: grow every layer whose FI-ratio ≥ λ (never one that saw no usable gradient,
        whatever λ); returns the growth events, else []."""
        if step % self.every:
            return []
        sums = fisher_totals(self.layers.values())
        if self.distributed and self.fisher == "sample":   # batch terms come from already averaged gradients
            torch.distributed.all_reduce(sums)
        events = []
        for (name, layer), (orig, new) in zip(self.layers.items(), sums.tolist()):
            ratio = fi_ratio(orig, new)
            if ratio is not None and ratio >= self.lam and layer.rank < self.cap(layer):
                layer.expand(optimizer)
                events.append({"step": step, "layer": name, "ratio": ratio, "rank": layer.rank})
        reset_fishers(self.layers.values(), self.generator)
        return events

    def ranks(self):
        return {name: layer.rank for name, layer in self.layers.items()}

    def total_rank(self):
        return sum(self.ranks().values())

    def state_dict(self):
        return {
            "generator": self.generator.get_state(),
            "layers": {
                name: {"rank": layer.rank, **{key: getattr(layer, key).detach().cpu().clone()
                                               for key in ("candidate", "fisher_A", "fisher_B", "fisher_new")}}
                for name, layer in self.layers.items()
            },
        }

    def load_state_dict(self, state):
        """Restore decisions' state and resize every layer to its saved rank; load the model's adapter
        weights and the optimizer state after this."""
        if not isinstance(state.get("layers"), dict):
            raise MinisdError("SeLoRA state holds no layers")
        missing = set(self.layers) ^ set(state["layers"])
        if missing:
            raise MinisdError(f"SeLoRA state does not match the model's adapted layers: {sorted(missing)[0]}")
        self.generator.set_state(state["generator"])
        for name, layer in self.layers.items():
            s = state["layers"][name]
            rank = s.get("rank") if isinstance(s, dict) else None
            shapes = {"candidate": [layer.in_features], "fisher_A": [rank, layer.in_features],
                      "fisher_B": [layer.out_features, rank], "fisher_new": []}
            if not (isinstance(rank, int) and rank >= 1 and all(
                    isinstance(s.get(key), torch.Tensor) and list(s[key].shape) == shape for key, shape in shapes.items())):
                raise MinisdError(f"SeLoRA state of layer {name} is not a rank with its candidate and Fisher "
                                  f"information of the layer's shapes")
            if layer.rank != rank:
                layer.set_rank(rank)
            device = layer.lora_A.device
            layer.candidate = s["candidate"].to(device)
            layer.fisher_A, layer.fisher_B = s["fisher_A"].to(device), s["fisher_B"].to(device)
            layer.fisher_new = s["fisher_new"].to(device)
