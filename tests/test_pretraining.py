"""Training the chest-X-ray LDM from scratch on cxr-tiny and the phantom at 32 px: the VAE stage, the U-Net stage
on its VAE, each resumed after a kill to exactly the weights of an uninterrupted run, a SeLoRA fine-tune of the
trained model, the model's own resolution as the scripts' default, and one-line errors for stages given in the
wrong order or a VAE of another model."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import minisd
from minisd.errors import MinisdError
from helpers import ROOT, load_script, random_model

COMMON = ["--model", "cxr-tiny", "--data", "phantom", "--batch-size", "2", "--max-steps", "16", "--save-every", "3",
          "--val-max", "4", "--val-images", "2", "--val-steps", "2"]
STAGES = {"vae": [*COMMON, "--stage", "vae", "--resolution", "32", "--ema", "0.9"],
          "unet": [*COMMON, "--stage", "unet", "--grad-accum", "2", "--vae", "runs/vae"]}
# What each stage writes, and the files that must come out the same after a kill and --resume.
WEIGHTS = {"vae": ["vae_last/model.safetensors"],
           "unet": ["model_last/unet/model.safetensors", "model_last/text_encoder/model.safetensors"]}


def script_main(script, cwd, argv):
    """A top-level script's main(argv) run in `cwd`, in this process."""
    with pytest.MonkeyPatch.context() as m:
        m.chdir(cwd)
        return load_script(script).main(argv)


def log(run):
    with open(os.path.join(run, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs/vae (--stage vae) and runs/unet (--stage unet on it), trained without interruption."""
    cwd = tmp_path_factory.mktemp("stages")
    for stage, argv in STAGES.items():
        script_main("train.py", cwd, [*argv, "--run-name", stage])
    return cwd


def test_vae_stage(runs):
    run = runs / "runs" / "vae"
    args = json.loads((run / "args.json").read_text())
    assert (args["stage"], args["method"], args["split"], args["lr_end"], args["kl_weight"]) == ("vae", None, "70/10/20", 0.0, 1e-4)
    steps = [r for r in log(run) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 17))
    assert steps[0]["lr"] == 1e-4 and steps[-1]["lr"] == 0.0 and steps[0]["lr"] > steps[8]["lr"] > steps[-1]["lr"]
    validation = [r for r in log(run) if r.get("event") == "validation"][-1]
    assert validation["val_loss"] > 0 and 0 < validation["ssim"] < 1 and validation["measured_on"] == "4 val images"
    config = json.loads((run / "vae" / "config.json").read_text())
    assert config["_class_name"] == "CXRVAE" and config["scaling_factor"] == validation["scaling_factor"] != 1.0
    assert len((run / "manifest_train.jsonl").read_text().splitlines()) == 1400   # 70% of the phantom's 2,000
    assert (run / "samples" / "step000016.png").exists() and (run / "vae_last" / "model.safetensors").exists()
    state = torch.load(run / "checkpoint.pt", weights_only=True)   # --ema: the files hold the average
    last = load_file(run / "vae_last" / "model.safetensors")
    assert all(torch.equal(value, state["ema"]["shadow"]["vae." + name]) for name, value in last.items())
    assert not all(torch.equal(value, state["trainable"]["vae." + name]) for name, value in last.items())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["best"]["model"] == "vae" and summary["last"]["ssim"] == validation["ssim"]
    assert summary["best"]["parameters"]["vae"]["trainable"] == summary["best"]["parameters"]["all"]["trainable"]


def test_unet_stage_writes_a_model_that_loads(runs):
    run = runs / "runs" / "unet"
    args = json.loads((run / "args.json").read_text())
    # the U-Net stage's defaults, and the VAE run's resolution and split
    assert (args["cfg_dropout"], args["lr_end"], args["resolution"], args["split"]) == (0.1, 4.62e-5, 32, "70/10/20")
    sd = minisd.load(run / "model")
    assert sd.config.unet.sample_size == 4 and sd.config.resolution == 32
    vae = load_file(runs / "runs" / "vae" / "vae" / "model.safetensors")
    assert all(torch.equal(v, sd.vae.state_dict()[k]) for k, v in vae.items())   # the VAE stage's best VAE
    assert sd.vae.scaling_factor == json.loads((runs / "runs" / "vae" / "vae" / "config.json").read_text())["scaling_factor"]
    untrained = minisd.load("cxr-tiny")
    trained = untrained.text_encoder.trained_parameters()
    for name, value in sd.text_encoder.state_dict().items():   # BERT frozen but for its pooler and last LayerNorms
        assert torch.equal(value, untrained.text_encoder.state_dict()[name]) == (name not in trained), name
    steps = [r for r in log(run) if "loss" in r]
    assert steps[-1]["lr"] == pytest.approx(4.62e-5) and (run / "samples" / "step000016.png").exists()


def test_vae_gradient_checkpointing_saves_memory_not_gradients():
    """--grad-checkpointing reaches the VAE (the --stage vae network): fewer activations kept for backward, the
    same gradients."""
    sd = random_model("cxr-tiny")
    sd.vae.requires_grad_(True)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    grads, kept = [], []
    for enabled in (False, True):
        sd.set_gradient_checkpointing(enabled)
        sd.vae.zero_grad()
        count = [0]

        def pack(tensor):
            count[0] += tensor.numel()
            return tensor
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = sd.vae.decode(sd.vae.encode(images)[0]).square().mean()
        loss.backward()
        grads.append([p.grad.clone() for p in sd.vae.parameters()])
        kept.append(count[0])
    assert kept[1] < 0.6 * kept[0]
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(*grads))


@pytest.mark.parametrize("stage", ["vae", "unet"])
def test_kill_and_resume_ends_with_the_same_weights(runs, stage):
    """SIGKILL after a checkpoint, then --resume: the weights of the uninterrupted run, bit for bit (the VAE stage
    with its weight average, the U-Net stage with gradient accumulation and prompt dropout)."""
    name = f"killed-{stage}"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *STAGES[stage], "--run-name", name],
                            cwd=runs, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    folder = runs / "runs" / name
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (folder / "log.jsonl").exists() and any(r.get("step", 0) >= 4 for r in log(folder)):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert not (folder / WEIGHTS[stage][0]).exists(), "the run finished before it could be killed"
    script_main("train.py", runs, ["--resume", name])
    for file in WEIGHTS[stage]:
        straight, resumed = load_file(runs / "runs" / stage / file), load_file(folder / file)
        assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight), file
    assert [r["step"] for r in log(folder) if "loss" in r] == list(range(1, 17))


def test_selora_fine_tune_of_the_trained_model(runs, tmp_path):
    """Adapters on the trained folder as on SD-1.5, on the stages' split; sample.py takes the model's resolution
    (32 px) by default."""
    script_main("train.py", runs, ["--model", "runs/unet/model", "--data", "phantom", "--batch-size", "2", "--max-steps", "2", "--expand-every", "1", "--val-max", "2",
                                   "--val-images", "1", "--val-steps", "2", "--run-name", "selora"])
    run = runs / "runs" / "selora"
    args = json.loads((run / "args.json").read_text())
    assert (args["method"], args["resolution"], args["stage"], args["split"]) == ("selora", 32, None, "70/10/20")
    from minisd.adapters import read_adapter
    tensors, meta = read_adapter(str(run / "adapter.safetensors"))
    assert "model.diffusion_model.context_proj.lora_A" in tensors and sum(meta["ranks"].values()) > len(meta["ranks"])
    for argv in (["--run", "selora"], ["--run", "unet"]):   # the adapter on its base; the stage's own model
        script_main("sample.py", runs, [*argv, "--prompt", "Small left pleural effusion.", "--steps", "2",
                                        "--out", str(tmp_path / argv[1])])
        assert Image.open(tmp_path / argv[1] / "0000-seed0.png").size == (32, 32)


def test_a_stage_keeps_the_split_of_a_run_on_the_other_iu_release():
    """A VAE trained on OpenI's release, a U-Net on the Kaggle release of the same studies: one split."""
    from argparse import Namespace
    from minisd.stage_args import split_of_run
    record = {"data": "openi", "data_root": "openi", "data_seed": 1, "split": "70/10/20"}
    args = Namespace(data="iuxray", data_root="kaggle", data_seed=0, split=None)
    assert split_of_run(args, set(), record, "the VAE") == {"data_seed": 1, "split": "70/10/20"}
    with pytest.raises(MinisdError, match="--data-seed 0: the VAE was trained on the openi split of --data-seed 1"):
        split_of_run(args, {"data_seed"}, record, "the VAE")
    assert split_of_run(Namespace(data="phantom", data_root=None, data_seed=0, split=None), set(), record, "x") == {}


@pytest.mark.parametrize("argv, expect", [
    (["--stage", "unet"], "--stage unet trains on a trained VAE's latents: give --vae RUN"),
    (["--stage", "unet", "--vae", "runs/early"], "the --stage vae run has no trained VAE yet"),
    (["--stage", "unet", "--vae", "runs/unet"], "a --stage unet run, not a --stage vae run"),
    (["--stage", "vae", "--vae", "runs/vae"], "--vae is for --stage unet: train the VAE first"),
    (["--stage", "unet", "--vae", "runs/vae", "--model", "cxr-ldm"], "the VAE of a cxr-tiny run; this run trains cxr-ldm"),
    (["--stage", "unet", "--vae", "runs/vae/vae", "--model", "cxr-ldm"], "vae/config.json: a VAE of channels [32, 32, 32, 32, 32]"),
    (["--stage", "unet", "--vae", "sd-vae"], "_class_name 'AutoencoderKL', expected 'CXRVAE'"),
    (["--stage", "unet", "--vae", "runs/vae", "--split", "80/10/10"], "puts some of this split's validation and test images"),
    (["--stage", "vae", "--model", "tiny"], "--model cxr-ldm or cxr-tiny, not tiny"),
    (["--model", "runs/unet/model", "--data-seed", "1"], "runs/unet/model was trained on the phantom split of --data-seed 0"),
    (["--stage", "vae", "--method", "lora"], "--method is for fine-tuning with adapters"),
    (["--stage", "vae", "--ema", "1"], "--ema is a decay between 0 and 1"),
    (["--ema", "0.99"], "--ema is for training the chest-X-ray LDM from scratch"),
    (["--stage", "vae", "--split", "70/20"], "--split 70/20: expected train/val/test (or train/test) percentages"),
])
def test_bad_stage_input_is_one_line(runs, capsys, argv, expect):
    (runs / "runs" / "early").mkdir(exist_ok=True)   # a VAE run that has not validated yet
    (runs / "runs" / "early" / "args.json").write_text(json.dumps({"stage": "vae", "model": "cxr-tiny"}))
    (runs / "sd-vae").mkdir(exist_ok=True)
    (runs / "sd-vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(SystemExit) as exit:
        script_main("train.py", runs, ["--model", "cxr-tiny", "--data", "phantom", *argv, "--run-name", "bad"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], lines
    assert not (runs / "runs" / "bad").exists()


def test_a_model_folder_is_replaced_whole(tmp_path):
    """atomic_folder (vae/, model/): after a crash at any point, the next start's clean-up leaves the old folder
    or the new one, never a mix and never none; a failed write leaves the old one."""
    from minisd.files import PREVIOUS, atomic_folder, remove_temporary_files
    model = tmp_path / "model"

    def writer(text, fail=False):
        def write(folder):
            os.makedirs(folder)
            (Path(folder) / "weights").write_text(text)
            if fail:
                raise OSError("disk full")
        return write

    atomic_folder(model, writer("old"))
    os.replace(model, f"{model}{PREVIOUS}")   # a crash after the old folder was moved aside ...
    os.makedirs(f"{model}.tmp123")            # ... with the new one still under its temporary name
    remove_temporary_files(tmp_path)
    assert (model / "weights").read_text() == "old" and os.listdir(tmp_path) == ["model"]
    atomic_folder(model, writer("new"))
    os.makedirs(f"{model}{PREVIOUS}")          # a crash after the new one was put in place
    remove_temporary_files(tmp_path)
    assert (model / "weights").read_text() == "new" and os.listdir(tmp_path) == ["model"]
    with pytest.raises(OSError):
        atomic_folder(model, writer("half", fail=True))
    assert (model / "weights").read_text() == "new" and os.listdir(tmp_path) == ["model"]
