"""Bad input to the scripts and the library functions behind them: one `error:` line naming the flag, file or
value, exit status 2 — never a traceback, never a silently wrong result."""
import argparse
import json
import math
import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

import minisd
from minisd import cli, comparison, data, evaluation, latents
from minisd.adapters import inject, read_adapter, save_adapter
from minisd.checkpoint.files import read_json
from minisd.errors import MinisdError
from minisd.export import export_diffusers, export_kohya
from minisd.medlego import merge_adapters
from minisd.resume_state import read_training_checkpoint
from minisd.training import Trainer
from helpers import ROOT, load_script


@pytest.fixture(scope="module")
def scripts():
    return {name: load_script(f"{name}.py") for name in ("train", "sample", "eval", "adapter")}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    sd = minisd.build("tiny")
    inject(sd, "lora", rank=1, text_encoder=False)
    with torch.no_grad():
        for name, p in sd.named_parameters():
            if name.endswith("lora_B"):
                p.normal_()
    path = tmp_path_factory.mktemp("adapter") / "adapter.safetensors"
    save_adapter(path, sd, "lora", 1.0)
    return path


def one_error_line(scripts, capsys, name, argv):
    """Run a script's main in this process; its stderr's one `error:` line (exit status 2 asserted)."""
    with pytest.raises(SystemExit) as stop:
        scripts[name].main(argv)
    assert stop.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


def write_run(folder, text):
    (folder / "runs" / "r").mkdir(parents=True)
    (folder / "runs" / "r" / "args.json").write_text(text)


# ------------------------------------------------------------------------------------------- flag values

@pytest.mark.parametrize("name, argv, message", [
    ("train", ["--batch-size", "abc"], "error: argument --batch-size: invalid int value: 'abc' (see "),
    ("eval", ["--dims", "5"], "error: argument --dims: invalid choice: 5"),
    ("adapter", ["export"], "error: the following arguments are required: adapter, --format, --out (see "),
])
def test_unparsable_flags_are_one_error_line(scripts, capsys, name, argv, message):
    assert one_error_line(scripts, capsys, name, argv).startswith(message)   # was: usage lines, then "prog: error:"


TINY = ["--model", "tiny", "--resolution", "64", "--max-steps", "1"]


@pytest.mark.parametrize("argv, message", [
    (["--resolution", "0"], "--resolution must be at least 1, got 0"),          # was: silently 224
    (["--lr", "nan"], "--lr must be a positive finite number, got nan"),       # was: a traceback
    (["--lr", "inf"], "--lr must be a positive finite number, got inf"),       # was: a NaN adapter
    (["--alpha", "inf"], "--alpha must be a positive finite number, got inf"),
    (["--lambda", "nan"], "--lambda must be a positive finite number, got nan"),  # was: silently no growth
    (["--seed", "-1"], "--seed must be between 0 and 4294967295, got -1"),
    (["--seed", str(2**70)], f"--seed must be between 0 and 4294967295, got {2**70}"),
    (["--val-steps", "1001"], "--val-steps must be between 1 and 1000, got 1001"),
    (["--run-name", "a/b"], "--run-name 'a/b': a run name is one folder name under runs/"),
    (["--run-name", ".."], "--run-name '..': a run name is one folder name"),
    (["--data-root", "data/iuxray"], "--data-root data/iuxray: the phantom data set is built in"),
    (["--device", "foo"], "--device foo: expected auto, cpu, cuda or cuda:N"),
    (["--lambda", "0.99"], "--lambda must be at least 1 (the FI-ratio is never below 1"),
    (["--data-seed", "-1"], "--data-seed must be between 0 and 4294967295, got -1"),
    (["--window", "40", "0"], "--window must be CENTER WIDTH, finite, with WIDTH at least 1, got 40 0"),
])
def test_train_flags(scripts, capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert message in one_error_line(scripts, capsys, "train", TINY + argv)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv, message", [
    (["--resume", "r", "--run-name", "s"], "--resume r and --run-name s name different runs"),
    (["--resume", "../r"], "--resume '../r': a run name is one folder name"),
    (["--resume", "r"], "--resume r: runs/r/args.json: not valid JSON"),
])
def test_train_resume_arguments(scripts, capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    write_run(tmp_path, "{not json")
    assert message in one_error_line(scripts, capsys, "train", argv)


@pytest.mark.parametrize("argv, change, message", [
    (["--resume", "r"], {"lr": None}, "--resume r: runs/r/args.json: 'lr' not recorded"),
    (["--resume", "r"], {"batch_size": 0}, "--resume r: runs/r/args.json: --batch-size must be at least 1, got 0"),
    (["--resume", "r", "--lr", "0.1"], {},   # was: --lr silently ignored
     "--resume continues a run with its recorded arguments: --lr 0.1 differs from the run's"),
    # the recorded value again is fine (the error is the next check's)
    (["--resume", "r", "--model", "tiny"], {"run_name": "r", "batch_size": 0}, "--batch-size must be at least 1, got 0"),
    # a run recorded before --data-seed, --fisher, --preset, --val-every, --tensorboard, --window and the latent
    # cache: accepted
    (["--resume", "r"], {"run_name": "r", "data_seed": None, "fisher": None, "preset": None, "val_every": None,
                         "tensorboard": None, "window": None, "cache_latents": None, "cache_latents_to_disk": None,
                         "batch_size": 0}, "--batch-size must be at least 1, got 0"),
    (["--resume", "r", "--data-seed", "3"], {"seed": 5, "data_seed": None}, "--data-seed 3 differs from the run's 5"),
    (["--resume", "r"], {"batch_size": "8"},   # was: '<' not supported between instances of 'str' and 'int'
     "--resume r: runs/r/args.json: 'batch_size' is \"8\", expected an integer"),
    (["--resume", "r"], {"convs": 1}, "--resume r: runs/r/args.json: 'convs' is 1, expected true or false"),
    (["--resume", "r"], {"cache_latents": "yes"}, "'cache_latents' is \"yes\", expected true or false"),
    (["--resume", "r"], {"method": "lorax"}, "'method' is \"lorax\", expected one of lora, selora, dylora, adalora"),
])
def test_train_resume_record(scripts, capsys, tmp_path, monkeypatch, argv, change, message):
    monkeypatch.chdir(tmp_path)
    record = {**vars(scripts["train"].parse_args(TINY)[0]), **change}
    write_run(tmp_path, json.dumps({k: v for k, v in record.items() if v is not None or k not in change}))
    assert message in one_error_line(scripts, capsys, "train", argv)


SAMPLE = ["--model", "tiny", "--prompt", "x", "--steps", "1"]


@pytest.mark.parametrize("argv, message", [
    (["--steps", "1001"], "--steps must be between 1 and 1000, got 1001"),   # was: a traceback
    (["--guidance", "nan"], "--guidance must be a finite number, got nan"),  # was: black images
    (["--seed", str(2**64)], f"--seed must be between 0 and 4294967295, got {2**64}"),
    (["--height", "12"], "--height must be a positive multiple of 8, at most 4096, got 12"),
    (["--width", str(8 * 10**6)], "--width must be a positive multiple of 8, at most 4096, got 8000000"),  # was: a
    (["--num-images", str(10**12)], "--num-images must be at most 10,000 with 1 prompt(s)"),  # traceback, or all memory
    (["--run", "a/b"], "--run 'a/b': a run name is one folder name"),
    (["--run", "r"], "--run r: runs/r/args.json: 'model' not recorded"),
    (["--out", "FILE"], "--out {FILE}: is a file, expected a folder"),
    (["--out", "FILE/sub"], "--out {FILE}/sub: cannot make the folder"),
    (["--prompts", "LATIN1"], "--prompts {LATIN1}: not UTF-8 text"),
    (["--device", "meta"], "--device meta: expected auto, cpu, cuda or cuda:N"),
])
def test_sample_flags(scripts, capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    files = {"FILE": str(tmp_path / "file"), "LATIN1": str(tmp_path / "latin1.txt")}
    (tmp_path / "file").write_text("")
    (tmp_path / "latin1.txt").write_bytes("épanchement\n".encode("latin-1"))
    write_run(tmp_path, json.dumps({"data": "phantom"}))
    argv = [a.replace("FILE", files["FILE"]).replace("LATIN1", files["LATIN1"]) for a in argv]
    assert message.format(**files) in one_error_line(scripts, capsys, "sample", SAMPLE + argv)


def test_prompt_files_with_a_byte_order_mark_or_no_prompt(scripts, tmp_path):
    bom, blank = tmp_path / "bom.txt", tmp_path / "blank.txt"
    bom.write_bytes("\ufeffcardiomegaly\n\nclear lungs\n".encode("utf-8"))
    blank.write_text("\n  \n")
    read = scripts["sample"].read_prompts
    assert read(argparse.Namespace(prompt=None, prompts=str(bom))) == ["cardiomegaly", "clear lungs"]   # was: "\ufeff..."
    assert evaluation.read_prompts(bom, 3)[0] == "cardiomegaly"
    with pytest.raises(MinisdError, match=f"--prompts {blank}: holds no prompt"):   # was: "no prompt given"
        read(argparse.Namespace(prompt=["x"], prompts=str(blank)))


@pytest.mark.parametrize("name, change, message", [   # each was a traceback or a misleading error
    ("sample", {"model": 5}, "runs/r/args.json: 'model' is 5, expected a string"),
    ("sample", {"stage": 5}, "runs/r/args.json: 'stage' is 5, expected null, vae or unet"),
    ("eval", {"stage": "x"}, "runs/r/args.json: 'stage' is \"x\", expected null, vae or unet"),
    ("eval", {"data": "nosuch"}, "runs/r/args.json: 'data' is \"nosuch\", expected one of folder, iuxray"),
])
def test_a_run_record_of_the_wrong_type(scripts, capsys, tmp_path, monkeypatch, name, change, message):
    monkeypatch.chdir(tmp_path)
    write_run(tmp_path, json.dumps({"model": "tiny", "data": "phantom", **change}))
    assert message in one_error_line(scripts, capsys, name, ["--run", "r"] + (["--prompt", "x"] if name == "sample" else []))


@pytest.mark.parametrize("name, argv", [("train", ["--resume", "f"]), ("sample", ["--run", "f", "--prompt", "x"]),
                                        ("eval", ["--run", "f"])])
def test_a_run_that_is_a_file(scripts, capsys, tmp_path, monkeypatch, name, argv):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "f").write_text("")
    assert "runs/f: is a file, not a run folder" in one_error_line(scripts, capsys, name, argv)   # was: "args.json: missing"


def test_sample_model_flag_overrides_the_run(scripts, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_run(tmp_path, json.dumps({"model": "tiny"}))
    line = one_error_line(scripts, capsys, "sample", ["--run", "r", "--model", "/no/model.safetensors", "--prompt", "x"])
    assert "/no/model.safetensors" in line   # was: the run's model, silently


EVAL = ["--model", "tiny", "--data", "phantom"]


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0", "0"], "--seeds 0 0: a seed is repeated"),              # was: one set counted once, silently
    (["--seeds", str(2**64)], f"--seeds must be between 0 and 4294967295, got {2**64}"),
    (["--steps", "1001"], "--steps must be between 1 and 1000, got 1001"),
    (["--guidance", "inf"], "--guidance must be a finite number, got inf"),
    (["--resolution", "12"], "--resolution must be a positive multiple of 8, at most 4096, got 12"),
    (["--data-seed", "-1"], "--data-seed must be between 0 and 4294967295, got -1"),
    (["--data-root", "elsewhere"], "--data-root elsewhere: the phantom data set is built in"),
    (["--out", "FILE"], "--out {FILE}: is a file, expected a folder"),
    (["--window", "nan", "400"], "--window must be CENTER WIDTH, finite, with WIDTH at least 1, got nan 400"),
    (["--xrv-weights", "FILE"], "--xrv-weights needs --features xrv"),
    (["--features", "xrv", "--xrv-weights", "none.pt"], "--xrv-weights none.pt: no such file (want torchxrayvision's"),
])
def test_eval_flags(scripts, capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    file = tmp_path / "file"
    file.write_text("")
    argv = [a.replace("FILE", str(file)) for a in argv]
    assert message.format(FILE=file) in one_error_line(scripts, capsys, "eval", EVAL + argv)


def test_eval_latest_run_record_must_be_an_object(scripts, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_run(tmp_path, "5")
    assert "runs/r/args.json: holds a JSON int, expected an object" in one_error_line(scripts, capsys, "eval", [])


# ------------------------------------------------------------------------------------------- library

@pytest.mark.parametrize("name", ["foo", "mps", "meta", "cuda:x"])
def test_pick_device_names_the_device(name):
    with pytest.raises(MinisdError, match=f"--device {name}: expected auto, cpu, cuda or cuda:N"):
        cli.pick_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_pick_device_cuda_without_a_gpu():
    with pytest.raises(MinisdError, match="--device cuda:0: CUDA is not available"):
        cli.pick_device("cuda:0")


def test_main_guard_turns_a_failed_write_into_one_line(capsys, tmp_path):
    @cli.main_guard
    def main(argv):
        open(tmp_path / "missing" / "file.txt", "w")
    with pytest.raises(SystemExit) as stop:
        main([])
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing' / 'file.txt'}: No such file or directory\n"


def test_main_guard_prints_one_line_for_a_message_of_several(capsys):
    @cli.main_guard
    def main(argv):
        raise MinisdError("weights.pth: cannot read (UnpicklingError: Weights only load failed.\n\nPlease file an issue)")
    with pytest.raises(SystemExit):
        main([])
    assert capsys.readouterr().err == "error: weights.pth: cannot read (UnpicklingError: Weights only load failed. " \
                                      "Please file an issue)\n"


def test_half_precision_on_the_cpu_warns():
    with pytest.warns(UserWarning, match="--precision bf16 on the CPU is usually many times slower than fp32"):
        cli.warn_half_precision_on_cpu("bf16", "cpu")


def test_csv_with_byte_order_mark_is_read(tmp_path):
    (tmp_path / "metadata.csv").write_bytes("file_name,text\na.png,small effusion\n".encode("utf-8-sig"))
    rows = data.read_csv(tmp_path / "metadata.csv", ("file_name", "text"))
    assert rows == [{"file_name": "a.png", "text": "small effusion"}]


def test_csv_field_over_the_limit_names_the_line(tmp_path):
    (tmp_path / "metadata.csv").write_text('file_name,text\na.png,ok\nb.png,"' + "x" * 200_000 + '"\n')
    with pytest.raises(MinisdError, match=r"metadata.csv: line 3: field larger than field limit"):
        data.read_csv(tmp_path / "metadata.csv", ("file_name", "text"))


def test_jsonl_lines_json_cannot_parse_are_malformed_rows(tmp_path):
    lines = ['{"file_name": "a.png", "text": ' + "1" * 5000 + "}", "[" * 100_000, '{"file_name": "b.png", "text": "t"}']
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    candidates, skipped, _ = data.read_folder(tmp_path)
    assert [c[0].file for c in candidates] == ["b.png"] and skipped["malformed row"] == 2


def test_json_nested_too_deep_is_one_error(adapter, tmp_path):   # each was a RecursionError traceback
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "args.json").write_text(deep)
    with pytest.raises(MinisdError, match="args.json: not valid JSON"):
        read_json(tmp_path / "args.json", "")
    assert comparison.read_record(tmp_path / "args.json") is None   # a grid's record: its step runs again
    tensors = safetensors.torch.load_file(adapter)
    with safe_open(adapter, "pt") as f:
        safetensors.torch.save_file(tensors, tmp_path / "a.safetensors", {**f.metadata(), "args": deep})
    with pytest.raises(MinisdError, match="a.safetensors: malformed metadata"):
        read_adapter(tmp_path / "a.safetensors")
    safetensors.torch.save_file({"mean": torch.zeros(1), "logvar": torch.zeros(1)}, tmp_path / "latents.safetensors",
                                {"key": "k", "ids": deep})
    with pytest.warns(UserWarning, match="latents.safetensors: damaged"):   # encoded again
        assert latents.read_cache_file(tmp_path / "latents.safetensors", "k", ["a"], "cpu", (1,)) is None


def test_adapter_outputs_that_cannot_be_written(adapter, tmp_path):
    (tmp_path / "folder.safetensors").mkdir()
    (tmp_path / "file").write_text("")
    with pytest.raises(MinisdError, match="folder.safetensors: is a folder, expected a file name"):
        export_kohya(adapter, tmp_path / "folder.safetensors")
    with pytest.raises(MinisdError, match=r"file/k.safetensors: cannot write \((File exists|Not a directory)\)"):
        export_kohya(adapter, tmp_path / "file" / "k.safetensors")
    with pytest.raises(MinisdError, match="file: is a file; the diffusers export goes into a folder"):
        export_diffusers(adapter, tmp_path / "file")
    with pytest.raises(MinisdError, match="folder.safetensors: is a folder"):
        merge_adapters([adapter], tmp_path / "folder.safetensors")
    assert os.listdir(tmp_path / "folder.safetensors") == [] and sorted(os.listdir(tmp_path)) == ["file", "folder.safetensors"]


@pytest.mark.parametrize("weight", [math.nan, math.inf])
def test_merge_weights_must_be_finite(adapter, tmp_path, weight):
    with pytest.raises(MinisdError, match=f"--weights must be finite numbers, got {weight} 1.0"):
        merge_adapters([adapter, adapter], tmp_path / "m.safetensors", weights=[weight, 1.0])


def test_psnr_of_identical_images_has_no_nan_spread():
    assert evaluation.mean_std([math.inf, math.inf]) == {"mean": math.inf, "std": 0.0}


# ------------------------------------------------------------------------------------------- resume

def trainer(run, method, resume=False):
    args, _ = load_script("train.py").parse_args(["--model", "tiny", "--method", method, "--resolution", "64",
                                                  "--batch-size", "2"])
    vars(args).update(data_root=None, device="cpu", workers=0, run_name="r", max_rank=None)
    return Trainer(args, str(run), resume)


@pytest.fixture(scope="module")
def selora_checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("selora") / "r"
    t = trainer(run, "selora")
    next(iter(t.layers.values())).expand()   # a layer at rank 2: resuming must resize it
    t.save_checkpoint()
    return torch.load(run / "checkpoint.pt", weights_only=True)


def resume_with(state, run, method="selora"):
    run.mkdir()
    if isinstance(state, bytes):
        (run / "checkpoint.pt").write_bytes(state)
    else:
        torch.save(state, run / "checkpoint.pt")
    return trainer(run, method, resume=True)


@pytest.mark.parametrize("method, change, message", [
    ("lora", {}, "holds the state of a selora run, not of a lora run"),     # was: lora loaded selora weights
    ("lora", {"method": None}, "holds the state of a different run, not of a lora run"),   # written before "method"
    ("selora", {"fingerprint": "0" * 64}, "was written for another base model than tiny"),
    ("selora", {"step": None}, r"is not a training checkpoint \(no 'step'\)"),       # was: KeyError
])
def test_resume_refuses_a_checkpoint_of_another_run(selora_checkpoint, tmp_path, method, change, message):
    state = {k: v for k, v in selora_checkpoint.items() if k not in change}
    state.update({k: v for k, v in change.items() if v is not None})
    with pytest.raises(MinisdError, match=f"--resume: {tmp_path / 'r' / 'checkpoint.pt'}.*{message}"):
        resume_with(state, tmp_path / "r", method)


def nan_in_first_adapter(state):
    name, value = next(iter(state["trainable"].items()))
    return {"trainable": {**state["trainable"], name: value * math.nan}}


@pytest.mark.parametrize("change, message", [   # each was a traceback or a run continued from damaged state
    (lambda s: {"step": "2"}, "'step' is damaged, expected a step number"),
    (lambda s: {"step": -1}, "'step' is damaged, expected a step number"),
    (lambda s: {"trainable": [1]}, "'trainable' is damaged, expected parameter names with floating-point tensors"),
    (lambda s: {"trainable": {k: v.long() for k, v in s["trainable"].items()}}, "'trainable' is damaged"),
    (nan_in_first_adapter, r"trainable/\S+lora_\w holds NaN or infinite values"),
    (lambda s: {"optimizer": None}, "'optimizer' is damaged, expected an optimizer state"),
    (lambda s: {"best_val": math.nan}, "'best_val' is damaged, expected a validation loss"),
    (lambda s: {"rank_history": 5}, "'rank_history' is damaged"),
    (lambda s: {"measures": 5}, "'measures' is damaged"),
    (lambda s: {"controller": [1]}, "'controller' is damaged"),
])
def test_a_checkpoint_with_a_damaged_field_is_refused(selora_checkpoint, tmp_path, change, message):
    path = tmp_path / "checkpoint.pt"
    torch.save({**selora_checkpoint, **change(selora_checkpoint)}, path)
    with pytest.raises(MinisdError, match=f"--resume: {path}: {message}"):
        read_training_checkpoint(path)


@pytest.mark.parametrize("change, message", [
    (lambda s: {"trainable": {k: v.half() for k, v in s["trainable"].items()}},   # was: NaN validation, silently
     r"lora_\w is torch.float16, this model's is torch.float32"),
    (lambda s: {"controller": None}, "'controller' is damaged, expected the state of a selora run"),
    (lambda s: {"controller": {**s["controller"], "layers": {k: {**v, "rank": 0} for k, v in
                                                               s["controller"]["layers"].items()}}},
     "SeLoRA state of layer .* is not a rank with its candidate and Fisher information of the layer's shapes"),
])
def test_resume_refuses_state_that_does_not_fit_the_run(selora_checkpoint, tmp_path, change, message):
    with pytest.raises(MinisdError, match=f"--resume: {tmp_path / 'r' / 'checkpoint.pt'}: .*{message}"):
        resume_with({**selora_checkpoint, **change(selora_checkpoint)}, tmp_path / "r")


def test_resume_refuses_adapters_of_another_shape(selora_checkpoint, tmp_path):
    name, value = next((k, v) for k, v in selora_checkpoint["trainable"].items() if v.shape[0] == 2)
    state = {**selora_checkpoint, "trainable": {**selora_checkpoint["trainable"], name: value[:, :1]}}
    with pytest.raises(MinisdError) as error:   # was: the other model's weights, silently
        resume_with(state, tmp_path / "r")
    assert f"{name} has shape [2, 1], this model's is {list(value.shape)}" in str(error.value)


def test_resume_refuses_a_damaged_checkpoint(tmp_path):
    with pytest.raises(MinisdError, match="checkpoint.pt cannot be read, it is damaged or not from train.py"):
        resume_with(b"not a checkpoint" * 10, tmp_path / "r")


def test_resume_of_its_own_checkpoint_restores_the_ranks(selora_checkpoint, tmp_path):
    assert next(iter(resume_with(selora_checkpoint, tmp_path / "r").layers.values())).rank == 2


# ------------------------------------------------------------------------------------------- the scripts themselves

@pytest.mark.parametrize("argv, message", [
    (["sample.py", "--model", "tiny", "--prompt", "x", "--steps", "5000"], "error: --steps must be between 1 and 1000"),
    (["train.py", "--model", "tiny", "--device", "mps"], "error: --device mps: expected auto, cpu, cuda or cuda:N"),
])
def test_script_exits_2_with_one_line(tmp_path, argv, message):
    run = subprocess.run([sys.executable, os.path.join(ROOT, argv[0]), *argv[1:]], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert run.returncode == 2 and run.stderr.startswith(message) and run.stderr.count("\n") == 1, run.stderr
