"""train.py end to end on the tiny model and phantom data: run folder, growth, resume, processes, errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import ROOT, load_script

# Small but not degenerate: 128 px keeps every attention level above one latent pixel (with a single
# token, q/k gradients vanish and their Fisher terms would be rounding noise).
FAST = ["--model", "tiny", "--data", "phantom", "--resolution", "128", "--batch-size", "2", "--expand-every", "2",
        "--val-max", "4", "--val-images", "1", "--val-steps", "3"]


def train(cwd, *args, env=None, check=True):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *FAST, *args], cwd=cwd, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def log(run):
    with open(os.path.join(run, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def equal_adapters(a, b):
    a, b = load_file(a), load_file(b)
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("demo")
    r = train(cwd, "--max-steps", "4", "--run-name", "demo")
    return cwd / "runs" / "demo", r


def test_run_folder_holds_everything(demo):
    run, r = demo
    for name in ["args.json", "manifest_train.jsonl", "manifest_val.jsonl", "manifest_test.jsonl", "log.jsonl",
                 "checkpoint.pt", "adapter.safetensors", "adapter_last.safetensors", "ranks_unet.png",
                 "ranks_text_encoder.png", "ranks_best_unet.png", "ranks_best_text_encoder.png", "summary.json",
                 "loss.png", "samples/step000004.png"]:
        assert (run / name).exists(), name
    args = json.load(open(run / "args.json"))
    assert args["model"] == "tiny" and args["data"] == "phantom" and args["adapter"].endswith("adapter.safetensors")
    assert (args["data_seed"], args["fisher"], args["cfg_dropout"], args["preset"]) == (0, "sample", 0.0, None)
    records = log(run)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(k in steps[0] for k in ("loss", "lr", "images_per_s", "total_rank"))
    assert any(r.get("event") == "validation" and r["val_loss"] > 0 for r in records)
    grown = [r for r in records if r.get("event") == "expand"]
    assert grown and {r["step"] for r in grown} <= {2, 4} and all(r["ratio"] >= 1.1 for r in grown)
    assert steps[-1]["total_rank"] > steps[0]["total_rank"]
    assert "total rank" in r.stdout


def test_summary_records_what_the_tables_report(demo):
    """summary.json: parameters per part, wall time, peak memory, best and last adapters; the best adapter's
    metadata holds its step and validation loss."""
    run, _ = demo
    from minisd.adapters import read_adapter
    summary = json.load(open(run / "summary.json"))
    assert summary["finished"] and summary["step"] == summary["total_steps"] == 4
    assert summary["wall_time_s"] > 0 and summary["peak_memory"]["bytes"] > 2**20
    assert summary["peak_memory"]["measure"] == "max_rss"
    validations = [x for x in log(run) if x.get("event") == "validation"]
    best = min(validations, key=lambda x: x["val_loss"])
    tensors, meta = read_adapter(str(run / "adapter.safetensors"))
    assert (meta["step"], meta["val_loss"]) == (summary["best"]["step"], summary["best"]["val_loss"]) == (best["step"], best["val_loss"])
    assert summary["best"]["ranks"] == meta["ranks"]
    assert summary["best"]["heatmaps"] == {"unet": "ranks_best_unet.png", "text_encoder": "ranks_best_text_encoder.png"}
    last = summary["last"]
    assert last["adapter"] == "adapter_last.safetensors" and last["step"] == 4
    assert last["ranks"] == read_adapter(str(run / "adapter_last.safetensors"))[1]["ranks"]
    trainable = {"unet": 0, "text_encoder": 0}
    for key, t in tensors.items():
        trainable["unet" if key.startswith("model.diffusion_model.") else "text_encoder"] += t.numel()
    for part, n in trainable.items():
        counts = summary["best"]["parameters"][part]
        assert counts["trainable"] == n and counts["percent"] == pytest.approx(100 * n / counts["total"])
    assert summary["best"]["parameters"]["all"]["trainable"] == sum(trainable.values())


def test_adapter_records_ranks_and_history(demo):
    run, _ = demo
    from minisd.adapters import read_adapter
    tensors, meta = read_adapter(str(run / "adapter_last.safetensors"))
    grown = [r for r in log(run) if r.get("event") == "expand"]
    assert meta["method"] == "selora" and len(meta["rank_history"]) == len(grown)
    final = {r["layer"]: r["rank"] for r in grown}
    for layer, rank in final.items():
        assert tensors[layer + ".lora_A"].shape[0] == rank


def test_sample_reproduces_a_validation_image(demo, tmp_path):
    run, _ = demo
    prompt = json.loads(open(run / "manifest_val.jsonl").readline())["prompt"]
    (tmp_path / "0007-seed7.png").write_bytes(b"")   # an earlier call's image, not this call's
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--run", "runs/demo/", "--prompt", prompt, "--steps", "3",
                        "--height", "128", "--width", "128", "--seed", "0", "--out", str(tmp_path)],
                       cwd=run.parent.parent, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ours = torch.tensor(list(Image.open(tmp_path / "0000-seed0.png").getdata())).float()
    grid = Image.open(run / "samples" / "step000004.png").crop((2, 2, 130, 130))
    theirs = torch.tensor(list(grid.getdata())).float()
    assert (ours - theirs).abs().max() <= 2   # the same image, up to uint8 rounding of float noise
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0000-seed0.png", "grid.png", "prompts.json"]


def test_kill_and_resume_ends_with_the_same_adapter(tmp_path):
    train(tmp_path, "--max-steps", "10", "--save-every", "3", "--run-name", "straight")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *FAST, "--max-steps", "10", "--save-every", "3", "--run-name", "killed"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    logfile = tmp_path / "runs" / "killed" / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if logfile.exists() and any(r.get("step", 0) >= 4 for r in log(logfile.parent)):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert not (logfile.parent / "adapter_last.safetensors").exists(), "the run finished before it could be killed"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--resume", "killed"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert equal_adapters(tmp_path / "runs" / "straight" / "adapter_last.safetensors",
                          tmp_path / "runs" / "killed" / "adapter_last.safetensors")
    assert [x["step"] for x in log(tmp_path / "runs" / "killed") if "loss" in x] == list(range(1, 11))


def test_lambda_orders_growth(tmp_path):
    totals = {}
    # λ = 1e6, not 100: with B still near zero at the first test, a layer whose initial A row is nearly
    # orthogonal to its inputs can legitimately reach an FI-ratio in the hundreds.
    for lam in ("1.0", "1.3", "1e6"):
        r = train(tmp_path, "--max-steps", "4", "--val-images", "0", "--lambda", lam, "--run-name", f"lam{lam}")
        assert ("warning: --lambda 1: every FI-ratio is at least 1" in r.stderr) == (lam == "1.0")
        totals[lam] = [r for r in log(tmp_path / "runs" / f"lam{lam}") if "loss" in r][-1]["total_rank"]
    n_layers = [r for r in log(tmp_path / "runs" / "lam1e6") if "loss" in r][0]["total_rank"]
    assert totals["1.0"] >= totals["1.3"] > totals["1e6"] == n_layers


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    """With the batch estimator: the candidates' gradients are averaged with the parameters' ones."""
    common = ["--max-steps", "4", "--val-images", "0", "--fisher", "batch"]
    train(tmp_path, *common, "--batch-size", "2", "--run-name", "one")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", os.path.join(ROOT, "train.py"),
                        *FAST, *common, "--batch-size", "1", "--run-name", "two"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = load_file(tmp_path / "runs" / "one" / "adapter_last.safetensors"), load_file(tmp_path / "runs" / "two" / "adapter_last.safetensors")
    assert {k: v.shape for k, v in one.items()} == {k: v.shape for k, v in two.items()}   # the same growth decisions
    for k in one:
        # Adam divides by the root of tiny second moments: rounding differences of the all-reduce show up
        # as small absolute differences in the entries, bounded by a few learning-rate steps.
        assert (one[k] - two[k]).abs().max() <= 1e-5 + 1e-3 * one[k].abs().max(), k
    losses = lambda run: [x["loss"] for x in log(tmp_path / "runs" / run) if "loss" in x]
    assert losses("one") == pytest.approx(losses("two"), rel=1e-4)


@pytest.mark.parametrize("args, expect", [
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--resolution", "100"], "--resolution must be a multiple of 8"),
    (["--data", "iuxray", "--data-root", "/nonexistent/iu"], "/nonexistent/iu"),
    (["--precision", "fp16", "--device", "cpu"], "fp16 needs a GPU"),
    (["--resume", "nothing-here"], "runs/nothing-here/args.json: missing"),
    (["--model", "/no/such/model.safetensors"], "/no/such/model.safetensors"),
])
def test_bad_input_is_one_line(tmp_path, args, expect):
    r = train(tmp_path, "--max-steps", "1", *args, check=False)
    assert r.returncode == 2
    lines = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expect in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_preset_with_explicit_flags_and_warnings(tmp_path, monkeypatch):
    """--preset authors fills what was not given; args.json records the resolved values. A run shorter than
    the test interval is warned about."""
    script = load_script("train.py")
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match=r"SeLoRA tests ranks every 3 steps \(--expand-every\) and this run has 1 "):
        script.main([*FAST, "--max-steps", "1", "--val-images", "0", "--val-max", "1", "--preset", "authors",
                     "--alpha", "2", "--expand-every", "3", "--run-name", "authors"])
    args = json.load(open(tmp_path / "runs" / "authors" / "args.json"))
    assert (args["preset"], args["alpha"], args["lam"], args["cfg_dropout"], args["fisher"]) == ("authors", 2.0, 1.3, 0.0, "batch")


def test_non_finite_loss_stops_with_the_last_checkpoint_intact(tmp_path, monkeypatch, capsys):
    from minisd import training
    script = load_script("train.py")
    finite = training.Trainer.loss

    def loss(self, items, draws, with_grad=True):
        value = finite(self, items, draws, with_grad)
        return value * float("nan") if with_grad and self.step == 2 else value

    monkeypatch.setattr(training.Trainer, "loss", loss)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        script.main([*FAST, "--max-steps", "6", "--save-every", "2", "--val-images", "0", "--run-name", "nan"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "error: non-finite loss at step 3" in err and "checkpoint.pt" in err
    state = torch.load(tmp_path / "runs" / "nan" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["trainable"].values())


def test_non_finite_validation_loss_is_warned_and_logged_as_standard_json(tmp_path, monkeypatch):
    from minisd import training
    script = load_script("train.py")
    finite = training.Trainer.loss

    def loss(self, items, draws, with_grad=True):
        value = finite(self, items, draws, with_grad)
        return value if with_grad else value * float("nan")

    monkeypatch.setattr(training.Trainer, "loss", loss)
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="validation loss at step 2 is nan"):
        script.main([*FAST, "--max-steps", "2", "--val-images", "0", "--run-name", "nanval"])

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    run = tmp_path / "runs" / "nanval"
    records = [json.loads(line, parse_constant=refuse) for line in open(run / "log.jsonl")]
    assert [r["val_loss"] for r in records if r.get("event") == "validation"] == [None]
    json.loads((run / "summary.json").read_text(), parse_constant=refuse)
