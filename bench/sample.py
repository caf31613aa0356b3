"""50-step DDIM + CFG latency: minisd vs diffusers' StableDiffusionPipeline on the same random weights.

    python bench/sample.py                          # SD-1.5 size, 512 px, fp16 and bf16, on the GPU
    python bench/sample.py --config tiny --device cpu --size 64 --steps 5 --precisions fp32   # smoke run
"""
import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import minisd  # noqa: E402
from minisd.checkpoint.writing import save_diffusers  # noqa: E402
from minisd.cli import PRECISIONS  # noqa: E402
from minisd.sampling import ddim_sample, initial_latents  # noqa: E402
from common import environment, median_time, write_json  # noqa: E402

PROMPT = "frontal chest x-ray, the heart is normal in size, no pleural effusion or pneumothorax"


def diffusers_pipeline(sd, folder, dtype, device):
    import diffusers
    save_diffusers(sd, folder)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="sd15")
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--precisions", nargs="+", default=["fp16", "bf16"], choices=PRECISIONS)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    rows = []
    base = minisd.build(args.config, seed=0)
    for precision in args.precisions:
        dtype = PRECISIONS[precision]
        ours = minisd.build(args.config, seed=0, device=args.device, dtype=dtype)
        with tempfile.TemporaryDirectory() as folder:
            pipe = diffusers_pipeline(base, folder, dtype, args.device)
        latents = initial_latents(1, args.size, args.size, seed=0).to(args.device, dtype)
        t_ours = median_time(lambda: ddim_sample(ours, [PROMPT], steps=args.steps, height=args.size, width=args.size,
                                                 progress=False), args.device, repeats=args.repeats)
        t_ref = median_time(lambda: pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=7.5, height=args.size,
                                         width=args.size, latents=latents, output_type="pt"), args.device, repeats=args.repeats)
        rows.append({"precision": precision, "minisd_s": t_ours, "diffusers_s": t_ref, "ratio": t_ours / t_ref})
        del ours, pipe
    env = environment(args.device)
    print(f"# {args.config}, {args.size}x{args.size}, {args.steps} DDIM steps + CFG, batch 1 — {env}")
    print("| precision | minisd (s) | diffusers (s) | minisd / diffusers |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['minisd_s']:.3f} | {r['diffusers_s']:.3f} | {r['ratio']:.2f} |")
    write_json(args.json, {"env": env, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
