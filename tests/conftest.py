import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow (full SD-1.5 size)")


def pytest_configure(config):
    # The test tensors are small: with one thread, OpenMP workers never spin waiting on each other
    # (which costs seconds per forward pass on a busy two-core machine).
    torch.set_num_threads(1)
    config.addinivalue_line("markers", "slow: full-size or long checks, run with --runslow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
