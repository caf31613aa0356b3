"""Sampling latency: 50-step DDIM with classifier-free guidance at 512², batch 1, fp16 and bf16 — minisd against
diffusers' StableDiffusionPipeline holding the same random SD-1.5-size weights (converted by minisd's own
diffusers-name mapping), the same prompt and the same initial noise; the whole call timed (text encoding,
denoising, VAE decoding), median of --repeats.

minisd rows: `ddim_sample` as sample.py runs it on a GPU (U-Net and VAE in channels_last, the denoising step
captured once as a CUDA graph and replayed), and, to show what each part buys, without the CUDA graph and
without channels_last. diffusers: the pipeline as its documentation sets it up (`from_pretrained` in the
dtype, SDPA attention, DDIMScheduler), `output_type="pt"`.

    python bench/sample.py --json results/sample.json    # H100/H200, about a minute
    python bench/sample.py --smoke                       # CPU rehearsal with the tiny model
"""
import argparse
import copy
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minisd.checkpoint.writing import write_pipeline_files  # noqa: E402
from minisd.cli import PRECISIONS, main_guard  # noqa: E402
from minisd.layout import prepare_for_sampling  # noqa: E402
from minisd.sampling import ddim_sample, initial_latents  # noqa: E402
from common import (diffusers_models, environment, median_time, random_model, rehearse_on_cpu, save_results,  # noqa: E402
                    target)

PROMPT = "frontal chest x-ray, the heart is normal in size, no pleural effusion or pneumothorax"
GOAL = 0.7   # minisd's latency / diffusers'


def pipeline_parts(sd):
    """The tokenizer and scheduler of a StableDiffusionPipeline, from the files minisd writes for a diffusers folder."""
    import diffusers
    import transformers
    with tempfile.TemporaryDirectory() as folder:
        write_pipeline_files(sd, folder)
        return (transformers.CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer")),
                diffusers.DDIMScheduler.from_pretrained(folder, subfolder="scheduler"))


def diffusers_pipeline(networks, tokenizer, scheduler, dtype):
    """StableDiffusionPipeline over copies of `networks` in `dtype` (no safety checker)."""
    import diffusers
    pipe = diffusers.StableDiffusionPipeline(**{part: copy.deepcopy(m).to(dtype) for part, m in networks.items()},
                                             tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the results here (rewritten after each measurement)")
    p.add_argument("--smoke", action="store_true", help="CPU rehearsal: tiny model, 64 px, 5 steps, fp32")
    p.add_argument("--precisions", nargs="+", default=["fp16", "bf16"], choices=PRECISIONS)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per contender (median), after one untimed")
    a = p.parse_args(argv)
    a.config, a.device, a.size, a.steps = "sd15", "cuda", 512, 50
    if a.smoke:
        a.config, a.device, a.size, a.steps, a.precisions, a.repeats = "tiny", "cpu", 64, 5, ["fp32"], 2
        rehearse_on_cpu()
    elif not torch.cuda.is_available():
        p.error("needs a CUDA GPU (or --smoke for the CPU rehearsal)")
    return a


@main_guard
def main(argv=None):
    a = parse(argv)
    env = environment(a.device)
    rows, targets = [], []

    def latency(model, **options):
        return median_time(lambda: ddim_sample(model, [PROMPT], steps=a.steps, height=a.size, width=a.size,
                                               progress=False, **options), a.device, warmup=1, repeats=a.repeats)

    base = random_model(a.config, a.device)   # fp32; each contender gets its own copy in the precision
    networks, (tokenizer, scheduler) = diffusers_models(base, torch.float32, a.device), pipeline_parts(base)
    latents = initial_latents(1, a.size, a.size, seed=0)
    for precision in a.precisions:
        dtype = PRECISIONS[precision]
        ours = copy.deepcopy(base).to(dtype=dtype)
        prepare_for_sampling(ours, a.device)
        times = {"minisd": latency(ours), "minisd, no CUDA graph": latency(ours, graphs=False)}
        ours.unet.to(memory_format=torch.contiguous_format)
        ours.vae.to(memory_format=torch.contiguous_format)
        times["minisd, no channels_last"] = latency(ours)
        ours = None   # free the device for the reference
        pipe = diffusers_pipeline(networks, tokenizer, scheduler, dtype)
        start = latents.to(a.device, dtype)
        times["diffusers"] = median_time(lambda: pipe(PROMPT, num_inference_steps=a.steps, guidance_scale=7.5,
                                                      height=a.size, width=a.size, latents=start, output_type="pt"),
                                         a.device, warmup=1, repeats=a.repeats)
        pipe = None
        for name, seconds in times.items():
            rows.append({"precision": precision, "contender": name, "seconds": seconds,
                         "vs_diffusers": seconds / times["diffusers"]})
        ratio = times["minisd"] / times["diffusers"]
        targets.append(target(f"{a.steps}-step DDIM + CFG latency vs diffusers, {a.size}², batch 1, {precision}",
                              ratio, "x", f"<= {GOAL}", ratio <= GOAL))
        save_results(a.json, env, targets, args=vars(a), rows=rows)
    print(f"# {a.config}, {a.size}x{a.size}, {a.steps} DDIM steps + CFG, batch 1 — {env}")
    print("| precision | contender | seconds | vs diffusers |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['contender']} | {r['seconds']:.3f} | {r['vs_diffusers']:.2f} |")


if __name__ == "__main__":
    main()
