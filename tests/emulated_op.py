"""The fused SeLoRA op built for the CPU: kernels/selora.cpp and selora.cu compiled by the host compiler
against tests/emulated_cuda.h, so that the kernels' tiling, indexing and reductions run without a GPU."""
import hashlib
import os
import re
from pathlib import Path

from torch.utils.cpp_extension import load

from helpers import load_script

HERE = Path(__file__).resolve().parent
LAUNCH = re.compile(r"(\w+(?:<[^<>;]*>)?)<<<([^;]*?)>>>\(")


def emulated_source(text):
    """CUDA includes replaced by the emulation header, launches by calls of emulate_launch, pointer casts
    by one that checks alignment, and CPU tensors accepted where the op asks for CUDA ones."""
    lines, shimmed = [], False
    for line in text.splitlines():
        if re.match(r"#include <((ATen|c10)/cuda/|mma\.h)", line):
            if not shimmed:
                lines.append('#include "emulated_cuda.h"')
                shimmed = True
            continue
        lines.append(line)
    text, launches = LAUNCH.subn(r"emulate_launch(\2, \1, ", "\n".join(lines) + "\n")
    assert "<<<" not in text and (launches > 0 or "__global__" not in text), "a kernel launch was not rewritten"
    return text.replace(".is_cuda()", ".is_cpu()").replace("reinterpret_cast<", "emulated_aligned_cast<")


def build(directory):
    """The emulated extension module, compiled in `directory`."""
    directory = Path(directory)
    sources = []
    kernels = load_script("kernels/build.py")
    for source in kernels.SOURCES:
        target = directory / f"{source.stem}_{source.suffix[1:]}.cpp"
        text = emulated_source(source.read_text())
        if not target.exists() or target.read_text() != text:  # an unchanged file keeps its time: no rebuild
            target.write_text(text)
        sources.append(str(target))
    # -fno-strict-aliasing: the kernels read 16-byte rows through a vector type, as CUDA code does.
    return load(name="minisd_selora_emulated", sources=sources, extra_include_paths=[str(HERE), str(kernels.KERNELS)],
                extra_cflags=["-std=c++20", "-O2", "-pthread", "-fno-strict-aliasing"], extra_ldflags=["-pthread"],
                build_directory=str(directory))


def cached_build():
    """The emulated extension, compiled once per version of its sources in $MINISD_CACHE (default
    ~/.cache/minisd)/kernels/emulated-<hash> and reused from there (for the benchmarks' rehearsal)."""
    kernels = load_script("kernels/build.py")
    digest = hashlib.sha256()
    for path in kernels.SOURCES + kernels.HEADERS + [HERE / "emulated_cuda.h", Path(__file__)]:
        digest.update(path.read_bytes())
    root = Path(os.environ.get("MINISD_CACHE") or Path.home() / ".cache" / "minisd")
    directory = root / "kernels" / f"emulated-{digest.hexdigest()[:12]}"
    with kernels.build_lock(directory):
        return build(directory)
