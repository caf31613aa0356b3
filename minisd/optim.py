"""Adam with a step count per entry, for parameters that grow.

A SeLoRA rank grown at step 2,000 gets new A and B entries. With torch.optim.Adam's one step count per
parameter, their zero moments would be bias-corrected as if they had 2,000 steps behind them, so their
first updates move several times the learning rate. Here `state["step"]` has the parameter's shape:
an entry added by `minisd.adapters.grow_parameter` (state padded with zeros, the step count included)
is updated as a fresh Adam would update it, and an entry that was always there as torch.optim.Adam
(no weight decay) would: bitwise in float32 against its default path on the CPU; on a GPU, torch's
foreach path orders the last product differently, to within float rounding.

Every state tensor lives on its parameter's device and `step()` makes no host synchronisation and no
decision on tensor values, so it can be captured in a CUDA graph.
"""
import torch


class Adam(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        if not 0.0 <= lr:
            raise ValueError(f"invalid learning rate {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps})
        self.register_load_state_dict_post_hook(_steps_on_parameters)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self.state[p] for p in params]
            for p, state in zip(params, states):
                if not state:
                    state["step"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            adam_update(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                        [s["exp_avg_sq"] for s in states], [s["step"] for s in states], group["lr"], *group["betas"],
                        group["eps"])
        return loss


def adam_update(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps):
    """One Adam update of every entry with its own step count (tensors shaped like the parameters).

    The bias corrections are computed in float64 and rounded once, as torch.optim.Adam computes its
    scalar ones in Python floats; the update is ((−step size · m) / denominator) + θ, in its order."""
    torch._foreach_add_(steps, 1)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)

    denominator = torch._foreach_sqrt(exp_avg_sqs)
    correction = bias_correction(beta2, steps)
    torch._foreach_sqrt_(correction)
    torch._foreach_div_(denominator, [c.to(d.dtype) for c, d in zip(correction, denominator)])
    torch._foreach_add_(denominator, eps)
    correction = bias_correction(beta1, steps)
    step_size = [torch.full_like(c, -lr) for c in correction]   # -lr / (1 - beta1^step), rounded once
    torch._foreach_div_(step_size, correction)
    del correction
    update = torch._foreach_mul(exp_avgs, [s.to(m.dtype) for s, m in zip(step_size, exp_avgs)])
    del step_size
    torch._foreach_div_(update, denominator)
    torch._foreach_add_(params, update)


def bias_correction(beta, steps):
    """1 - beta^step per entry, in float64."""
    correction = torch._foreach_pow(beta, [s.to(torch.float64) for s in steps])
    torch._foreach_neg_(correction)
    torch._foreach_add_(correction, 1)
    return correction


def _steps_on_parameters(optimizer):
    """After loading a state dict: step counts as float32 tensors of each parameter's shape on its device
    (torch's loader leaves `step` where it was read; a one-number step, as torch.optim.Adam saves it,
    becomes that count for every entry)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and "step" in state:
                step = torch.as_tensor(state["step"]).to(device=p.device, dtype=torch.float32)
                state["step"] = step.expand_as(p).clone() if step.shape != p.shape else step
