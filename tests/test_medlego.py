"""Med-LEGO merge against the dense truncated SVD of the weighted sum of the adapters' updates."""
import copy
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from minisd.adapters import adapted_layers, inject, load_adapter, read_adapter, save_adapter
from minisd.errors import MinisdError
from minisd.medlego import merge_adapters
from helpers import load_script, random_model, rel_err




@pytest.fixture(scope="module")
def base():
    return random_model("tiny")


def make_adapter(base, path, method, seed, alpha, rank=2, text_encoder=True, convs=False):
    """A trained-looking adapter file: random non-zero factors, SeLoRA grown to mixed ranks 1..4."""
    sd = copy.deepcopy(base)
    inject(sd, method, rank=rank, alpha=alpha, convs=convs, text_encoder=text_encoder)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted_layers(sd).values():
            if method == "selora":
                for _ in range(int(torch.randint(0, 4, (1,), generator=g))):
                    layer.expand()
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
    save_adapter(path, sd, method, alpha=alpha)
    return path


@pytest.fixture(scope="module")
def sources(base, tmp_path_factory):
    """Three adapters of different methods, scales and ranks; the third has no text-encoder or conv layers."""
    folder = tmp_path_factory.mktemp("sources")
    return [make_adapter(base, folder / "selora.safetensors", "selora", 1, alpha=2.0, convs=True),
            make_adapter(base, folder / "lora.safetensors", "lora", 2, alpha=3.0, rank=3, convs=True),
            make_adapter(base, folder / "unet_only.safetensors", "lora", 3, alpha=1.0, rank=2, text_encoder=False)]


def deltas(path):
    """{layer: scale · B A} in float64 of an adapter file."""
    tensors, meta = read_adapter(path)
    return {name: meta["scale"] * tensors[f"{name}.lora_B"].double() @ tensors[f"{name}.lora_A"].double()
            for name in meta["ranks"]}


def weighted_sum(paths, weights):
    total = {}
    for path, w in zip(paths, weights):
        for name, delta in deltas(path).items():
            total[name] = total.get(name, 0) + w * delta
    return total


def dense_truncation(delta, energy=None, rank=None):
    """(rank, kept ΔW, kept energy) by the dense SVD: the fewest σ whose σ² reach `energy` of Σσ², or `rank`."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    fraction = torch.cumsum(S ** 2, 0) / (S ** 2).sum()
    k = rank if rank is not None else int(torch.nonzero(fraction >= energy - 1e-12)[0]) + 1
    return k, U[:, :k] @ torch.diag(S[:k]) @ Vh[:k], float(fraction[k - 1])


@pytest.mark.parametrize("energy, rank", [(0.8, None), (0.95, None), (None, 2)])
def test_equals_dense_truncated_svd(sources, tmp_path, energy, rank):
    weights = [0.5, 0.3, 0.2]
    report = merge_adapters(sources, tmp_path / "m.safetensors", weights=weights, energy=energy, rank=rank)
    merged = deltas(tmp_path / "m.safetensors")
    expected = weighted_sum(sources, weights)
    assert set(merged) == set(expected) == set(report["layers"])
    for name, delta in expected.items():
        k, kept, kept_energy = dense_truncation(delta, energy, rank)
        assert report["layers"][name]["rank"] == k, name
        assert rel_err(merged[name], kept) < 1e-5, name
        assert abs(report["layers"][name]["kept_energy"] - kept_energy) < 1e-9, name
    _, meta = read_adapter(tmp_path / "m.safetensors")
    assert meta["method"] == "lora" and meta["scale"] == 1.0
    assert meta["ranks"] == {name: info["rank"] for name, info in report["layers"].items()}
    assert meta["merge"]["sources"][2]["path"] == str(sources[2]) and meta["merge"]["weights"] == weights


def test_energy_one_reproduces_the_weighted_mean(sources, tmp_path):
    report = merge_adapters(sources, tmp_path / "m.safetensors", energy=1.0)
    merged = deltas(tmp_path / "m.safetensors")
    for name, delta in weighted_sum(sources, [1 / 3] * 3).items():
        assert rel_err(merged[name], delta) < 1e-5, name
        assert report["layers"][name]["rank"] == torch.linalg.matrix_rank(delta), name
    assert report["kept_energy"] == pytest.approx(1.0)


def test_merge_with_itself_is_the_same_update(sources, tmp_path):
    report = merge_adapters([sources[0], sources[0]], tmp_path / "m.safetensors", weights=[0.5, 0.5])
    merged, original = deltas(tmp_path / "m.safetensors"), deltas(sources[0])
    ranks = read_adapter(sources[0])[1]["ranks"]
    for name, delta in original.items():
        assert rel_err(merged[name], delta) < 1e-5, name
        assert report["layers"][name]["rank"] == ranks[name] and report["layers"][name]["source_rank"] == 2 * ranks[name]


def test_output_loads_onto_the_model(base, sources, tmp_path):
    weights = [0.01, 0.02, 0.03]   # an update of a trained adapter's size: fp32 round-off stays small through the model
    merge_adapters(sources, tmp_path / "m.safetensors", weights=weights)
    sd = copy.deepcopy(base)
    load_adapter(sd, tmp_path / "m.safetensors")
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for name, delta in weighted_sum(sources, weights).items():
            part = "unet" if name.startswith("model.diffusion_model.") else "text_encoder"
            local = name.split(".", 2)[2] if part == "unet" else name[len("cond_stage_model.transformer."):]
            weight = getattr(reference, part).get_submodule(local).weight
            weight += delta.view_as(weight).float()
    g = torch.Generator().manual_seed(0)
    ids, x, t = sd.tokenizer(["a chest x-ray"]), torch.randn(1, 4, 8, 8, generator=g), torch.tensor([400])
    with torch.no_grad():
        got = sd.text_encoder(ids), sd.unet(x, t, sd.text_encoder(ids))
        want = reference.text_encoder(ids), reference.unet(x, t, reference.text_encoder(ids))
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("kwargs, message", [
    ({"energy": 0.0}, r"--energy must be in \(0, 1\], got 0.0"),
    ({"energy": 1.5}, r"--energy must be in \(0, 1\], got 1.5"),
    ({"rank": 0}, "--rank must be at least 1, got 0"),
    ({"energy": 0.9, "rank": 2}, "give --energy or --rank, not both"),
    ({"weights": [1.0]}, r"--weights: 1 value\(s\) for 2 adapter\(s\)"),
    ({"weights": [0.0, 0.0]}, "the merged update is zero in every layer"),
])
def test_bad_arguments(sources, tmp_path, kwargs, message):
    with pytest.raises(MinisdError, match=message):
        merge_adapters(sources[:2], tmp_path / "m.safetensors", **kwargs)
    assert not os.path.exists(tmp_path / "m.safetensors")


def test_layers_of_different_shapes_are_named(sources, tmp_path):
    name = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q"
    tensors = load_file(sources[1])
    (out, rank), n_in = tensors[f"{name}.lora_B"].shape, tensors[f"{name}.lora_A"].shape[1]
    tensors[f"{name}.lora_A"] = torch.ones(rank, 5)
    with safe_open(sources[1], "pt") as f:
        save_file(tensors, tmp_path / "odd.safetensors", metadata=f.metadata())
    with pytest.raises(MinisdError, match=f"odd.safetensors: layer {name} is {out}x5, but {out}x{n_in} in .*selora.safetensors"):
        merge_adapters([sources[0], tmp_path / "odd.safetensors"], tmp_path / "m.safetensors")


@pytest.fixture(scope="module")
def cli():
    return load_script("adapter.py").main


def test_cli_merge(sources, cli, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    cli(["merge", *map(str, sources), "--out", str(out), "--weights", "0.5", "0.3", "0.2", "--energy", "0.9"])
    table = capsys.readouterr().out
    _, meta = read_adapter(out)
    assert f"wrote {out}" in table and meta["merge"]["energy"] == 0.9
    row = next(line for line in table.splitlines() if line.startswith("model.diffusion_model.time_embed.0 "))
    assert int(row.split()[2]) == meta["ranks"]["model.diffusion_model.time_embed.0"]
    cli(["info", str(out)])
    assert "merge of" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["{a}", "{tmp}/missing.safetensors"], "missing.safetensors: no such adapter file"),
    (["{a}", "{tmp}/plain.safetensors"], "plain.safetensors: not a minisd adapter file"),
    (["{a}", "{a}", "--energy", "1.2"], r"--energy must be in (0, 1], got 1.2"),
    (["{a}", "{a}", "--weights", "1", "2", "3"], "--weights: 3 value(s) for 2 adapter(s)"),
])
def test_cli_bad_input_is_one_line(sources, cli, tmp_path, capsys, args, message):
    save_file({"x": torch.zeros(1)}, tmp_path / "plain.safetensors")
    args = [a.format(a=sources[0], tmp=tmp_path) for a in args]
    with pytest.raises(SystemExit) as e:
        cli(["merge", *args, "--out", str(tmp_path / "m.safetensors")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
