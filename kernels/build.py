"""Build the fused SeLoRA CUDA op: JIT at first use (cached on disk), ahead of time for setup.py, or as a
GPU-free compile check: `python kernels/build.py --check`."""
import argparse
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KERNELS = Path(__file__).resolve().parent
SOURCES = [KERNELS / "selora.cpp", KERNELS / "selora.cu"]
HEADERS = [KERNELS / "selora.h"]
NAME = "minisd_selora"
CXX_FLAGS = ["-O3"]
# Machine code for Hopper (H100/H200) and compute_80 PTX, which the driver compiles once for any other
# GPU of compute capability >= 8.0. Naming an arch here keeps torch from adding one per known GPU.
NVCC_FLAGS = ["-O3", "-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_80,code=compute_80"]


def cuda_home():
    """The CUDA toolkit folder: $CUDA_HOME / $CUDA_PATH, else asked of the `nvcc` on PATH (which may be a
    wrapper script, so its own location says nothing)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return home
    if shutil.which("nvcc") is None:
        raise RuntimeError("no CUDA toolkit: nvcc is not on PATH and CUDA_HOME is not set")
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.cu"
        empty.write_text("")
        plan = subprocess.run(["nvcc", "-dryrun", "-c", str(empty)], capture_output=True, text=True, cwd=tmp)
    found = re.search(r"^#\$ _HERE_=(.+)$", plan.stdout + plan.stderr, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"could not locate the CUDA toolkit from nvcc: {(plan.stdout + plan.stderr)[-500:]}")
    return str(Path(found.group(1).strip()).resolve().parent)


def _use_cuda_home():
    """Point torch's extension builder at the toolkit (it reads CUDA_HOME once, at import)."""
    home = cuda_home()
    os.environ["CUDA_HOME"] = home
    import torch.utils.cpp_extension as cpp_extension
    cpp_extension.CUDA_HOME = home


def cache_dir():
    """$MINISD_CACHE (default ~/.cache/minisd)/kernels/<torch version>-<hash of sources and flags>."""
    import torch
    digest = hashlib.sha256()
    for source in SOURCES + HEADERS:
        digest.update(source.read_bytes())
    digest.update(" ".join(CXX_FLAGS + NVCC_FLAGS).encode())
    root = Path(os.environ.get("MINISD_CACHE") or Path.home() / ".cache" / "minisd")
    return root / "kernels" / f"{torch.__version__}-{digest.hexdigest()[:12]}"


def _load(build_directory, verbose):
    _use_cuda_home()
    from torch.utils.cpp_extension import load
    return load(name=NAME, sources=[str(s) for s in SOURCES], extra_cflags=CXX_FLAGS, extra_cuda_cflags=NVCC_FLAGS,
                build_directory=str(build_directory), verbose=verbose)


@contextlib.contextmanager
def build_lock(directory):
    """One builder at a time in `directory`, and none waiting on a dead one: torch's own lock file, which a
    build killed midway leaves behind for every later build to wait on forever, is removed once this process
    holds the folder's flock (which the system releases when its holder dies)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "build.flock", "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        (directory / "lock").unlink(missing_ok=True)
        yield


def load_extension(verbose=False):
    """The compiled op module, built with ninja on first use and reused from the cache afterwards."""
    build_directory = cache_dir()
    with build_lock(build_directory):
        return _load(build_directory, verbose)


def cuda_extensions():
    """The op as setup.py's ahead-of-time extension `minisd._selora_cuda` (paths relative to the repo root)."""
    _use_cuda_home()
    from torch.utils.cpp_extension import CUDAExtension
    sources = [str(s.relative_to(KERNELS.parent)) for s in SOURCES]
    return [CUDAExtension("minisd._selora_cuda", sources, extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS})]


def check(verbose=False):
    """Compile, link and import the op in a temporary folder (no GPU needed); 0 when it builds."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="minisd-kernels-") as tmp:
        try:
            _load(tmp, verbose)
        except Exception as e:  # the compiler's message is in the exception
            print(f"error: the SeLoRA CUDA op does not build: {e}", file=sys.stderr)
            return 1
    print(f"ok: {', '.join(s.name for s in SOURCES)} compiled and linked for sm_90 + compute_80 PTX "
          f"in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="compile the sources in a temporary folder and exit")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args()
    if not args.check:
        parser.error("nothing to do: pass --check (the op builds itself at first use)")
    sys.exit(check(args.verbose))
