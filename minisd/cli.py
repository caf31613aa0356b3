"""What every script shares: bad input is one `error:` line and exit status 2, never a traceback."""
import functools
import sys
import warnings

import torch

from .errors import MinisdError

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main_guard(main):
    @functools.wraps(main)
    def run(argv=None):
        warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
        try:
            return main(argv)
        except MinisdError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
    return run


def pick_device(name="auto"):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MinisdError(f"--device {name}: CUDA is not available on this machine")
    return name
