"""minisd.optim.Adam: torch.optim.Adam for entries that were always there, a fresh Adam for grown ones."""
import copy
import io

import pytest
import torch

from minisd.adapters import SeLoRALinear, grow_parameter
from minisd.optim import Adam

SHAPES = [(7, 33), (130, 5), (1000,)]


def gradients(steps, shapes, seed=0):
    """Gradients over many orders of magnitude, so that eps and the bias corrections both matter."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) * 10.0 ** torch.randint(-7, 3, (), generator=g).item() for s in shapes]
            for _ in range(steps)]


def apply(optimizer, params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    optimizer.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_torch_adam(dtype):
    """Bitwise in float32. In float64, torch's pow and Python's may differ in the last bit of a bias
    correction, which float32 rounds away."""
    torch.manual_seed(0)
    ours = [torch.randn(s, dtype=dtype, requires_grad=True) for s in SHAPES]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt_ours = Adam(ours, lr=3e-3, betas=(0.8, 0.99), eps=1e-7)
    opt_theirs = torch.optim.Adam(theirs, lr=3e-3, betas=(0.8, 0.99), eps=1e-7)
    for grads in gradients(60, SHAPES):
        apply(opt_ours, ours, [g.to(dtype) for g in grads])
        apply(opt_theirs, theirs, [g.to(dtype) for g in grads])
        for a, b in zip(ours, theirs):
            if dtype == torch.float32:
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    for p in ours:
        assert opt_ours.state[p]["step"].shape == p.shape and bool((opt_ours.state[p]["step"] == 60).all())


def test_grown_entries_update_as_a_fresh_adam_and_old_ones_as_torch_adam():
    """A [4, 6] parameter trained 25 steps, grown to [5, 6], trained on: its first four rows follow
    torch.optim.Adam, its new row a fresh torch.optim.Adam started at the growth."""
    torch.manual_seed(1)
    lr = 1e-2
    param = torch.randn(4, 6, requires_grad=True)
    old_rows = param.detach().clone().requires_grad_()
    optimizer, reference = Adam([param], lr=lr), torch.optim.Adam([old_rows], lr=lr)
    before, after = gradients(25, [(4, 6)]), gradients(15, [(5, 6)], seed=1)
    for (grad,) in before:
        apply(optimizer, [param], [grad])
        apply(reference, [old_rows], [grad])
    grow_parameter(param, torch.cat([param.data, torch.randn(1, 6)]), optimizer)
    assert optimizer.state[param]["step"][:4].eq(25).all() and optimizer.state[param]["step"][4].eq(0).all()
    new_row = param.detach()[4:].clone().requires_grad_()
    fresh = torch.optim.Adam([new_row], lr=lr)
    start = new_row.detach().clone()
    for k, (grad,) in enumerate(after):
        apply(optimizer, [param], [grad])
        apply(reference, [old_rows], [grad[:4]])
        apply(fresh, [new_row], [grad[4:]])
        assert torch.equal(param[:4], old_rows) and torch.equal(param[4:], new_row)
        if k == 0:   # bias-corrected from its own step 0: a first update of exactly lr per entry
            torch.testing.assert_close((param[4] - start[0]).abs(), torch.full((6,), lr), rtol=1e-5, atol=0)


def test_selora_growth_pads_the_step_count_with_zeros():
    torch.manual_seed(2)
    layer = SeLoRALinear(torch.nn.Linear(8, 5))
    optimizer = Adam([layer.lora_A, layer.lora_B], lr=1e-2)
    x = torch.randn(4, 8)
    for _ in range(3):
        optimizer.zero_grad()
        layer(x).square().sum().backward()
        optimizer.step()
    layer.expand(optimizer)
    assert optimizer.state[layer.lora_A]["step"].tolist() == [[3.0] * 8, [0.0] * 8]
    assert optimizer.state[layer.lora_B]["step"].tolist() == [[3.0, 0.0]] * 5


def test_state_dict_round_trip_continues_exactly():
    torch.manual_seed(3)
    grads = gradients(20, SHAPES, seed=2)
    a = [torch.randn(s, requires_grad=True) for s in SHAPES]
    b = [p.detach().clone().requires_grad_() for p in a]
    opt_a = Adam(a, lr=1e-3)
    for step in grads[:10]:
        apply(opt_a, a, step)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in a], "optimizer": opt_a.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    for p, value in zip(b, saved["params"]):
        p.data.copy_(value)
    opt_b = Adam(b, lr=1e-3)
    opt_b.load_state_dict(saved["optimizer"])
    for step in grads[10:]:
        apply(opt_a, a, step)
        apply(opt_b, b, step)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_loads_torch_adam_state_with_its_one_step_count():
    torch.manual_seed(4)
    grads = gradients(12, SHAPES, seed=3)
    theirs = [torch.randn(s, requires_grad=True) for s in SHAPES]
    ours = [p.detach().clone().requires_grad_() for p in theirs]
    reference = torch.optim.Adam(theirs, lr=1e-3)
    for step in grads[:6]:
        apply(reference, theirs, step)
    for p, q in zip(ours, theirs):
        p.data.copy_(q.detach())
    optimizer = Adam(ours, lr=1e-3)
    optimizer.load_state_dict(copy.deepcopy(reference.state_dict()))   # as read from a checkpoint: not shared
    for step in grads[6:]:
        apply(reference, theirs, step)
        apply(optimizer, ours, step)
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))
    assert optimizer.state[ours[0]]["step"].shape == ours[0].shape


@pytest.mark.cuda
def test_step_runs_in_a_cuda_graph():
    """Captured once, replayed: the same parameters as eager steps (and as torch's Adam on CUDA, to
    float tolerance: its foreach path orders the update's products differently)."""
    torch.manual_seed(5)
    grads = [[g.cuda() for g in step] for step in gradients(8, SHAPES, seed=4)]
    eager = [torch.randn(s, device="cuda", requires_grad=True) for s in SHAPES]
    graphed = [p.detach().clone().requires_grad_() for p in eager]
    theirs = [p.detach().clone().requires_grad_() for p in eager]
    opt_eager, opt_graphed, reference = Adam(eager, lr=1e-3), Adam(graphed, lr=1e-3), torch.optim.Adam(theirs, lr=1e-3)
    static = [torch.zeros_like(p) for p in graphed]
    for p, g in zip(graphed, static):
        p.grad = g
    for step in grads[:3]:   # warm-up outside the graph creates the state
        apply(opt_eager, eager, step)
        apply(reference, theirs, step)
        for g, value in zip(static, step):
            g.copy_(value)
        opt_graphed.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_graphed.step()
    for step in grads[3:]:
        apply(opt_eager, eager, step)
        apply(reference, theirs, step)
        for g, value in zip(static, step):
            g.copy_(value)
        graph.replay()
    torch.cuda.synchronize()
    for a, b, c in zip(eager, graphed, theirs):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-7)
