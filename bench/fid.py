"""FID feature throughput: minisd's FID-Inception (64/192/768/2048 features from one pass) vs pytorch-fid's
InceptionV3([3]) (2048 features), on the same images, weights and device; and that the two agree.

Images are random uint8 [3,S,S] tensors in memory, turned into [0,1] floats on the CPU as both projects'
loaders do; the timed loops are metrics.inception_features and pytorch-fid's get_activations loop.
Without --inception-weights both networks load one file of random weights in the layout of
pt_inception-2015-12-05-6726825d.pth.

    python bench/fid.py --json fid.json                        # GPU: 2,000 images of 512 px
    python bench/fid.py --smoke                                # CPU: 40 images of 64 px (numbers mean nothing)

Targets: minisd's four-dims pass ≥ 2× pytorch-fid's images/s; FID-2048 equal to pytorch-fid's (relative 1e-3).
"""
import argparse
import os
import sys
import tempfile
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars inside the timed loops

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minisd import metrics  # noqa: E402
from minisd.errors import MinisdError  # noqa: E402
from minisd.cli import main_guard, pick_device  # noqa: E402
from minisd.inception import DIMS, FIDInception, exact_fp32, load_inception  # noqa: E402
from common import environment, median_time, target, write_json  # noqa: E402


def random_weights(path):
    """FID-Inception weights with random BatchNorm affine parameters and running statistics taken from one
    pass over random images (so activations neither vanish nor blow up), fc included, saved as the real file."""
    torch.manual_seed(0)
    net = FIDInception()
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.2)
            m.momentum = None  # running statistics = those of the one batch
        net.train()(torch.rand(4, 3, 64, 64))
    state = net.eval().state_dict()
    state["fc.weight"] = torch.randn(1008, 2048) * 2048 ** -0.5
    state["fc.bias"] = torch.zeros(1008)
    torch.save(state, path)
    return path


def pytorch_fid_inception(weights, device):
    """pytorch-fid's InceptionV3([3]) with `weights` in place of its download."""
    from pytorch_fid import inception as pfi
    download = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = lambda *args, **kwargs: torch.load(weights, map_location="cpu", weights_only=True)
    try:
        return pfi.InceptionV3([3]).to(device).eval()
    finally:
        pfi.load_state_dict_from_url = download


def pytorch_fid_features(model, images, batch_size, device):
    """pytorch-fid's get_activations loop over in-memory uint8 images (ToTensor's /255 on the CPU)."""
    out = np.empty((len(images), 2048))
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size].float().div(255).to(device)
            pred = model(batch)[0]
            out[start:start + len(batch)] = pred.squeeze(3).squeeze(2).cpu().numpy()
    return out


def random_images(n, size):
    """n uint8 [3,size,size] noise images; the second half has lower contrast, so the halves' FID is not ~0."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    images[n // 2:] = images[n // 2:] // 2 + 64
    return images


def max_rel_diff(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def halves_fid(features, pytorch_fid_distance=False):
    """FID-2048 between the first and second half of the images."""
    a, b = np.split(features, [len(features) // 2])
    if pytorch_fid_distance:
        from pytorch_fid.fid_score import calculate_frechet_distance
        return calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    return metrics.fid({2048: a}, {2048: b})[2048]


@main_guard
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    p.add_argument("--smoke", action="store_true", help="40 random images of 64 px, one repeat")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--size", type=int, default=512, help="image side in pixels (both networks resize to 299)")
    p.add_argument("--batch-size", type=int, default=50, help="both implementations (pytorch-fid's default)")
    p.add_argument("--large-batch", type=int, default=200, help="minisd's second, larger batch")
    p.add_argument("--inception-weights", help="pt_inception-2015-12-05-6726825d.pth; default: random weights")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.smoke:
        args.images, args.size, args.repeats = 40, 64, 1
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    if args.images < 4 or min(args.size, args.batch_size, args.large_batch, args.repeats) < 1:
        raise MinisdError("--images must be at least 4 (FID compares two halves); --size, --batch-size, "
                          "--large-batch and --repeats at least 1")
    device = pick_device(args.device)
    cuda = device.startswith("cuda")

    images = random_images(args.images, args.size)
    with tempfile.TemporaryDirectory() as folder:
        weights = args.inception_weights or random_weights(os.path.join(folder, "random_inception.pth"))
        ours = load_inception(weights, device)
        reference = pytorch_fid_inception(weights, device)

    features = {}

    def timed(name, extract):
        """images/s of extract(), whose last result is kept in features[name]."""
        def run():
            features[name] = extract()
        # a warm-up pass on the GPU lets cuDNN pick its algorithms; on the CPU it would only double the run
        seconds = median_time(run, device, warmup=1 if cuda else 0, repeats=args.repeats)
        return args.images / seconds

    defaults = "torch defaults" + (f" (cuDNN TF32 {'on' if torch.backends.cudnn.allow_tf32 else 'off'})" if cuda else "")
    rows = [{"implementation": "pytorch-fid InceptionV3([3])", "numerics": defaults, "dims": [2048], "batch": args.batch_size,
             "images_per_s": timed("pytorch-fid", lambda: pytorch_fid_features(reference, images, args.batch_size, device))}]
    if cuda:
        def exact_reference():
            with exact_fp32():
                return pytorch_fid_features(reference, images, args.batch_size, device)
        rows.append({"implementation": "pytorch-fid InceptionV3([3])", "numerics": "fp32, TF32 off", "dims": [2048],
                     "batch": args.batch_size, "images_per_s": timed("pytorch-fid exact", exact_reference)})
    # the larger batch only when it changes how the images are batched
    batches = [args.batch_size] + ([args.large_batch] if min(args.large_batch, args.images) > args.batch_size else [])
    for batch in batches:
        rows.append({"implementation": "minisd FIDInception", "numerics": "fp32, TF32 off", "dims": list(DIMS),
                     "batch": batch, "images_per_s": timed(f"minisd {batch}", lambda b=batch: metrics.inception_features(
                         ours, images, DIMS, batch_size=b, device=device))})
    base = rows[0]["images_per_s"]
    for r in rows:
        r["vs_pytorch_fid"] = r["images_per_s"] / base

    same_numerics = "pytorch-fid exact" if cuda else "pytorch-fid"
    ours_2048 = features[f"minisd {args.batch_size}"][2048]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer images than dims is expected in a smoke run; both sides see it
        fid_ours, fid_reference = halves_fid(ours_2048), halves_fid(features[same_numerics], pytorch_fid_distance=True)
    checks = {
        "features_2048_max_rel_diff": max_rel_diff(ours_2048, features[same_numerics]),
        "fid_2048_halves_minisd": fid_ours, "fid_2048_halves_pytorch_fid": fid_reference,
        "fid_2048_rel_diff": abs(fid_ours - fid_reference) / abs(fid_reference),
    }
    if cuda:
        checks["features_2048_max_rel_diff_vs_torch_defaults"] = max_rel_diff(ours_2048, features["pytorch-fid"])
    if len(batches) > 1:
        checks["features_max_rel_diff_across_batch_sizes"] = max(
            max_rel_diff(features[f"minisd {batches[1]}"][d], features[f"minisd {batches[0]}"][d]) for d in DIMS)

    env = environment(device)
    print(f"# FID features of {args.images} random {args.size}x{args.size} uint8 images, "
          f"{'weights ' + args.inception_weights if args.inception_weights else 'random weights'} — {env}")
    print("| implementation | numerics | dims | batch | images/s | vs pytorch-fid |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['implementation']} | {r['numerics']} | {'/'.join(map(str, r['dims']))} | {r['batch']} "
              f"| {r['images_per_s']:.1f} | {r['vs_pytorch_fid']:.2f} |")
    print(f"\n2048-d features, minisd vs pytorch-fid ({'TF32 off' if cuda else 'same numerics'}): max relative difference "
          f"{checks['features_2048_max_rel_diff']:.2e}"
          + (f"; vs pytorch-fid with torch defaults {checks['features_2048_max_rel_diff_vs_torch_defaults']:.2e}"
             if cuda else ""))
    if len(batches) > 1:
        print(f"minisd features, batch {batches[1]} vs {batches[0]}: max relative difference "
              f"{checks['features_max_rel_diff_across_batch_sizes']:.2e}")
    print(f"FID-2048 first vs second half: minisd {fid_ours:.6g}, pytorch-fid {fid_reference:.6g}, "
          f"relative difference {checks['fid_2048_rel_diff']:.2e}"
          + (f" ({args.images // 2} images per half, fewer than 2048 dims)" if args.images // 2 < 2048 else ""))
    speedup = max(r["vs_pytorch_fid"] for r in rows if r["implementation"].startswith("minisd"))
    targets = [target("FID features: minisd (4 dims in one pass) vs pytorch-fid (2048), images/s", speedup, "×",
                      "≥ 2", speedup >= 2),
               target("FID-2048: minisd vs pytorch-fid, relative difference", checks["fid_2048_rel_diff"], "",
                      "≤ 1e-3", checks["fid_2048_rel_diff"] <= 1e-3)]
    write_json(args.json, {"environment": env, "args": vars(args), "rows": rows, "checks": checks, "targets": targets})


if __name__ == "__main__":
    main()
