"""SeLoRA's batch estimator (--fisher batch, the authors' code) against autograd's batch gradients."""
import pytest
import torch

from minisd.adapters import SeLoRAController
from minisd.errors import MinisdError
from helpers import rel_err
from test_selora import make_layer, plain


def network(layers, pairs, x):
    """Two adapted layers with a tanh between them; `pairs` gives each layer's (A, B)."""
    (l1, l2), ((A1, B1), (A2, B2)) = layers, pairs
    return plain(torch.tanh(plain(x, l1, A1, B1)), l2, A2, B2)


def test_batch_estimator_equals_autograd_batch_gradients():
    """F_A = Σ g_A², F_B = Σ g_B², F_new = Σ ‖g_new‖² over a window of two steps, where g is the step's
    gradient of the mean loss over two micro-batches (as train.py accumulates it), computed under two
    different loss scales; the reference is autograd through the plain layer math with each candidate
    as an explicit extra A row and a zero B column."""
    layers = make_layer(6, 9, 2, seed=1), make_layer(9, 4, 3, seed=2)
    names = ("l1", "l2")
    controller = SeLoRAController(dict(zip(names, layers)), lam=1.0, every=2, fisher_window=2, seed=4, fisher="batch")
    g = torch.Generator().manual_seed(3)
    expected = {name: [0.0, 0.0, 0.0] for name in names}
    for step, loss_scale in ((1, 1024.0), (2, 8.0)):
        controller.begin_step(step)
        micro = [(torch.randn(3, 5, 6, generator=g, dtype=torch.float64),
                  torch.randn(3, 5, 4, generator=g, dtype=torch.float64)) for _ in range(2)]

        full = [(torch.cat([l.lora_A.detach(), l.candidate[None]]).requires_grad_(),
                 torch.cat([l.lora_B.detach(), l.lora_B.new_zeros(l.out_features, 1)], 1).requires_grad_())
                for l in layers]
        loss = sum(((network(layers, full, x) - t) ** 2).mean() for x, t in micro) / len(micro)
        grads = torch.autograd.grad(loss, [p for pair in full for p in pair])
        for name, layer, g_A, g_B in zip(names, layers, grads[0::2], grads[1::2]):
            r = layer.rank
            expected[name][0] = expected[name][0] + g_A[:r] ** 2
            expected[name][1] = expected[name][1] + g_B[:, :r] ** 2
            expected[name][2] = expected[name][2] + (g_B[:, r] ** 2).sum()

        pairs = [(l.lora_A, l.lora_B) for l in layers]
        for x, t in micro:
            (loss_scale * ((layers[1](torch.tanh(layers[0](x))) - t) ** 2).mean() / len(micro)).backward()
        controller.end_backward(loss_scale)
        for name, layer in zip(names, layers):
            for got, want in zip((layer.fisher_A, layer.fisher_B, layer.fisher_new), expected[name]):
                assert rel_err(got, want) < 1e-10
        with torch.no_grad():   # an optimizer step, so that the window's two steps differ
            for A, B in pairs:
                for p in (A, B):
                    p -= 0.01 * p.grad / loss_scale
                    p.grad = None

    events = {e["layer"]: e["ratio"] for e in controller.end_step(2)}
    for name in names:
        orig = float(expected[name][0].sum() + expected[name][1].sum())
        assert events[name] == pytest.approx((orig + float(expected[name][2])) / orig, rel=1e-10)


def test_estimator_and_lambda_are_checked():
    with pytest.raises(MinisdError, match="--fisher must be one of sample, batch"):
        SeLoRAController({}, fisher="squared")
    with pytest.raises(MinisdError, match="--lambda must be at least 1"):
        SeLoRAController({}, lam=0.99)
