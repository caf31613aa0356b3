"""The adapter file: save/load round trips for every method, metadata, and errors that name the problem."""
import copy
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import minisd
from minisd.adapters import (adapted_layers, fingerprint, inject, load_adapter, read_adapter,
                             save_adapter, set_dylora_rank)
from minisd.errors import MinisdError
from helpers import random_model, rel_err



@pytest.fixture(scope="module")
def tiny():
    return random_model("tiny")


def trained(tiny, method, rank=3, convs=False):
    """A copy of the model with `method` injected and non-zero adapters (SeLoRA grown to several ranks)."""
    sd = copy.deepcopy(tiny)
    inject(sd, method, rank=rank, alpha=2.0, convs=convs)
    layers = adapted_layers(sd)
    if method == "selora":
        for i, layer in enumerate(layers.values()):
            for _ in range(i % 3):
                layer.expand()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in layers.values():
            for name, p in layer.named_parameters():
                if name.startswith("lora_"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
            if method == "adalora":
                layer.lora_E[::2] = 0  # masked triplets are left out of the file
    return sd


def outputs(sd):
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        ctx = sd.text_encoder(sd.tokenizer(["bilateral pleural effusions", "no acute disease"]))
        eps = sd.unet(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([5, 900]), ctx)
    return ctx, eps


@pytest.mark.parametrize("method", ["lora", "selora", "dylora", "adalora"])
def test_round_trip_reproduces_outputs(tiny, tmp_path, method):
    sd = trained(tiny, method, convs=method == "selora")
    path = tmp_path / "adapter.safetensors"
    history = [{"step": 40, "layer": "x", "ratio": 1.2, "rank": 2}]
    save_adapter(path, sd, method, alpha=2.0, args={"lr": 1e-4, "data": "phantom"}, rank_history=history)
    assert os.listdir(tmp_path) == ["adapter.safetensors"]  # written atomically: no temp file left

    fresh = copy.deepcopy(tiny)
    meta = load_adapter(fresh, path)
    assert meta["method"] == method and meta["alpha"] == 2.0 and meta["args"]["data"] == "phantom"
    assert meta["rank_history"] == history and meta["fingerprint"] == fingerprint(tiny)
    want = {name: layer.lora_pair()[0].shape[0] for name, layer in adapted_layers(sd).items()}
    assert meta["ranks"] == {name: r for name, r in want.items() if r > 0}
    assert {name: layer.rank for name, layer in adapted_layers(fresh).items()} == meta["ranks"]
    assert not any(p.requires_grad for n, p in fresh.named_parameters() if not n.endswith(("lora_A", "lora_B")))
    for got, expected in zip(outputs(fresh), outputs(sd)):
        if method == "adalora":  # the file holds Λ·Q as A and drops masked triplets: products round differently
            assert rel_err(got, expected) < 1e-5
        else:
            assert torch.equal(got, expected)


def test_loads_onto_a_half_precision_model(tiny, adapter_file):
    half = copy.deepcopy(tiny).to(torch.bfloat16)
    full = copy.deepcopy(tiny)
    load_adapter(half, adapter_file)
    load_adapter(full, adapter_file)
    layer = next(iter(adapted_layers(half).values()))
    assert layer.lora_A.dtype == torch.float32
    with torch.no_grad():
        ids = half.tokenizer(["cardiomegaly"])
        got, want = half.text_encoder(ids), full.text_encoder(ids)
    assert got.dtype == torch.bfloat16 and rel_err(got.float(), want) < 5e-2


def test_file_layout(tiny, tmp_path):
    sd = trained(tiny, "selora")
    path = tmp_path / "a.safetensors"
    save_adapter(path, sd, "selora", alpha=2.0)
    tensors = load_file(path)
    name = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    layer = adapted_layers(sd)[name]
    assert torch.equal(tensors[f"{name}.lora_A"], layer.lora_A) and torch.equal(tensors[f"{name}.lora_B"], layer.lora_B)
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_A" in tensors
    tensors_meta = read_adapter(path)[1]
    assert tensors_meta["scale"] == 2.0 and tensors_meta["format_version"] == 1


def test_dylora_file_holds_all_ranks(tiny, tmp_path):
    sd = trained(tiny, "dylora", rank=4)
    set_dylora_rank(adapted_layers(sd).values(), 2)
    save_adapter(tmp_path / "d.safetensors", sd, "dylora", alpha=2.0)
    assert set(read_adapter(tmp_path / "d.safetensors")[1]["ranks"].values()) == {4}


@pytest.fixture(scope="module")
def adapter_file(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("adapter") / "lora.safetensors"
    save_adapter(path, trained(tiny, "lora"), "lora", alpha=2.0)
    return path


def rewrite(src, dst, edit_tensors=None, edit_meta=None):
    tensors, meta = load_file(src), read_adapter(src)[1]
    raw = {k: v if isinstance(v, str) and k in ("format", "method", "fingerprint") else json.dumps(v) for k, v in meta.items()}
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(raw)
    save_file(tensors, dst, metadata=raw)
    return dst


def test_error_not_a_safetensors_file(tiny, tmp_path):
    bad = tmp_path / "notes.safetensors"
    bad.write_text("these are not tensors")
    with pytest.raises(MinisdError, match="notes.safetensors: not a safetensors file"):
        load_adapter(copy.deepcopy(tiny), bad)
    with pytest.raises(MinisdError, match="missing.safetensors: no such adapter file"):
        load_adapter(copy.deepcopy(tiny), tmp_path / "missing.safetensors")


def test_error_missing_metadata(tiny, adapter_file, tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file(load_file(adapter_file), path)
    with pytest.raises(MinisdError, match="plain.safetensors: not a minisd adapter file .*'format' missing"):
        load_adapter(copy.deepcopy(tiny), path)


def test_error_unknown_method(tiny, adapter_file, tmp_path):
    path = rewrite(adapter_file, tmp_path / "m.safetensors", edit_meta=lambda m: m.update(method="vera"))
    with pytest.raises(MinisdError, match="unknown adapter method 'vera'"):
        load_adapter(copy.deepcopy(tiny), path)


def test_error_layer_not_in_model(tiny, adapter_file, tmp_path):
    bogus = "model.diffusion_model.input_blocks.1.1.transformer_blocks.7.attn1.to_q"

    def add_layer(t):
        t[f"{bogus}.lora_A"], t[f"{bogus}.lora_B"] = torch.zeros(3, 32), torch.zeros(32, 3)

    def add_rank(m):
        m["ranks"] = json.dumps({**json.loads(m["ranks"]), bogus: 3})

    path = rewrite(adapter_file, tmp_path / "l.safetensors", add_layer, add_rank)
    sd = copy.deepcopy(tiny)
    with pytest.raises(MinisdError, match=f"layer {bogus} is not in the model"):
        load_adapter(sd, path)
    assert not adapted_layers(sd)  # nothing was injected before the error


def test_error_shape_mismatch_names_layer(tiny, adapter_file, tmp_path):
    name = "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1"

    def widen(t):
        t[f"{name}.lora_A"] = torch.zeros(3, 65)

    path = rewrite(adapter_file, tmp_path / "s.safetensors", widen)
    with pytest.raises(MinisdError, match=rf"layer {name}: lora_A has shape \[3, 65\], the model expects \[3, 64\]"):
        load_adapter(copy.deepcopy(tiny), path)


def test_error_unexpected_key(tiny, adapter_file, tmp_path):
    path = rewrite(adapter_file, tmp_path / "k.safetensors", lambda t: t.update({"something.alpha": torch.ones(())}))
    with pytest.raises(MinisdError, match="unexpected key something.alpha"):
        load_adapter(copy.deepcopy(tiny), path)


def test_error_non_finite_values_name_the_key(tiny, adapter_file, tmp_path):
    from minisd.export import fold
    from minisd.medlego import merge_adapters
    name = "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.lora_B"

    def poison(t):
        t[name] = t[name].clone()
        t[name][0, 0], t[name][0, 1] = float("nan"), float("inf")

    path = rewrite(adapter_file, tmp_path / "n.safetensors", poison)
    message = f"{name} holds non-finite values"
    for use in (lambda: load_adapter(copy.deepcopy(tiny), path),   # was: black images from sample.py
                lambda: fold(copy.deepcopy(tiny), path, tmp_path / "folded.safetensors"),   # was: a NaN checkpoint
                lambda: merge_adapters([path, adapter_file], tmp_path / "merged.safetensors")):   # was: linalg.svd died
        with pytest.raises(MinisdError, match=message):
            use()


def test_error_adapter_onto_adapted_model(tiny, adapter_file):
    sd = copy.deepcopy(tiny)
    load_adapter(sd, adapter_file)
    with pytest.raises(MinisdError, match="already has an adapter at"):
        load_adapter(sd, adapter_file)


def test_fingerprint_follows_the_base_not_its_dtype(tiny):
    assert fingerprint(tiny) == fingerprint(copy.deepcopy(tiny).to(torch.bfloat16))
    assert fingerprint(tiny) != fingerprint(minisd.build("tiny", seed=7))


def test_fingerprint_mismatch_warns_and_loads(adapter_file):
    other = minisd.build("tiny", seed=7)
    with pytest.warns(UserWarning, match="fingerprint mismatch"):
        load_adapter(other, adapter_file)
    assert adapted_layers(other)


LAYER = "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1"


def as_int(t):
    t[f"{LAYER}.lora_A"] = t[f"{LAYER}.lora_A"].to(torch.int32)


def no_layers(t):
    t.clear()


@pytest.mark.parametrize("edit_tensors, fields, message", [
    (as_int, {}, f"{LAYER}.lora_A has dtype int32; adapter weights are floating point"),   # was: loaded as integers
    (None, {"alpha": '"two"'}, "malformed metadata: alpha 'two' is not a finite number"),   # was: a TypeError
    (None, {"scale": "NaN"}, "malformed metadata: scale nan is not a finite number"),        # was: NaN images
    (None, {"format_version": "null"}, "malformed metadata: format_version None is not a version number"),
    (None, {"ranks": "[3]"}, "malformed metadata: ranks is a list, not {layer: rank}"),
    (None, {"ranks": json.dumps({LAYER: 3.0})}, f"malformed metadata: the rank of {LAYER} is 3.0, not a whole number"),
    (None, {"args": "[1]"}, "malformed metadata: args is a list, not a dict"),               # was: adapter.py info died
    (no_layers, {"ranks": "{}"}, "the adapter has no layers"),                              # was: a silent no-op
])
def test_error_malformed_metadata_values_and_dtypes(tiny, adapter_file, tmp_path, edit_tensors, fields, message):
    path = rewrite(adapter_file, tmp_path / "bad.safetensors", edit_tensors, lambda m: m.update(fields))
    with pytest.raises(MinisdError, match=f"^{path}: {re.escape(message)}$"):
        load_adapter(copy.deepcopy(tiny), path)
