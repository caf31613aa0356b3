"""Generate images with SD-1.5 (optionally with a trained adapter) by DDIM with classifier-free guidance."""
import os

import minisd
from minisd.cli import (PRECISIONS, ArgumentParser, check, check_finite, check_pixels, check_seed, check_steps, main_guard,
                        output_folder, pick_device, read_run_record, run_folder, run_outputs, warn_half_precision_on_cpu)
from minisd.cxr.model import native_resolution
from minisd.errors import MinisdError
from minisd.files import atomic_json, clear_outputs
from minisd.images import captioned_grid, save_png
from minisd.layout import prepare_for_sampling
from minisd.sampling import ddim_sample


MAX_IMAGES = 10_000   # files 0000-… to 9999-…, which the next call into the same --out replaces


def parse_args(argv):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", help="single .safetensors/.ckpt file, diffusers folder, hub id, 'tiny', or a chest-X-ray "
                                   "LDM (its folder, 'cxr-ldm', 'cxr-tiny') "
                                   f"(default: the --run's, else {minisd.DEFAULT_MODEL})")
    p.add_argument("--adapter", help="adapter .safetensors written by train.py")
    p.add_argument("--run", help="use the model and adapter recorded in runs/RUN (--model and --adapter override them)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts", help="text file with one prompt per line")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="image k of the call starts from noise seeded seed + k")
    p.add_argument("--height", type=int, help="pixels (default: the --run's training resolution, else 512; 128 for the "
                                              "tiny model; a chest-X-ray LDM's own, 256)")
    p.add_argument("--width", type=int)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--batch-size", type=int, default=4, help="images per sampling batch")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="of the model while sampling")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", default="samples",
                   help="output folder; an earlier call's images, grid.png and prompts.json there are replaced")
    return p.parse_args(argv)


def read_prompts(args):
    prompts = list(args.prompt or [])
    if args.prompts:
        try:
            with open(args.prompts, encoding="utf-8-sig") as f:   # a byte order mark (Notepad's) is no text
                lines = [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise MinisdError(f"--prompts {args.prompts}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise MinisdError(f"--prompts {args.prompts}: not UTF-8 text") from None
        if not lines:
            raise MinisdError(f"--prompts {args.prompts}: holds no prompt (one prompt per line)")
        prompts += lines
    if not prompts:
        raise MinisdError("no prompt given: use --prompt TEXT or --prompts FILE")
    return prompts


@main_guard
def main(argv=None):
    args = parse_args(argv)
    for flag in ("num_images", "batch_size"):
        check(getattr(args, flag) >= 1, f"--{flag.replace('_', '-')}", getattr(args, flag), "at least 1")
    check_steps("--steps", args.steps)
    check_finite("--guidance", args.guidance)
    check_seed("--seed", args.seed)
    for flag in ("height", "width"):
        if getattr(args, flag) is not None:
            check_pixels(f"--{flag}", getattr(args, flag))
    prompts = read_prompts(args)
    check(len(prompts) * args.num_images <= MAX_IMAGES, "--num-images", args.num_images,
          f"at most {MAX_IMAGES // len(prompts):,} with {len(prompts):,} prompt(s) ({MAX_IMAGES:,} images a call)")
    prompts = [p for p in prompts for _ in range(args.num_images)]
    model, adapter, run_resolution = args.model, args.adapter, None
    if args.run:
        folder = run_folder("--run", args.run)
        try:
            record = read_run_record(folder, required=["model"])
        except MinisdError as e:
            raise MinisdError(f"--run {args.run}: {e}") from None
        recorded_model, recorded_adapter = run_outputs("--run", folder, record)
        model, adapter = model or recorded_model, adapter or recorded_adapter
        run_resolution = record.get("resolution") if model == recorded_model else None   # what it trained at
        if run_resolution is not None and not (isinstance(run_resolution, int) and run_resolution >= 8 and run_resolution % 8 == 0):
            raise MinisdError(f"{os.path.join(folder, 'args.json')}: 'resolution' is {run_resolution!r}, expected a positive multiple of 8")
    model = model or minisd.DEFAULT_MODEL
    output_folder("--out", args.out)
    clear_outputs(args.out, ("[0-9][0-9][0-9][0-9]-seed*.png", "grid.png", "prompts.json"))   # an earlier call's images
    device = pick_device(args.device)
    warn_half_precision_on_cpu(args.precision, device)
    sd = minisd.load(model, device=device, dtype=PRECISIONS[args.precision])
    if adapter:
        from minisd.adapters import load_adapter
        load_adapter(sd, adapter)
    prepare_for_sampling(sd, device)
    default_size = run_resolution or native_resolution(model) or (128 if model == "tiny" else 512)
    images = ddim_sample(sd, prompts, negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance,
                         height=args.height or default_size, width=args.width or default_size, seed=args.seed,
                         batch_size=args.batch_size)
    for k, image in enumerate(images):
        save_png(image, os.path.join(args.out, f"{k:04d}-seed{args.seed + k}.png"))
    columns = args.num_images if args.num_images > 1 else None
    save_png(captioned_grid(images, prompts, columns=columns), os.path.join(args.out, "grid.png"))
    atomic_json([{"file": f"{k:04d}-seed{args.seed + k}.png", "prompt": p, "seed": args.seed + k}
                 for k, p in enumerate(prompts)], os.path.join(args.out, "prompts.json"))
    print(f"wrote {len(images)} image(s) and grid.png to {args.out}")


if __name__ == "__main__":
    main()
