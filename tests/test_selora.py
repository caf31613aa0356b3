"""SeLoRA: the op and its Fisher terms against torch.func per-sample gradients, expansion, the controller."""
import copy
import io
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.func import grad, vmap
from torch.utils.checkpoint import checkpoint

from minisd.adapters import SeLoRAController, SeLoRALinear, selora
from minisd.adapters.op import selora_backward, selora_forward
from minisd.errors import MinisdError
from helpers import rel_err



def make_layer(n_in, n_out, rank, dtype=torch.float64, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(n_in, n_out, bias=bias).to(dtype)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) / n_in ** 0.5)
    layer = SeLoRALinear(base, alpha=0.7)
    layer.set_rank(rank)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(rank, n_in, generator=g, dtype=dtype))
        layer.lora_B.copy_(torch.randn(n_out, rank, generator=g, dtype=dtype))
    layer.reset_fisher(g)
    return layer


def plain(x, layer, A, B):
    """The layer's math, written independently of the module (A, B may carry extra candidate rows/columns)."""
    y = x @ layer.weight.T + (0 if layer.bias is None else layer.bias)
    return y + layer.scale * (x @ A.T) @ B.T


def per_sample_fisher(loss_fn, layers, x, target):
    """F_A, F_B, F_new per layer from torch.func: vmap over samples of grad of the sample's own loss term, with
    each layer's candidate as an extra A row and an explicit zero B column as a parameter."""
    params = []
    for layer in layers:
        A = torch.cat([layer.lora_A.detach(), layer.candidate[None]])
        params += [A, layer.lora_B.detach(), torch.zeros(layer.out_features, dtype=x.dtype)]

    def sample_loss(params, xi, ti):
        full = [(A, torch.cat([B, b_new[:, None]], 1)) for A, B, b_new in zip(params[0::3], params[1::3], params[2::3])]
        return loss_fn(xi[None], ti[None], full)

    grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, target)
    out = []
    for i, layer in enumerate(layers):
        gA, gB, g_new = grads[3 * i:3 * i + 3]
        out.append(((gA[:, :-1] ** 2).sum(0), (gB ** 2).sum(0), (g_new ** 2).sum()))
    return out


def check_fisher(layers, reference):
    for layer, (fA, fB, f_new) in zip(layers, reference):
        assert rel_err(layer.fisher_A, fA) < 1e-6
        assert rel_err(layer.fisher_B, fB) < 1e-6
        assert rel_err(layer.fisher_new, f_new) < 1e-6


@pytest.mark.parametrize("shape", [(4, 5), (4, 1), (4,)], ids=["T=5", "T=1", "[N,in]"])
def test_fisher_terms_equal_per_sample_gradients(shape):
    torch.manual_seed(0)
    n_in, n_out = 7, 6
    layer = make_layer(n_in, n_out, rank=3)
    x = torch.randn(*shape, n_in, dtype=torch.float64)
    target = torch.randn(*shape, n_out, dtype=torch.float64)
    n = x.shape[0]

    def loss_fn(x, t, full):
        (A, B), = full
        return ((plain(x, layer, A, B) - t) ** 2).sum() / n  # mean over samples: G_i carries the 1/N

    layer.track_fisher = True
    x.requires_grad_(True)
    loss = ((layer(x) - target) ** 2).sum() / n
    loss.backward()
    check_fisher([layer], per_sample_fisher(loss_fn, [layer], x.detach(), target))
    # The custom backward's gradients are autograd's of the same math.
    A, B = layer.lora_A.detach().requires_grad_(), layer.lora_B.detach().requires_grad_()
    xr = x.detach().requires_grad_()
    (((plain(xr, layer, A, B) - target) ** 2).sum() / n).backward()
    for got, want in ((layer.lora_A.grad, A.grad), (layer.lora_B.grad, B.grad), (x.grad, xr.grad)):
        assert rel_err(got, want) < 1e-10


def two_layer_net(seed=0):
    l1, l2 = make_layer(6, 9, rank=2, seed=seed), make_layer(9, 5, rank=3, seed=seed + 1)

    def loss_fn(x, t, full):
        (A1, B1), (A2, B2) = full
        h = torch.tanh(plain(x, l1, A1, B1))
        return ((plain(h, l2, A2, B2) - t) ** 2).sum()
    return l1, l2, loss_fn


def test_fisher_flows_through_a_two_layer_network():
    torch.manual_seed(1)
    l1, l2, loss_fn = two_layer_net()
    x, target = torch.randn(3, 4, 6, dtype=torch.float64), torch.randn(3, 4, 5, dtype=torch.float64)
    l1.track_fisher = l2.track_fisher = True
    ((l2(torch.tanh(l1(x))) - target) ** 2).sum().backward()
    check_fisher([l1, l2], per_sample_fisher(loss_fn, [l1, l2], x, target))


@pytest.mark.parametrize("reentrant", [False, True])
def test_fisher_under_gradient_checkpointing(reentrant):
    torch.manual_seed(2)
    l1, l2, loss_fn = two_layer_net()
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 4, 5, dtype=torch.float64)
    l1.track_fisher = l2.track_fisher = True
    y = checkpoint(lambda x: l2(torch.tanh(l1(x))), x, use_reentrant=reentrant)
    ((y - target) ** 2).sum().backward()
    check_fisher([l1, l2], per_sample_fisher(loss_fn, [l1, l2], x.detach(), target))


def test_micro_batches_accumulate_to_the_full_batch_fisher():
    torch.manual_seed(3)
    x, target = torch.randn(8, 3, 6, dtype=torch.float64), torch.randn(8, 3, 9, dtype=torch.float64)
    whole, parts = make_layer(6, 9, 2), make_layer(6, 9, 2)
    whole.track_fisher = parts.track_fisher = True
    ((whole(x) - target) ** 2).mean().backward()
    for xs, ts in zip(x.chunk(2), target.chunk(2)):
        (((parts(xs) - ts) ** 2).mean() / 2).backward()
    for name in ("fisher_A", "fisher_B", "fisher_new"):
        assert rel_err(getattr(parts, name), getattr(whole, name)) < 1e-12


def test_half_inputs_accumulate_fisher_in_fp32():
    torch.manual_seed(4)
    M, n, n_in, n_out, r = 64, 4, 48, 40, 3
    t = [torch.randn(s).bfloat16() for s in ((M, n_in), (n_out, n_in), (r, n_in), (n_out, r), (M, n_out), (n_in,))]
    x, W, A, B, gy, K = t
    u = (x.double() @ torch.cat([A, K[None]]).double().T).bfloat16()
    got = selora_backward(gy, x, W, A, B, u, 0.5, n, "sample", True)
    want = selora_backward(gy.double(), x.double(), W.double(), A.double(), B.double(), u.double(), 0.5, n,
                           "sample", True)
    for g, w in zip(got[3:], want[3:]):
        assert g.dtype == torch.float32
        assert rel_err(g, w) < 1e-5


def test_autocast_bf16_with_fp32_parameters():
    torch.manual_seed(5)
    layer32 = make_layer(16, 12, 2, dtype=torch.float32)
    layer16 = make_layer(16, 12, 2, dtype=torch.float32)
    x, target = torch.randn(4, 6, 16), torch.randn(4, 6, 12)
    for layer, autocast in ((layer32, False), (layer16, True)):
        layer.track_fisher = True
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(x)
        assert y.dtype == (torch.bfloat16 if autocast else torch.float32)
        ((y.float() - target) ** 2).sum().backward()
    assert layer16.lora_A.grad.dtype == torch.float32 and layer16.fisher_A.dtype == torch.float32
    assert rel_err(layer16.lora_B.grad, layer32.lora_B.grad) < 3e-2
    for name in ("fisher_A", "fisher_B", "fisher_new"):
        assert rel_err(getattr(layer16, name), getattr(layer32, name)) < 5e-2


def test_half_base_keeps_fp32_adapter_parameters():
    layer = SeLoRALinear(nn.Linear(16, 12).to(torch.bfloat16))
    assert layer.lora_A.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
    layer.track_fisher = True
    y = layer(torch.randn(2, 3, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert layer.lora_B.grad.dtype == torch.float32 and layer.fisher_new > 0


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_layer_matches_the_cpu_reference(dtype):
    torch.manual_seed(8)
    cpu = make_layer(320, 640, 3, dtype=torch.float32)
    gpu = copy.deepcopy(cpu).cuda()
    x, target = torch.randn(4, 77, 320), torch.randn(4, 77, 640)
    for layer, device in ((cpu, "cpu"), (gpu, "cuda")):
        layer.track_fisher = True
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            y = layer(x.to(device))
        ((y.float() - target.to(device)) ** 2).mean().backward()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for name in ("fisher_A", "fisher_B", "fisher_new"):
        assert rel_err(getattr(gpu, name).cpu(), getattr(cpu, name)) < tol
    assert rel_err(gpu.lora_A.grad.cpu(), cpu.lora_A.grad) < tol


def test_fused_op_is_used_when_offered(monkeypatch):
    calls = []

    class Ops:
        def forward(self, *args):
            calls.append("forward")
            return selora_forward(*args)

        def backward(self, *args):
            calls.append(("backward", args[7], args[8], args[9]))
            return selora_backward(*args)

    monkeypatch.setattr(selora.fused, "selora_ops", lambda x: Ops() if x.dtype == torch.float64 else None)
    layer = make_layer(5, 4, 2)
    layer.track_fisher = True
    layer(torch.randn(3, 2, 5, dtype=torch.float64)).sum().backward()
    assert calls == ["forward", ("backward", 3, "sample", False)]
    layer32 = make_layer(5, 4, 2, dtype=torch.float32)  # selora_ops says None: the reference runs
    layer32(torch.randn(3, 5)).sum().backward()
    assert len(calls) == 2 and layer32.lora_A.grad is not None


def test_zero_gradient_gives_ratio_one_and_no_growth():
    layer = make_layer(5, 4, 1)
    controller = SeLoRAController({"l": layer}, lam=1.0, every=1)
    controller.begin_step(1)
    (layer(torch.randn(2, 5, dtype=torch.float64)) * 0).sum().backward()
    assert layer.fisher_ratio() == 1.0
    assert controller.end_step(1) == [] and layer.rank == 1


# ---- expansion ----

def test_expand_keeps_outputs_and_adopts_the_candidate():
    torch.manual_seed(6)
    for n_in, n_out, rank, rows in ((32, 24, 1, 40), (77, 130, 5, 300), (320, 64, 7, 64)):
        layer = make_layer(n_in, n_out, rank, dtype=torch.float32)
        x = torch.randn(rows, n_in)
        before = layer(x)
        A_old, B_old = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
        candidate = layer.candidate.clone()
        layer.expand()
        after = layer(x)
        assert rel_err(after, before) <= 1e-6
        assert layer.rank == rank + 1
        assert torch.equal(layer.lora_A[-1], candidate) and torch.equal(layer.lora_A[:-1], A_old)
        assert torch.equal(layer.lora_B[:, :-1], B_old) and not layer.lora_B[:, -1].any()


@pytest.mark.parametrize("amsgrad", [False, True])
def test_expand_pads_adam_state_and_training_continues(amsgrad):
    torch.manual_seed(7)
    layer = make_layer(10, 8, 2, dtype=torch.float32)
    A, B = layer.lora_A, layer.lora_B
    opt = torch.optim.AdamW([A, B], lr=1e-2, amsgrad=amsgrad)
    x, target = torch.randn(6, 10), torch.randn(6, 8)
    for _ in range(3):
        opt.zero_grad()
        ((layer(x) - target) ** 2).mean().backward()
        opt.step()
    old = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in (A, B)}
    layer.expand(opt)
    assert layer.lora_A is A and layer.lora_B is B and opt.param_groups[0]["params"] == [A, B]
    for p, grown in ((A, lambda t: t[:-1]), (B, lambda t: t[:, :-1])):
        state = opt.state[p]
        assert set(state) == set(old[id(p)]) and torch.equal(state["step"], old[id(p)]["step"])
        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
            assert state[key].shape == p.shape
            assert torch.equal(grown(state[key]), old[id(p)][key])
        assert not A.grad[-1].any() and A.grad.shape == A.shape  # the pending grad grew with a zero entry
    assert not opt.state[A]["exp_avg"][-1].any() and not opt.state[B]["exp_avg_sq"][:, -1].any()
    new_column = B[:, -1].detach().clone()
    opt.zero_grad()
    ((layer(x) - target) ** 2).mean().backward()
    opt.step()
    assert not torch.equal(B[:, -1], new_column)
    assert int(opt.state[A]["step"]) == 4


def test_rank_cap():
    layer = make_layer(3, 5, 3)
    with pytest.raises(ValueError, match="maximum 3"):
        layer.expand()


# ---- controller ----

def regression_problem(seed=0, n_in=12, hidden=16, n_out=10, true_rank=6):
    """A two-layer base network and targets from the same network with a rank-`true_rank` change."""
    g = torch.Generator().manual_seed(seed)
    l1, l2 = nn.Linear(n_in, hidden), nn.Linear(hidden, n_out)
    with torch.no_grad():
        for l in (l1, l2):
            l.weight.copy_(torch.randn(l.weight.shape, generator=g) / l.in_features ** 0.5)
            l.bias.zero_()
    delta = torch.randn(n_out, true_rank, generator=g) @ torch.randn(true_rank, hidden, generator=g) / 3
    x = torch.randn(256, 4, n_in, generator=g)
    with torch.no_grad():
        y = torch.tanh(l1(x)) @ (l2.weight + delta).T
    return l1, l2, x, y


class Student(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        l1, l2, self.x, self.y = regression_problem(seed)
        torch.manual_seed(seed)
        self.l1, self.l2 = SeLoRALinear(l1), SeLoRALinear(l2)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))

    def loss(self, step, batch=16):
        i = torch.arange(batch) + (step * batch) % (len(self.x) - batch)
        return ((self(self.x[i]) - self.y[i]) ** 2).mean()


def train(student, controller, steps, first=1, opt=None):
    opt = opt or torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    events = []
    for step in range(first, first + steps):
        controller.begin_step(step)
        opt.zero_grad()
        student.loss(step).backward()
        opt.step()
        events += controller.end_step(step, opt)
    return events, opt


def test_lambda_orders_growth_and_large_lambda_never_grows():
    totals = {}
    for lam in (1.0, 1.1, 1.3, 100.0):
        student = Student()
        controller = SeLoRAController({"l1": student.l1, "l2": student.l2}, lam=lam, every=10)
        events, _ = train(student, controller, 40)
        totals[lam] = controller.total_rank()
        assert totals[lam] == 2 + len(events)
        assert all(e["ratio"] >= lam and e["step"] % 10 == 0 for e in events)
    assert totals[1.0] == 2 + 2 * 4  # every ratio is ≥ 1: λ = 1 grows every layer at every test
    assert totals[1.0] > totals[1.1] > 2  # the regression needs rank: λ = 1.1 grows some layers, not all
    assert totals[1.1] >= totals[1.3]
    assert totals[100.0] == 2


def test_max_rank_caps_growth():
    student = Student()
    controller = SeLoRAController({"l1": student.l1, "l2": student.l2}, lam=1.0, every=2, max_rank=3)
    train(student, controller, 20)
    assert controller.ranks() == {"l1": 3, "l2": 3}


def test_tracking_schedule():
    controller = SeLoRAController({}, every=5, fisher_window=2)
    assert [s for s in range(1, 16) if controller.tracking(s)] == [4, 5, 9, 10, 14, 15]
    with pytest.raises(MinisdError, match="--fisher-window"):
        SeLoRAController({}, every=5, fisher_window=6)


def test_fisher_window_accumulates_over_steps():
    window, every = 3, 6
    a, b = Student(), Student()
    ctrl_a = SeLoRAController({"l1": a.l1, "l2": a.l2}, lam=100.0, every=every, fisher_window=window)
    ctrl_b = SeLoRAController({"l1": b.l1, "l2": b.l2}, lam=100.0, every=every, fisher_window=1)
    opt_a = torch.optim.Adam([p for p in a.parameters() if p.requires_grad], lr=1e-2)
    opt_b = torch.optim.Adam([p for p in b.parameters() if p.requires_grad], lr=1e-2)
    sums = {name: 0 for name in ("fisher_A", "fisher_B", "fisher_new")}
    for step in range(1, every + 1):
        ctrl_a.begin_step(step)
        ctrl_b.begin_step(step)
        b.l1.track_fisher = step > every - window  # b records each step of the window on its own
        for student, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            student.loss(step).backward()
            opt.step()
        if b.l1.track_fisher:
            for name in sums:
                sums[name] = sums[name] + getattr(b.l1, name)
            b.l1.fisher_A, b.l1.fisher_B = torch.zeros_like(b.l1.fisher_A), torch.zeros_like(b.l1.fisher_B)
            b.l1.fisher_new = torch.zeros_like(b.l1.fisher_new)
    assert torch.equal(a.l1.candidate, b.l1.candidate)
    for name, total in sums.items():
        assert rel_err(getattr(a.l1, name), total) < 1e-6
    assert a.l1.fisher_new > 0


def test_state_dict_round_trip_gives_identical_decisions():
    def run_controller(student):
        return SeLoRAController({"l1": student.l1, "l2": student.l2}, lam=1.02, every=4, fisher_window=2, seed=3)

    a = Student()
    ctrl_a = run_controller(a)
    _, opt_a = train(a, ctrl_a, 11)  # stop inside a Fisher window (steps 11, 12)
    saved = {"model": {k: v.clone() for k, v in a.state_dict().items()}, "opt": opt_a.state_dict(),
             "ctrl": ctrl_a.state_dict()}
    saved = torch.load(_roundtrip(saved), weights_only=True)
    events_a, _ = train(a, ctrl_a, 25, first=12, opt=opt_a)

    b = Student(seed=0)
    ctrl_b = run_controller(b)
    opt_b = torch.optim.Adam([p for p in b.parameters() if p.requires_grad], lr=1e-2)
    ctrl_b.load_state_dict(saved["ctrl"])
    b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["opt"])
    events_b, _ = train(b, ctrl_b, 25, first=12, opt=opt_b)
    assert len(events_a) > 0 and events_a == events_b
    assert ctrl_a.ranks() == ctrl_b.ranks()
    assert torch.equal(a.l2.lora_B, b.l2.lora_B)


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


# ---- several processes ----

def _distributed_worker(rank, world, init_file, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    student = Student()
    controller = SeLoRAController({"l1": student.l1, "l2": student.l2}, lam=1.01, every=1, seed=5, distributed=True)
    controller.begin_step(1)
    x, y = student.x[:8].chunk(world)[rank], student.y[:8].chunk(world)[rank]
    ((student(x) - y) ** 2).mean().backward()  # this process's half of the batch
    events = controller.end_step(1)
    torch.save({"events": events, "candidate": student.l1.candidate}, os.path.join(out_dir, f"{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_distributed_decisions_match_the_whole_batch(tmp_path):
    mp.start_processes(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    results = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    assert results[0]["events"] == results[1]["events"]
    assert torch.equal(results[0]["candidate"], results[1]["candidate"])
    whole = Student()
    controller = SeLoRAController({"l1": whole.l1, "l2": whole.l2}, lam=1.01, every=1, seed=5)
    controller.begin_step(1)
    ((whole(whole.x[:8]) - whole.y[:8]) ** 2).mean().backward()
    want = controller.end_step(1)
    got = results[0]["events"]
    assert [(e["layer"], e["rank"]) for e in got] == [(e["layer"], e["rank"]) for e in want] and want
    for g, w in zip(got, want):
        assert abs(g["ratio"] - w["ratio"]) < 1e-6 * w["ratio"]
