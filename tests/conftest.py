import os
import shutil

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow (full SD-1.5 size)")


def pytest_configure(config):
    # The test tensors are small: with one thread, OpenMP workers never spin waiting on each other
    # (which costs seconds per forward pass on a busy two-core machine).
    torch.set_num_threads(1)
    config.addinivalue_line("markers", "slow: full-size or long checks, run with --runslow")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one; `pytest -m cuda` runs them)")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_cuda = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("slow") and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if item.get_closest_marker("cuda") and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture(scope="session")
def emulated_extension(tmp_path_factory):
    """The fused op's own sources, kernels included, built for the CPU (tests/emulated_cuda.h), with every
    output NaN-filled before it is computed, so that an element a kernel skips shows."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("needs a C++ compiler")
    import emulated_op
    extension = emulated_op.build(tmp_path_factory.mktemp("emulated_op"))
    extension.set_poison(True)
    return extension
