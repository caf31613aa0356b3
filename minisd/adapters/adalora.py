"""AdaLoRA (Zhang et al., 2023): LoRA in SVD form ΔW = P Λ Q whose triplets are pruned to a shrinking budget.

Where the paper leaves room this follows peft's AdaLoRA (RankAllocator) step for step:
- parameters lora_B = P [out, r], lora_E = Λ [r], lora_A = Q [r, in]; Λ starts at zero, P and Q ~ N(0, 0.02²);
  scale alpha / init_rank, constant (peft: lora_alpha / ranknum);
- importance of an entry I = |θ·∇θ|, sensitivity Ī ← β1 Ī + (1-β1) I, uncertainty Ū ← β2 Ū + (1-β2)|I - Ī|,
  both starting at zero; score of triplet i = s(Λ_i) + mean_j s(Q_ij) + mean_j s(P_ji) with s = Ī·Ū;
- budget: all triplets up to step tinit, then cubic decay to target_rank·layers at step T - tfinal, masking
  every delta_t steps; at T - tfinal the final mask is fixed and re-applied after every later step.
  Masking sets Λ_i = 0 (a masked triplet can still come back at the next masking while the budget shrinks);
- orthogonality regulariser ‖PᵀP - I‖²_F + ‖QQᵀ - I‖²_F (the paper's squared norms), averaged over layers
  (peft's normalisation, so its weight does not grow with the number of layers).
"""
import torch
from torch import nn

from ..errors import MinisdError
from .lora import AdapterLayer, lora_rows


class AdaLoRALinear(AdapterLayer):
    def __init__(self, base, init_rank=6, alpha=1.0):
        super().__init__(base)
        self.init_rank = init_rank
        self.scale = alpha / init_rank
        self.lora_A = self.new_param(init_rank, self.in_features)  # Q
        self.lora_E = self.new_param(init_rank)  # Λ
        self.lora_B = self.new_param(self.out_features, init_rank)  # P
        nn.init.normal_(self.lora_A, std=0.02)
        nn.init.zeros_(self.lora_E)
        nn.init.normal_(self.lora_B, std=0.02)

    @property
    def rank(self):
        """Triplets that contribute now (Λ_i ≠ 0)."""
        return int(self.lora_E.count_nonzero())

    def forward_rows(self, x, n_samples):
        return lora_rows(self, x, self.lora_E[:, None] * self.lora_A, self.lora_B, self.scale)

    def lora_pair(self):
        """The equivalent LoRA: B = P, A = Λ·Q over the triplets with Λ_i ≠ 0."""
        keep = self.lora_E != 0
        return self.lora_E[keep, None] * self.lora_A[keep], self.lora_B[:, keep], self.scale

    def orth_penalty(self):
        P, Q = self.lora_B, self.lora_A
        eye = torch.eye(self.init_rank, device=P.device, dtype=P.dtype)
        return (P.t() @ P - eye).square().sum() + (Q @ Q.t() - eye).square().sum()


class AdaLoRAController:
    """Budget schedule and importance-driven masking; call `update_and_allocate(step)` after backward (and
    optimizer.step()) before the grads are zeroed, and add `regularizer()` to the loss."""

    def __init__(self, named_layers, total_steps, target_rank=4, tinit=None, tfinal=None, delta_t=10,
                 beta1=0.85, beta2=0.85, orth_weight=0.1):
        self.layers = dict(named_layers)
        self.total_steps = total_steps
        self.tinit = total_steps // 10 if tinit is None else tinit
        self.tfinal = total_steps // 5 if tfinal is None else tfinal
        self.delta_t, self.beta1, self.beta2, self.orth_weight = delta_t, beta1, beta2, orth_weight
        self.init_budget = sum(layer.init_rank for layer in self.layers.values())
        self.target_budget = target_rank * len(self.layers)
        if self.tinit + self.tfinal >= total_steps or total_steps - self.tfinal < 2:   # importance before the last mask
            raise MinisdError(f"AdaLoRA needs more steps ({total_steps}) than warm-up {self.tinit} + final {self.tfinal}, "
                              f"and at least 2 before its final budget")
        if self.target_budget > self.init_budget:
            raise MinisdError(f"AdaLoRA target rank {target_rank} exceeds the initial rank of the layers")
        self.sensitivity, self.uncertainty = {}, {}
        self.masks = {name: torch.ones(layer.init_rank, dtype=torch.bool) for name, layer in self.layers.items()}

    def budget_schedule(self, step):
        """(budget, mask now?) for `step`."""
        final = self.total_steps - self.tfinal
        if step <= self.tinit:
            return self.init_budget, False
        if step > final:
            return self.target_budget, True
        left = 1 - (step - self.tinit) / (final - self.tinit)
        budget = int((self.init_budget - self.target_budget) * left**3 + self.target_budget)
        return budget, step % self.delta_t == 0

    def params(self):
        for name, layer in self.layers.items():
            for kind in ("lora_A", "lora_E", "lora_B"):
                yield (name, kind), getattr(layer, kind)

    @torch.no_grad()
    def update_importance(self):
        for key, p in self.params():
            ipt = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
            sens = self.sensitivity.get(key, torch.zeros_like(p))
            unc = self.uncertainty.get(key, torch.zeros_like(p))
            sens = self.beta1 * sens + (1 - self.beta1) * ipt
            self.sensitivity[key] = sens
            self.uncertainty[key] = self.beta2 * unc + (1 - self.beta2) * (ipt - sens).abs()

    def scores(self):
        """Triplet importance per layer, [init_rank] each."""
        out = {}
        for name in self.layers:
            s = {kind: self.sensitivity[name, kind] * self.uncertainty[name, kind] for kind in ("lora_A", "lora_E", "lora_B")}
            out[name] = s["lora_E"] + s["lora_A"].mean(1) + s["lora_B"].mean(0)
        return out

    @torch.no_grad()
    def mask_to_budget(self, budget):
        scores = self.scores()
        k = self.init_budget - budget
        if k > 0:
            threshold = torch.kthvalue(torch.cat([s.cpu() for s in scores.values()]), k).values
            self.masks = {name: s.cpu() > threshold for name, s in scores.items()}
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self):
        for name, layer in self.layers.items():
            layer.lora_E.masked_fill_(~self.masks[name].to(layer.lora_E.device), 0.0)

    def update_and_allocate(self, step):
        """Update importance and mask to this step's budget; returns the budget."""
        final = self.total_steps - self.tfinal
        budget, mask_now = self.budget_schedule(step)
        if step < final:
            self.update_importance()
            if mask_now:
                self.mask_to_budget(budget)
        elif step == final:
            self.mask_to_budget(budget)
        else:
            self.apply_masks()
        return budget

    def regularizer(self):
        """orth_weight · mean over layers of ‖PᵀP - I‖²_F + ‖QQᵀ - I‖²_F."""
        penalties = [layer.orth_penalty() for layer in self.layers.values()]
        return self.orth_weight * torch.stack(penalties).mean()

    def ranks(self):
        return {name: int(mask.sum()) for name, mask in self.masks.items()}

    def total_rank(self):
        return sum(self.ranks().values())

    def state_dict(self):
        def by_name(d):
            return {f"{name}.{kind}": t.cpu() for (name, kind), t in d.items()}
        return {"sensitivity": by_name(self.sensitivity), "uncertainty": by_name(self.uncertainty),
                "masks": dict(self.masks)}

    def load_state_dict(self, state):
        for store, saved in ((self.sensitivity, state["sensitivity"]), (self.uncertainty, state["uncertainty"])):
            store.clear()
            for key, p in self.params():
                if f"{key[0]}.{key[1]}" in saved:
                    store[key] = saved[f"{key[0]}.{key[1]}"].to(p.device)
        self.masks = {name: state["masks"][name].clone() for name in self.layers}
