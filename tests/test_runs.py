"""The run folder under hostile use: copies, renames, two trainers, full disks, torn logs, signals, restarts,
extensions; and what a run shows: progress, plots, captioned grids, TensorBoard."""
import json
import os
import re
import shutil
import signal
import sys
import types
import warnings

import pytest
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from minisd import cli, files, plots, runs
from minisd.errors import MinisdError
from minisd.images import captioned_grid, grid
from minisd.progress import TrainingBar
from minisd.training import Trainer, validation_due
from helpers import load_script

# The cheapest run that still validates and checkpoints: plain LoRA, 64 px, no sample grid.
QUICK = ["--model", "tiny", "--data", "phantom", "--method", "lora", "--resolution", "64", "--batch-size", "2",
         "--val-max", "2", "--val-images", "0"]


@pytest.fixture(scope="module")
def script():
    return load_script("train.py")


def train(script, *argv):
    """train.py's main in this process; the exit status (0 when it returned)."""
    try:
        script.main([*argv])
    except SystemExit as stop:
        return stop.code
    return 0


def steps(run):
    return [r["step"] for r in map(json.loads, open(os.path.join(run, "log.jsonl"))) if "loss" in r]


@pytest.fixture(scope="module")
def finished(script, tmp_path_factory):
    """A finished 2-step run, runs/base, to copy."""
    cwd = tmp_path_factory.mktemp("base")
    old = os.getcwd()
    os.chdir(cwd)
    try:
        assert train(script, *QUICK, "--max-steps", "2", "--run-name", "base") == 0
    finally:
        os.chdir(old)
    return cwd / "runs" / "base"


@pytest.fixture
def runs_dir(finished, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    return tmp_path / "runs"


def test_a_copied_run_resumes_itself_and_a_finished_run_extends(script, finished, runs_dir, capsys):
    """Also: a torn last log line (a full disk) and temporary files of interrupted writes do not survive."""
    shutil.copytree(finished, runs_dir / "base")
    run = runs_dir / "copy"
    shutil.copytree(finished, run)
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.9')   # the disk filled up mid-line
    leftovers = [run / "checkpoint.pt.tmp4242", run / ".tmpAb12Cd", run / "samples" / "step000001.png.tmp7.png"]
    for path in leftovers:
        path.write_bytes(b"partial")
    (run / "notes.txt").write_text("mine")
    before = load_file(runs_dir / "base" / "adapter_last.safetensors")
    assert train(script, "--resume", "runs/copy/", "--max-steps", "3") == 0   # tab completion's spelling
    assert steps(run) == [1, 2, 3]   # was: JSONDecodeError at the torn line
    assert not any(path.exists() for path in leftovers) and (run / "notes.txt").exists()
    assert steps(runs_dir / "base") == [1, 2]   # was: the copy trained and finished the original
    after = load_file(runs_dir / "base" / "adapter_last.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    record = json.loads((runs_dir / "copy" / "args.json").read_text())
    assert record["run_name"] == "copy" and record["adapter"] == os.path.join("runs", "copy", "adapter.safetensors")
    assert record["max_steps"] == 3
    printed = capsys.readouterr()
    assert "done: runs/copy" in printed.out and "removed 3 temporary file(s) of an interrupted write" in printed.out
    assert "runs/copy/log.jsonl: dropped 1 torn line(s)" in printed.err


def test_a_renamed_run_resumes_under_its_new_name(script, finished, runs_dir, capsys):
    shutil.copytree(finished, runs_dir / "renamed")
    assert train(script, "--resume", "renamed") == 0   # was: an error, and an empty folder under the old name
    assert not (runs_dir / "base").exists()
    assert "runs/renamed finished at step 2; to continue it give --max-steps or --epochs beyond that" in \
        capsys.readouterr().out


def test_a_run_cannot_end_before_its_checkpoint(script, finished, runs_dir, capsys):
    shutil.copytree(finished, runs_dir / "base")
    assert train(script, "--resume", "base", "--max-steps", "1") == 2
    assert "runs/base is at step 2: a run of 1 steps would end before it" in capsys.readouterr().err


def test_a_second_trainer_is_refused_while_the_first_holds_the_run(script, finished, runs_dir, capsys):
    shutil.copytree(finished, runs_dir / "base")
    holder = runs.Run(str(runs_dir / "base"), writer=True, resume=True)   # this process, as another trainer
    try:
        assert train(script, "--resume", "base", "--max-steps", "3") == 2
    finally:
        holder.close()
    err = capsys.readouterr().err
    assert f"error: runs/base is in use: process {os.getpid()} on " in err and "is training in it" in err
    assert steps(runs_dir / "base") == [1, 2]


def test_resume_holds_args_json_to_the_checkpoints_arguments(script, finished, runs_dir, capsys):
    shutil.copytree(finished, runs_dir / "base")
    record = json.loads((runs_dir / "base" / "args.json").read_text())
    (runs_dir / "base" / "args.json").write_text(json.dumps({**record, "lr": 0.5}))
    assert train(script, "--resume", "base") == 2   # was: trained on with lr 0.5
    err = capsys.readouterr().err
    assert "runs/base/args.json: lr is 0.5, but runs/base/checkpoint.pt was trained with 0.0001" in err


def test_a_run_that_stopped_before_its_first_checkpoint_starts_clean(script, runs_dir, capsys):
    run = runs_dir / "early"
    (run / "samples").mkdir(parents=True)
    (run / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)))
    (run / "samples" / "step000002.png").write_bytes(b"")
    assert train(script, *QUICK, "--max-steps", "2", "--run-name", "early") == 0
    assert steps(run) == [1, 2]   # was: 1, 2, 3, 1, 2
    assert not (run / "samples" / "step000002.png").exists()
    assert "runs/early: an earlier start stopped before its first checkpoint; starting again from step 0" in \
        capsys.readouterr().out


def test_a_failed_start_leaves_no_run_folder(script, runs_dir, capsys):
    assert train(script, *QUICK, "--model", str(runs_dir / "missing.safetensors"), "--run-name", "bad") == 2
    assert not (runs_dir / "bad").exists()   # was: an empty runs/bad


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_finishes_the_step_checkpoints_and_says_how_to_resume(script, runs_dir, capsys, monkeypatch, signum):
    step = Trainer.train_step

    def signalled_step(self, batches):
        result = step(self, batches)
        if self.step == 2:
            os.kill(os.getpid(), signum)
        return result

    def unhandled(*_):
        raise AssertionError("the signal was not handled")
    monkeypatch.setattr(Trainer, "train_step", signalled_step)
    old = signal.signal(signal.SIGTERM, unhandled)   # without handling, SIGTERM would end pytest itself
    try:
        code = train(script, *QUICK, "--max-steps", "4", "--save-every", "100", "--run-name", "sig")
    finally:
        signal.signal(signal.SIGTERM, old)
    assert code == 128 + signum
    assert "interrupted at step 2; resume with: python train.py --resume sig" in capsys.readouterr().err
    assert torch.load(runs_dir / "sig" / "checkpoint.pt", weights_only=True)["step"] == 2
    assert steps(runs_dir / "sig") == [1, 2]   # what --resume continues from (tests/test_training.py: exactly)


def test_a_full_disk_is_one_error_naming_the_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    os.symlink("/dev/full", f"{path}.tmp{os.getpid()}")   # every write there fails, as on a full disk
    monkeypatch.setattr(shutil, "disk_usage", lambda _: types.SimpleNamespace(free=0))
    with pytest.raises(MinisdError, match=f"^{path}: cannot write \\(no space left on the device\\)$"):
        runs.atomic_torch_save({"step": 1}, str(path))   # was: a RuntimeError traceback
    run = runs.Run(str(tmp_path), writer=False)
    run.log_file = open("/dev/full", "a")
    with pytest.raises(MinisdError, match="^/dev/full: cannot write \\(no space left on the device\\)$"):
        run.log({"step": 1, "loss": 1.0})


def test_run_names_may_be_written_as_paths_under_runs():
    for text in ("r", "runs/r", "runs/r/", "./runs/r"):
        assert cli.run_name("--run", text) == "r" and cli.run_folder("--run", text) == os.path.join("runs", "r")
    for text in ("runs/../r", "other/r", "runs/"):
        with pytest.raises(MinisdError, match="a run name is one folder name under runs/"):
            cli.run_name("--run", text)


def test_help_shows_defaults(script):
    text = " ".join(script.parser().format_help().split()).replace("- ", "-")   # argparse wraps after hyphens
    assert "--epochs EPOCHS passes over the training split (unless --max-steps) (default: 10)" in text
    assert "--val-every VAL_EVERY validate at the end of an epoch at most every this many steps (and at the last " \
           "step) (default: 100)" in text
    assert "--model MODEL single .safetensors/.ckpt file, diffusers folder, hub id, 'tiny', or a chest-X-ray LDM (its " \
           "folder, 'cxr-ldm', 'cxr-tiny') (default: " in text
    assert "--seed SEED adapter initialisation, batch order and noise (default: 0)" in text


def test_warnings_print_above_the_progress_bar(capsys):
    @cli.main_guard
    def main(argv=None):   # (pytest.warns around it would record the warning, not print it)
        bar = tqdm(total=10, desc="training")
        bar.update(3)
        warnings.warn("a prompt was truncated")
        bar.close()
    main([])
    pieces = re.split(r"[\r\n]", capsys.readouterr().err)
    assert "warning: a prompt was truncated" in pieces   # was: glued to the bar's line


def test_validation_every_n_steps_at_epoch_ends_and_at_the_last_step():
    due = [s for s in range(1, 21) if validation_due(s, steps_per_epoch=2, every=5, total=20)]
    assert due == [6, 10, 16, 20]   # was: every epoch end, 2, 4, … 20
    assert [s for s in range(1, 9) if validation_due(s, 4, 100, 10)] == [] and validation_due(10, 4, 100, 10)
    assert [s for s in range(1, 13) if validation_due(s, 3, 1, 12)] == [3, 6, 9, 12]   # long epochs: each one


def test_the_eta_counts_the_validations_to_come():
    bar = TrainingBar(total=10, initial=0, validations_after=lambda step: 2)
    for _ in range(4):
        bar.step_done(1.0)
    with bar.validating():
        assert bar.desc.startswith("validating")
    assert bar.desc.startswith("training")
    bar.validation_times[-1] = 30.0
    assert bar.seconds_left() == pytest.approx(6 * 1.0 + 2 * 30.0)
    assert "<01:06" in str(bar)


def figures(monkeypatch):
    saved = []
    monkeypatch.setattr(plots, "save_figure", lambda figure, path: saved.append(figure))
    return saved


def test_rank_heatmap_has_a_colour_bar_title_and_axis_labels(monkeypatch):
    saved = figures(monkeypatch)
    prefix = "model.diffusion_model.input_blocks."
    ranks = {f"{prefix}1.1.transformer_blocks.0.attn1.to_q": 3, f"{prefix}2.1.transformer_blocks.0.attn1.to_k": 5}
    assert plots.rank_heatmap(ranks, "unet", "ranks.png", "U-Net")
    main, colour_bar = saved[0].axes
    assert main.get_title() == "U-Net ranks (total 8, max 5)" and main.get_xlabel() and main.get_ylabel()
    assert colour_bar.get_ylabel() == "rank"
    assert [t.get_text() for t in main.get_xticklabels()] == ["in1", "in2"]


def test_loss_curve_shows_training_and_validation(monkeypatch):
    saved = figures(monkeypatch)
    records = [{"step": s, "loss": 1 / s} for s in range(1, 41)] + [{"step": 20, "event": "validation", "val_loss": 0.1},
                                                                   {"event": "expand", "layer": "x"}]
    assert plots.loss_curve(records, "loss.png")
    labels = [line.get_label() for line in saved[0].axes[0].get_lines()]
    assert labels == ["training loss", "training loss, mean of 20 steps", "validation loss"]


def test_sample_grids_are_captioned_with_their_prompts():
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    out = captioned_grid(images, ["left pleural effusion", "normal heart size"])
    plain = grid(images)
    assert out.shape[1] > plain.shape[1] and torch.equal(out[:, :66, :], (plain[:, :66, :] * 255).round() / 255)
    assert (out[:, 66:, :] < 0.5).any()   # the captions' text below the images


def test_adapter_files_follow_the_umask(tmp_path):
    from minisd.checkpoint.files import atomic_save
    old = os.umask(0o022)
    try:
        atomic_save({"x": torch.zeros(1)}, tmp_path / "a.safetensors")
        os.umask(0o077)
        atomic_save({"x": torch.zeros(1)}, tmp_path / "b.safetensors")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "a.safetensors").st_mode & 0o777 == 0o644   # was: 0o600, safetensors' temp file
    assert os.stat(tmp_path / "b.safetensors").st_mode & 0o777 == 0o600
    assert files.new_file_mode() == 0o666 & ~old


class FakeSummaryWriter:
    calls = []

    def __init__(self, folder, purge_step=None):
        self.folder = folder

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, args))


def test_tensorboard_logs_loss_lr_ranks_and_grids(script, runs_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeSummaryWriter))
    assert train(script, *QUICK, "--max-steps", "2", "--val-images", "1", "--val-steps", "1", "--tensorboard",
                 "--run-name", "tb") == 0
    tags = {(name, args[0]) for name, args in FakeSummaryWriter.calls if args}
    assert {("add_scalar", "train/loss"), ("add_scalar", "train/lr"), ("add_scalar", "train/total_rank"),
            ("add_scalar", "val/loss"), ("add_image", "samples"), ("add_histogram", "ranks")} <= tags


def test_tensorboard_without_the_package_is_one_error_line(script, runs_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert train(script, *QUICK, "--max-steps", "1", "--tensorboard", "--run-name", "tb") == 2
    assert "error: --tensorboard needs the tensorboard package: pip install tensorboard" in capsys.readouterr().err


def test_log_lines_that_are_not_records_are_dropped_and_named(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"step": 1, "loss": 1.0}\nGARBAGE\n{"step": "2", "loss": 1.0}\n[1]\n\xff\xfe\n\n'
                     b'{"step": 2, "loss": 0.5}\n')
    with pytest.warns(UserWarning, match=r"log.jsonl: dropped 4 damaged line\(s\) that are not log records "
                                         r"\(line 2, 3, 4, 5\)"):
        records = runs.read_log(path)   # was: a traceback comparing the step "2" to the checkpoint's
    assert [r["step"] for r in records] == [1, 2]


def test_the_records_a_run_keeps_are_its_log_as_read_back(tmp_path):
    """What the loss curve is drawn from, without reading log.jsonl again at each validation."""
    first = runs.Run(str(tmp_path / "r"), writer=True)
    first.open_log()
    for step in (1, 2, 3):
        first.log({"step": step, "loss": 1.0 / step})
    first.log({"step": 3, "event": "validation", "val_loss": float("nan")})
    assert first.records == runs.read_log(tmp_path / "r" / "log.jsonl")
    first.close()
    resumed = runs.Run(str(tmp_path / "r"), writer=True, resume=True)
    resumed.open_log(keep_until_step=2)
    resumed.log({"step": 3, "loss": 0.25})
    assert resumed.records == runs.read_log(tmp_path / "r" / "log.jsonl")
    assert [r["step"] for r in resumed.records] == [1, 2, 3] and resumed.records[-1]["loss"] == 0.25
    resumed.close()
