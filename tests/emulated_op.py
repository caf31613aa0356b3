"""The fused SeLoRA op built for the CPU: kernels/selora.cpp and selora.cu compiled by the host compiler
against tests/emulated_cuda.h, so that the kernels' tiling, indexing and reductions run without a GPU."""
import re
from pathlib import Path

from torch.utils.cpp_extension import load

from helpers import load_script

HERE = Path(__file__).resolve().parent
LAUNCH = re.compile(r"(\w+(?:<[^<>;]*>)?)<<<([^;]*?)>>>\(")


def emulated_source(text):
    """CUDA includes replaced by the emulation header, launches by calls of emulate_launch, and CPU
    tensors accepted where the op asks for CUDA ones."""
    lines, shimmed = [], False
    for line in text.splitlines():
        if re.match(r"#include <(ATen|c10)/cuda/", line):
            if not shimmed:
                lines.append('#include "emulated_cuda.h"')
                shimmed = True
            continue
        lines.append(line)
    text, launches = LAUNCH.subn(r"emulate_launch(\2, \1, ", "\n".join(lines) + "\n")
    assert "<<<" not in text and (launches > 0 or "__global__" not in text), "a kernel launch was not rewritten"
    return text.replace(".is_cuda()", ".is_cpu()")


def build(directory):
    """The emulated extension module, compiled in `directory`."""
    directory = Path(directory)
    sources = []
    for source in load_script("kernels/build.py").SOURCES:
        target = directory / f"{source.stem}_{source.suffix[1:]}.cpp"
        target.write_text(emulated_source(source.read_text()))
        sources.append(str(target))
    return load(name="minisd_selora_emulated", sources=sources, extra_include_paths=[str(HERE)],
                extra_cflags=["-std=c++20", "-O2", "-pthread"], extra_ldflags=["-pthread"],
                build_directory=str(directory))
