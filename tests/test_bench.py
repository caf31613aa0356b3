"""bench/gpu.sh's stage machinery and its closing summary (bench/targets.py), on the CPU in a few seconds;
the whole rehearsal is `bash bench/gpu.sh DIR --rehearse` (BENCHMARKS.md)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, load_script

GPU_SH = Path(ROOT) / "bench" / "gpu.sh"

needs_bash = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def write_targets(folder, bench, *targets):
    (folder / f"{bench}.json").write_text(json.dumps({"environment": {}, "targets": list(targets)}))


def test_targets_summary_has_one_line_per_target(tmp_path, capsys, monkeypatch):
    common = load_script("bench/common.py")
    write_targets(tmp_path, "kernel", common.target("speed-up", 1.83, "×", "≥ 1.5", True),
                  common.target("bandwidth", 41.2, "%", "≥ 60", False), common.target("unmeasured", None, "%", "≥ 1", True))
    (tmp_path / "broken.json").write_text("{")
    monkeypatch.setattr(sys, "argv", ["targets.py", str(tmp_path), "kernel", "train_step", "broken"])
    assert load_script("bench/targets.py").main() == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == ["kernel: speed-up: 1.83 × (target ≥ 1.5): met",
                         "kernel: bandwidth: 41.2 % (target ≥ 60): NOT met",
                         "kernel: unmeasured: – (target ≥ 1): not measured"]
    assert "no results: train_step.json was not written" in lines[3]
    assert lines[4].startswith("broken: (all targets): – (target –): unreadable broken.json")
    assert (tmp_path / "targets.md").read_text().count("\n") == 2 + 5


def run_gpu_sh(results, *args, **env):
    return subprocess.run(["bash", str(GPU_SH), str(results), *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHON": sys.executable, **env})


@needs_bash
def test_rehearsal_records_stages_and_ends_with_the_targets(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    write_targets(results, "kernel", {"name": "speed-up", "figure": 2.0, "unit": "×", "target": "≥ 1.5", "met": True})
    done = run_gpu_sh(results, "--rehearse", "--stages", "environment,targets")
    assert done.returncode == 0, done.stdout + done.stderr
    stages = (results / "stages.md").read_text()
    assert "| environment | ok, log environment.log |" in stages and "cuda-tests" not in stages
    assert "torch" in (results / "environment.log").read_text()
    last = done.stdout.splitlines()[-5:]
    assert last[0] == "kernel: speed-up: 2 × (target ≥ 1.5): met"
    assert [line.split(":")[0] for line in last[1:]] == ["train_step", "sample", "cxr_ldm", "fid"]


@needs_bash
def test_stages_past_the_deadline_are_skipped_and_fail_the_run(tmp_path):
    done = run_gpu_sh(tmp_path, "--stages", "environment", GPU_SH_SECONDS="0")
    assert done.returncode == 1
    assert "| environment | skipped: no time left |" in (tmp_path / "stages.md").read_text()


@needs_bash
@pytest.mark.parametrize("args", [[], ["--rehearse"], ["DIR", "--unknown"], ["DIR", "--stages"]])
def test_gpu_sh_refuses_bad_arguments(args):
    done = subprocess.run(["bash", str(GPU_SH), *args], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("usage: bash bench/gpu.sh RESULTS_DIR")
