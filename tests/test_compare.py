"""compare.py: the grid end to end with random metric weights, resume, failures, stops and bad flags."""
import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
from pathlib import Path

import pytest
from PIL import Image

from helpers import ROOT, load_script
from minisd import comparison, inception, metrics
from minisd.comparison_report import write_report
import test_eval
from test_eval import write_images

ws = test_eval.ws   # the fixture of random FID-Inception weights and small open_clip weights
FAST = ["--model", "tiny", "--data", "folder", "--quick", "--max-steps", "2", "--resolution", "32", "--batch-size", "2",
        "--steps", "2"]


def in_process(script, argv, log):
    """comparison.run_script's stand-in: the script's main() in this process, its output into the log."""
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            load_script(os.path.basename(script)).main(argv)
        except SystemExit as e:
            return e.code
    return 0


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder data set of 8 training, 2 validation and 3 test images, as the working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MINISD_CACHE", str(tmp_path / "cache"))
    splits = ["train"] * 8 + ["val"] * 2 + ["test"] * 3
    write_images(tmp_path / "data", [f"img{i:02d}.png" for i in range(len(splits))], 16, seed=9)
    (tmp_path / "data" / "metadata.csv").write_text("file_name,text,split\n" + "".join(
        f"img{i:02d}.png,finding number {i},{split}\n" for i, split in enumerate(splits)))
    return tmp_path


def test_grid_writes_both_tables_and_the_figure(ws, workdir, monkeypatch, capsys):
    """One row per method with FID, CLIP score and the training columns, taken from the cells' own files; a
    cell evaluated without CLIP weights is evaluated again, not trained again, once they are given."""
    monkeypatch.setattr(metrics, "CLIP_MODEL", "tiny-eval-quickgelu")
    monkeypatch.setattr(comparison, "download_clip_weights", lambda cache: pytest.fail("--quick: no CLIP download"))
    calls = []
    monkeypatch.setattr(comparison, "run_script", lambda script, argv, log: calls.append(
        (os.path.basename(script), argv[argv.index("--run-name" if "--run-name" in argv else "--run") + 1]))
        or in_process(script, argv, log))
    compare = load_script("compare.py")
    common = [*FAST, "--data-root", "data", "--inception-weights", str(ws / "inception.pth"), "--force-inception-weights"]
    compare.main([*common, "--methods", "lora"])
    err = capsys.readouterr().err
    assert err.count("note: --quick leaves out the CLIP-score column") == 1 and "--clip-weights PATH" in err
    assert "| LoRA | " in (Path("comparisons/folder-quick/comparison.md")).read_text()
    lora = json.loads(Path("runs/folder-quick-folder-lora-seed0/eval/eval.json").read_text())
    assert lora["per_seed"]["0"]["clip_score"] is None and lora["per_seed"]["0"]["fid"]["64"] > 0

    calls.clear()
    grid = compare.main([*common, "--clip-weights", str(ws / "clip.pt")])
    names = [f"folder-quick-folder-{m}-seed0" for m in ("lora", "dylora", "adalora", "selora-lambda1.1")]
    assert calls == [("eval.py", names[0])] + [(script, n) for n in names[1:] for script in ("train.py", "eval.py")]
    out = Path(grid.folder)
    assert out == Path("comparisons/folder-quick")
    table = (out / "comparison.md").read_text()
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [r["label"] for r in rows] == ["LoRA", "DyLoRA", "AdaLoRA", "SeLoRA λ 1.1"]
    for name, row in zip(names, rows):
        report = json.loads((Path("runs") / name / "eval" / "eval.json").read_text())
        summary = json.loads((Path("runs") / name / "summary.json").read_text())
        assert report["ids"] == ["img10.png", "img11.png", "img12.png"] and report["seeds"] == [0]
        assert float(row["fid64_mean"]) == report["per_seed"]["0"]["fid"]["64"] and float(row["fid64_std"]) == 0
        assert float(row["clip_score_mean"]) == report["per_seed"]["0"]["clip_score"]["mean"]
        for part in ("unet", "text_encoder"):
            assert float(row[f"{part}_percent"]) == summary["best"]["parameters"][part]["percent"]
        assert float(row["total_rank"]) == sum(summary["best"]["ranks"].values())
        assert float(row["train_time_s"]) == summary["wall_time_s"]
        assert int(row["peak_memory_bytes"]) == summary["peak_memory"]["bytes"]
        assert f"| {row['label']} | {float(row['fid64_mean']):.4g} ± 0 | {float(row['clip_score_mean']):.4g} ± 0 |" in table
    assert float(rows[0]["total_rank"]) == 4 * float(rows[3]["total_rank"])   # LoRA rank 4, SeLoRA still at 1
    assert "| method | FID-64 | CLIP score | trainable % text encoder | trainable % U-Net |" in table
    assert Image.open(out / "ranks.png").size[0] > 800
    assert "note:" not in capsys.readouterr().err


def finished_cell(cell, evaluated=True):
    """The files of a cell that trained (and was evaluated), as train.py and eval.py write them."""
    os.makedirs(cell.file("eval"), exist_ok=True)
    Path(cell.file("adapter.safetensors")).write_bytes(b"")
    ranks = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q": 2,
             "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1": 3}
    parameters = {p: {"trainable": 10, "total": 1000, "percent": 1.0} for p in ("unet", "text_encoder", "all")}
    Path(cell.file("summary.json")).write_text(json.dumps({
        "finished": True, "wall_time_s": 3.0 + cell.seed, "peak_memory": {"bytes": 2**30 * (cell.seed + 1), "measure": "max_rss"},
        "best": {"step": 1, "parameters": parameters, "ranks": ranks}}))
    if evaluated:
        Path(cell.file("eval", "eval.json")).write_text(json.dumps({
            "seeds": [0, 1], "steps": 2, "guidance": 7.5, "inception_weights": {"sha256": "abc"},
            "per_seed": {str(s): {"fid": {"64": 10.0 + cell.seed + s}, "clip_score": None} for s in (0, 1)}}))


def stub_grid(**changes):
    fields = dict(name="g", model="tiny", data={"phantom": None}, methods=["lora", "selora"], lambdas=[1.1, 1.3],
                  train_seeds=[0, 1], train={"max_steps": 1}, evaluation={"seeds": [0, 1], "steps": 2, "guidance": 7.5,
                                                                             "dims": [64]}, device="cpu")
    return comparison.Grid(**{**fields, **changes})


WEIGHTS = {"inception": "inception.pth", "inception_sha256": "abc", "clip": None, "clip_sha256": None,
           "force_inception_weights": False, "missing": "CLIP-score: pass --clip-weights"}


def test_resume_skips_finished_cells_continues_stopped_ones_and_reports_failures(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    grid = stub_grid()
    calls = []

    def run(script, argv, log):
        """train.py finishes a cell (the SeLoRA λ 1.3 seed 1 cell fails), eval.py evaluates it."""
        name = argv[argv.index("--run-name" if "--run-name" in argv else "--resume" if "--resume" in argv else "--run") + 1]
        cell = next(c for c in comparison.cells(grid) if c.name == name)
        calls.append((os.path.basename(script), name, argv))
        if script.endswith("train.py") and cell.lam == 1.3 and cell.seed == 1:
            Path(log).write_text("training ...\nerror: non-finite loss at step 1\n")
            return 2
        finished_cell(cell, evaluated=script.endswith("eval.py"))
        return 0
    cells = comparison.cells(grid)
    assert [c.name for c in cells] == ["g-phantom-lora-seed0", "g-phantom-lora-seed1", "g-phantom-selora-lambda1.1-seed0",
                                       "g-phantom-selora-lambda1.1-seed1", "g-phantom-selora-lambda1.3-seed0",
                                       "g-phantom-selora-lambda1.3-seed1"]
    finished_cell(cells[0])                                  # done before: skipped
    finished_cell(cells[1], evaluated=False)                 # trained, not evaluated: evaluated only
    os.makedirs(cells[2].folder)
    Path(cells[2].file("checkpoint.pt")).write_bytes(b"")   # interrupted: resumed
    Path(cells[2].file("args.json")).write_text(json.dumps({"model": "tiny", "method": "selora", "lam": 1.1, "seed": 0}))

    out = io.StringIO()
    failures = comparison.run_grid(grid, "scripts", WEIGHTS, run=run, out=out)
    assert [(script, name) for script, name, _ in calls] == [
        ("eval.py", cells[1].name), ("train.py", cells[2].name), ("eval.py", cells[2].name),
        ("train.py", cells[3].name), ("eval.py", cells[3].name), ("train.py", cells[4].name), ("eval.py", cells[4].name),
        ("train.py", cells[5].name)]
    assert calls[1][2] == ["--resume", cells[2].name, "--device", "cpu"]
    assert calls[3][2] == ["--model", "tiny", "--data", "phantom", "--method", "selora", "--seed", "1", "--max-steps",
                           "1", "--lambda", "1.1", "--run-name", cells[3].name, "--device", "cpu"]
    assert calls[0][2] == ["--run", cells[1].name, "--out", cells[1].file("eval"), "--device", "cpu", "--inception-weights",
                           "inception.pth", "--seeds", "0", "1", "--steps", "2", "--guidance", "7.5", "--dims", "64",
                           "--no-clip"]
    assert list(failures) == [cells[5]] and "error: non-finite loss at step 1" in failures[cells[5]]
    assert f"{cells[5].folder}: train failed (exit status 2): error: non-finite loss at step 1" in out.getvalue()

    table = write_report(grid, WEIGHTS, failures)
    assert "| SeLoRA λ 1.3 (1 of 2 trained) | 10.5 ± 0.5 |" in table   # the failed seed's absent, the other's two sets
    assert "| SeLoRA λ 1.1 | 11 ± 0.71 | — | 1 % | 1 % | 5 | 4 s | 2.00 GiB |" in table
    assert "CLIP-score: pass --clip-weights" in table and cells[5].folder in table

    calls.clear()   # given again: only the failed cell runs
    assert list(comparison.run_grid(grid, "scripts", WEIGHTS, run=run, out=open(os.devnull, "w"))) == [cells[5]]
    assert [(script, name) for script, name, _ in calls] == [("train.py", cells[5].name)]
    calls.clear()   # other evaluation settings: every cell is evaluated again, none trained again
    again = stub_grid(evaluation={**grid.evaluation, "steps": 3})
    comparison.run_grid(again, "scripts", WEIGHTS, run=lambda s, a, l: calls.append(s) or 1, out=open(os.devnull, "w"))
    assert calls == ["scripts/eval.py"] * 5 + ["scripts/train.py"]


def test_other_training_settings_or_a_foreign_run_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    never = lambda *a: pytest.fail("nothing may run")   # noqa: E731
    comparison.run_grid(stub_grid(methods=[]), "scripts", WEIGHTS, run=never, out=open(os.devnull, "w"))
    with pytest.raises(comparison.MinisdError, match=r"grid.json: this grid's cells were trained with --max-steps 1, not 2"):
        comparison.run_grid(stub_grid(train={"max_steps": 2}), "scripts", WEIGHTS, run=never)
    grid = stub_grid(methods=["lora"], train_seeds=[0])
    cell, = comparison.cells(grid)
    os.makedirs(cell.folder)
    Path(cell.file("args.json")).write_text(json.dumps({"model": "tiny", "method": "dylora", "seed": 0}))
    failures = comparison.run_grid(grid, "scripts", WEIGHTS, run=never, out=open(os.devnull, "w"))
    assert "runs/g-phantom-lora-seed0 holds a run with --method dylora, not lora" in failures[cell]


@pytest.mark.parametrize("record", [{"train": [1], "data": {}}, {"train": {"max_steps": 1}, "data": "x"}])
def test_a_damaged_grid_record_is_one_error(tmp_path, monkeypatch, record):   # was: AttributeError
    monkeypatch.chdir(tmp_path)
    os.makedirs("comparisons/g")
    Path("comparisons/g/grid.json").write_text(json.dumps(record))
    with pytest.raises(comparison.MinisdError, match="grid.json: '(train|data)' is not an object"):
        comparison.check_settings(stub_grid())


def test_a_damaged_eval_record_is_evaluated_again(tmp_path, monkeypatch):   # was: AttributeError
    monkeypatch.chdir(tmp_path)
    cell = comparison.cells(stub_grid())[0]
    os.makedirs(cell.file("eval"))
    Path(cell.file("adapter.safetensors")).write_bytes(b"")
    Path(cell.file("eval", "eval.json")).write_text(json.dumps({"seeds": [0, 1], "steps": 2, "guidance": 7.5, "per_seed": [1],
                                                               "inception_weights": {"sha256": "abc"}}))
    assert comparison.evaluation_of(stub_grid(), cell, WEIGHTS) is None


def test_without_weights_the_columns_say_what_they_need(tmp_path, monkeypatch):
    monkeypatch.setenv("MINISD_CACHE", str(tmp_path / "cache"))

    def offline(url, dst):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(inception, "download", offline)
    monkeypatch.setattr(comparison, "download_clip_weights", lambda cache: pytest.fail("no CLIP without Inception"))
    weights = comparison.metric_weights()
    assert weights["inception"] is None and weights["clip"] is None
    for text in ("--inception-weights PATH", inception.WEIGHTS_FILE, str(tmp_path / "cache"), "--clip-weights PATH",
                 metrics.CLIP_WEIGHTS_URL, "no cell is evaluated"):
        assert text in weights["missing"]


def test_a_signal_reaches_the_cell_and_stops_the_grid(tmp_path, monkeypatch):
    """SIGTERM to the grid is passed on to the running cell, which is waited for (to save its checkpoint)."""
    child = tmp_path / "cell.py"
    child.write_text("import signal, sys, time\n"
                     "signal.signal(signal.SIGTERM, lambda *a: (print('checkpoint saved', flush=True), sys.exit(143)))\n"
                     "print('started', flush=True)\ntime.sleep(60)\n")
    log = tmp_path / "cell.log"
    monkeypatch.chdir(tmp_path)
    timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    with pytest.raises(comparison.Stopped, match="SIGTERM"):
        comparison.run_script(str(child), [], str(log))
    timer.join()
    assert log.read_text().splitlines()[1:] == ["started", "checkpoint saved"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    def stopped(script, argv, log):
        raise comparison.Stopped(signal.SIGTERM)
    out = io.StringIO()
    with pytest.raises(SystemExit) as e:   # the grid ends there, saying how to go on
        comparison.run_grid(stub_grid(), "scripts", WEIGHTS, run=stopped, out=out)
    assert e.value.code == 128 + signal.SIGTERM
    assert "g-phantom-lora-seed0: stopped (SIGTERM); give the same command again to continue" in out.getvalue()


@pytest.mark.parametrize("argv, message", [
    (["--lambdas", "0.9"], "--lambdas must be at least 1"),
    (["--methods", "lora", "lora"], "--methods lora lora: a value is repeated"),
    (["--data", "phantom", "folder", "--data-root", "x"], "--data-root x: with several data sets give NAME=DIR"),
    (["--data", "phantom", "--data-root", "x"], "--data-root x: the phantom data set is built in"),
    (["--name", "a/b"], "--name 'a/b': one folder name"),
    (["--steps", "0"], "--steps must be between 1 and 1000"),
    (["--inception-weights", "nope.pth"], "--inception-weights nope.pth: no such file"),
    (["--inception-weights", "other.pth"], "other.pth: SHA-256 "),
    (["--data", "folder", "--data-root", "missing"], "data folder missing not found"),
    (["--frobnicate", "1"], "unrecognized arguments: --frobnicate 1"),
    (["--methods", "lora", "--lambdas", "1.3"], "--lambdas 1.3: λ is SeLoRA's, and --methods has no selora"),  # was: ignored
    (["--data", "folder", "--data-root", "folder="], "--data-root folder=: no folder after folder="),  # was: the cwd
], ids=["lambda", "repeated", "roots", "phantom-root", "name", "steps", "weights", "foreign-weights", "data", "unknown",
        "lambdas-without-selora", "empty-root"])
def test_bad_flags_are_one_error_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(comparison, "run_script", lambda *a: pytest.fail("a cell ran"))
    (tmp_path / "other.pth").write_bytes(b"not pytorch-fid's")
    with pytest.raises(SystemExit) as e:
        load_script("compare.py").main(["--model", "tiny", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "runs").exists()


def test_script_exits_2_with_one_line(tmp_path):
    run = subprocess.run([sys.executable, str(Path(ROOT) / "compare.py"), "--train-seeds", "-1"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip() == f"error: --train-seeds must be between 0 and {2**32 - 1}, got -1"
