"""LoRA against peft, 1×1 convs, injection into the tiny model, merge, DyLoRA and AdaLoRA."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minisd.adapters import (AdaLoRAController, AdaLoRALinear, AdapterLayer, DyLoRALinear, LoRALinear, SeLoRAController,
                             SeLoRALinear, adapted_layers, inject, merge, sample_dylora_rank, set_dylora_rank)
from minisd.errors import MinisdError
from helpers import random_model, rel_err

peft = pytest.importorskip("peft")



def randomize(layers, seed=0, std=0.1):
    """Give every adapter a non-zero update, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            for name, p in layer.named_parameters():
                if name.startswith("lora_"):
                    p.copy_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))


# ---- LoRA ----

def test_lora_linear_equals_peft():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 10))
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=3, target_modules=["0"]))
    theirs = model.base_model.model[0]
    ours = LoRALinear(copy.deepcopy(base[0]), rank=4, alpha=3)
    with torch.no_grad():
        theirs.lora_B["default"].weight.normal_()
        ours.lora_A.copy_(theirs.lora_A["default"].weight)
        ours.lora_B.copy_(theirs.lora_B["default"].weight)
    x = torch.randn(3, 5, 12)
    y_ours, y_theirs = ours(x), model(x)
    assert rel_err(y_ours, y_theirs) < 1e-6
    y_ours.square().sum().backward()
    y_theirs.square().sum().backward()
    assert rel_err(ours.lora_A.grad, theirs.lora_A["default"].weight.grad) < 1e-5
    assert rel_err(ours.lora_B.grad, theirs.lora_B["default"].weight.grad) < 1e-5


def test_lora_conv1x1_equals_peft():
    torch.manual_seed(1)
    base = nn.Sequential(nn.Conv2d(8, 6, 1))
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=3, lora_alpha=2, target_modules=["0"]))
    theirs = model.base_model.model[0]
    ours = LoRALinear(copy.deepcopy(base[0]), rank=3, alpha=2)
    with torch.no_grad():
        theirs.lora_B["default"].weight.normal_()
        ours.lora_A.copy_(theirs.lora_A["default"].weight.flatten(1))
        ours.lora_B.copy_(theirs.lora_B["default"].weight.flatten(1))
    x = torch.randn(2, 8, 5, 7)
    assert rel_err(ours(x), model(x)) < 1e-6
    assert set(ours.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}


def test_selora_conv_treats_pixels_as_tokens():
    torch.manual_seed(2)
    conv = nn.Conv2d(6, 5, 1).double()
    lin = nn.Linear(6, 5).double()
    lin.weight.data, lin.bias.data = conv.weight.data.flatten(1).clone(), conv.bias.data.clone()
    a, b = SeLoRALinear(conv), SeLoRALinear(lin)
    b.lora_A.data = a.lora_A.data.clone()
    for layer in (a, b):
        layer.lora_B.data.normal_(generator=torch.Generator().manual_seed(0))
        layer.candidate = a.candidate.clone()
        layer.track_fisher = True
    x = torch.randn(3, 6, 4, 2, dtype=torch.float64)
    tokens = x.flatten(2).transpose(1, 2)  # [N, H·W, C]
    ya, yb = a(x), b(tokens)
    assert rel_err(ya.flatten(2).transpose(1, 2), yb) < 1e-12
    ya.square().sum().backward()
    yb.square().sum().backward()
    for name in ("fisher_A", "fisher_B", "fisher_new"):
        assert rel_err(getattr(a, name), getattr(b, name)) < 1e-12


# ---- injection into the tiny model ----

@pytest.fixture(scope="module")
def tiny():
    return random_model("tiny")


def text_inputs(sd):
    return sd.tokenizer(["a chest x-ray with a small left effusion", ""])


def test_inject_counts_freezes_and_keeps_keys(tiny):
    sd = copy.deepcopy(tiny)
    keys = {part: set(getattr(sd, part).state_dict()) for part in ("unet", "text_encoder", "vae")}
    linears = {part: sum(isinstance(m, nn.Linear) for m in getattr(sd, part).modules()) for part in ("unet", "text_encoder")}
    ids = text_inputs(sd)
    before = sd.text_encoder(ids)
    summary = inject(sd, "selora", alpha=1.0)
    assert summary["layers"] == linears and summary["method"] == "selora"
    layers = adapted_layers(sd)
    assert len(layers) == sum(linears.values())
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q" in layers
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj" in layers
    trainable = {n for n, p in sd.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for n in trainable)
    assert summary["trainable_params"] == sum(p.numel() for p in sd.parameters() if p.requires_grad)
    for part in ("unet", "text_encoder"):
        new = set(getattr(sd, part).state_dict())
        assert keys[part] <= new and all(k.endswith((".lora_A", ".lora_B")) for k in new - keys[part])
    assert set(sd.vae.state_dict()) == keys["vae"]
    assert not any(isinstance(m, AdapterLayer) for m in sd.vae.modules())
    assert rel_err(sd.text_encoder(ids), before) < 1e-6  # B = 0: the injected model is the base model
    with pytest.raises(MinisdError, match="already has adapters"):
        inject(sd, "lora")


def test_inject_options(tiny):
    sd = copy.deepcopy(tiny)
    summary = inject(sd, "lora", rank=2, convs=True, text_encoder=False)
    assert "text_encoder" not in summary["layers"]
    assert not any(p.requires_grad for p in sd.text_encoder.parameters())
    names = adapted_layers(sd)
    convs = [n for n, layer in names.items() if layer.is_conv]
    assert convs and all(n.endswith(("proj_in", "proj_out")) for n in convs)
    assert all(n.startswith("model.diffusion_model.") for n in names)
    with pytest.raises(MinisdError, match="unknown adapter method 'qlora'"):
        inject(copy.deepcopy(tiny), "qlora")


@pytest.mark.parametrize("method", ["lora", "selora", "dylora", "adalora"])
def test_merge_folds_adapters_into_plain_layers(tiny, method):
    sd = copy.deepcopy(tiny)
    keys = set(sd.text_encoder.state_dict())
    inject(sd, method, rank=3)
    randomize(adapted_layers(sd).values())
    ids = text_inputs(sd)
    with torch.no_grad():
        adapted = sd.text_encoder(ids)
        base = tiny.text_encoder(ids)
    merge(sd)
    assert not adapted_layers(sd)
    assert set(sd.text_encoder.state_dict()) == keys
    assert type(sd.text_encoder.get_submodule("text_model.encoder.layers.0.self_attn.q_proj")) is nn.Linear
    with torch.no_grad():
        merged = sd.text_encoder(ids)
    assert rel_err(merged, adapted) < 1e-5 and rel_err(merged, base) > 1e-3


def test_selora_on_the_tiny_unet_grows_without_changing_outputs(tiny):
    sd = copy.deepcopy(tiny)
    inject(sd, "selora", convs=True)
    layers = adapted_layers(sd)
    randomize(layers.values(), std=0.05)
    controller = SeLoRAController(layers, lam=1.0, every=1)
    opt = torch.optim.AdamW([p for p in sd.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    latents, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 64, generator=g)
    t = torch.tensor([10, 700])
    controller.begin_step(1)
    F.mse_loss(sd.unet(latents, t, ctx), torch.randn(2, 4, 8, 8, generator=g)).backward()
    ratios = [layer.fisher_ratio() for name, layer in layers.items() if name.startswith("model.diffusion_model.")]
    assert all(r >= 1.0 for r in ratios) and sum(r > 1.0 for r in ratios) > 0.9 * len(ratios)
    opt.step()
    with torch.no_grad():
        before = sd.unet(latents, t, ctx)
    events = controller.end_step(1, opt)
    assert len(events) == sum(r > 1.0 for r in ratios)
    with torch.no_grad():
        after = sd.unet(latents, t, ctx)
    assert rel_err(after, before) < 1e-5


# ---- DyLoRA ----

def test_dylora_truncations_are_nested():
    torch.manual_seed(3)
    layer = DyLoRALinear(nn.Linear(9, 7).double(), rank=4, alpha=2.0)
    randomize([layer])
    x = torch.randn(5, 9, dtype=torch.float64)
    base = F.linear(x, layer.weight, layer.bias)
    outputs = {}
    for b in range(1, 5):
        set_dylora_rank([layer], b)
        outputs[b] = layer(x)
    for b in range(1, 4):  # (y_b - y_0)·b/alpha is Σ_{i<b} B_i A_i x: consecutive ranks differ by one component
        step = (outputs[b + 1] - base) * (b + 1) / 2.0 - (outputs[b] - base) * b / 2.0
        component = torch.outer(x @ layer.lora_A[b], layer.lora_B[:, b])
        assert rel_err(step, component) < 1e-10


def test_dylora_training_gives_a_usable_model_at_every_rank():
    g = torch.Generator().manual_seed(4)
    l1, l2 = nn.Linear(10, 12), nn.Linear(12, 8)
    torch.manual_seed(4)
    layers = [DyLoRALinear(l1, rank=4, alpha=4.0), DyLoRALinear(l2, rank=4, alpha=4.0)]
    delta = torch.randn(8, 3, generator=g) @ torch.randn(3, 12, generator=g) / 2
    x = torch.randn(128, 10, generator=g)
    with torch.no_grad():
        y = torch.tanh(l1(x)) @ (l2.weight + delta).T + l2.bias

    def loss():
        return ((layers[1](torch.tanh(layers[0](x))) - y) ** 2).mean()

    base_loss = loss().item()
    opt = torch.optim.Adam([p for layer in layers for p in (layer.lora_A, layer.lora_B)], lr=1e-2)
    drawn = set()
    for _ in range(150):
        b = sample_dylora_rank(layers, g)
        drawn.add(b)
        assert all(layer.active_rank == b for layer in layers)
        opt.zero_grad()
        loss().backward()
        assert not layers[0].lora_B.grad[:, b:].any()  # ranks beyond b do not take part
        opt.step()
    assert drawn == {1, 2, 3, 4}
    with torch.no_grad():
        for b in range(1, 5):
            set_dylora_rank(layers, b)
            assert loss().isfinite() and loss().item() < 0.5 * base_loss
    set_dylora_rank(layers)
    assert layers[0].active_rank == 4


# ---- AdaLoRA ----

def test_adalora_layer_is_p_lambda_q():
    torch.manual_seed(5)
    layer = AdaLoRALinear(nn.Linear(6, 5).double(), init_rank=4, alpha=2.0)
    randomize([layer])
    with torch.no_grad():
        layer.lora_E[1] = 0
    x = torch.randn(3, 6, dtype=torch.float64)
    P, E, Q = layer.lora_B, layer.lora_E, layer.lora_A
    want = F.linear(x, layer.weight, layer.bias) + 0.5 * x @ (P @ torch.diag(E) @ Q).T
    assert rel_err(layer(x), want) < 1e-12
    A, B, scale = layer.lora_pair()
    assert A.shape == (3, 6) and B.shape == (5, 3) and scale == 0.5 and layer.rank == 3
    assert rel_err(F.linear(x, layer.weight, layer.bias) + scale * x @ (B @ A).T, want) < 1e-12


def test_adalora_budget_schedule_is_cubic():
    layers = {f"l{i}": AdaLoRALinear(nn.Linear(8, 8), init_rank=6) for i in range(3)}
    c = AdaLoRAController(layers, total_steps=100, target_rank=4, tinit=10, tfinal=20, delta_t=5)
    budgets = [c.budget_schedule(s)[0] for s in range(1, 101)]
    assert budgets[:10] == [18] * 10 and budgets[79:] == [12] * 21
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))
    assert budgets[19] == int(6 * (1 - 10 / 70) ** 3 + 12) == 15  # step 20
    assert [s for s in range(11, 80) if c.budget_schedule(s)[1]] == list(range(15, 80, 5))


def test_adalora_reaches_the_target_budget_and_orthogonalises():
    g = torch.Generator().manual_seed(6)
    torch.manual_seed(6)
    bases = [nn.Linear(10, 12), nn.Linear(12, 12), nn.Linear(12, 8)]
    layers = {f"l{i}": AdaLoRALinear(base, init_rank=6, alpha=6.0) for i, base in enumerate(bases)}
    x = torch.randn(64, 10, generator=g)
    with torch.no_grad():
        y = bases[2](torch.tanh(bases[1](torch.tanh(bases[0](x))))) + 0.3 * torch.randn(64, 8, generator=g)

    def forward():
        h = x
        for i, layer in enumerate(layers.values()):
            h = layer(h) if i == 2 else torch.tanh(layer(h))
        return h

    total = 120
    c = AdaLoRAController(layers, total_steps=total, target_rank=4, tinit=10, tfinal=20, delta_t=5)
    opt = torch.optim.Adam([p for layer in layers.values() for p in layer.parameters() if p.requires_grad], lr=5e-3)
    reg_start = c.regularizer().item()
    for step in range(1, total + 1):
        opt.zero_grad()
        (((forward() - y) ** 2).mean() + c.regularizer()).backward()
        opt.step()
        budget = c.update_and_allocate(step)
        if step <= 10:
            assert budget == 18 and c.total_rank() == 18
    assert budget == 12 and c.total_rank() == 12
    for name, layer in layers.items():
        assert torch.equal(layer.lora_E != 0, c.masks[name])  # masked triplets stay at zero to the end
    assert sum(layer.rank for layer in layers.values()) == 12
    assert c.regularizer().item() < 0.5 * reg_start
    state = c.state_dict()
    c2 = AdaLoRAController(layers, total_steps=total, target_rank=4, tinit=10, tfinal=20, delta_t=5)
    c2.load_state_dict(state)
    assert c2.ranks() == c.ranks()
    assert all(torch.equal(c2.sensitivity[k], v) for k, v in c.sensitivity.items())


def test_adalora_rejects_impossible_schedules():
    layers = {"l": AdaLoRALinear(nn.Linear(4, 4), init_rank=6)}
    with pytest.raises(MinisdError, match="more steps"):
        AdaLoRAController(layers, total_steps=10, tinit=5, tfinal=5)
    with pytest.raises(MinisdError, match="at least 2 before its final budget"):   # no importance to mask by
        AdaLoRAController(layers, total_steps=1)
