"""Small shared pieces of the tests."""
import importlib.util
import os

import torch

import minisd


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def random_model(config="tiny", seed=0):
    """A random model whose norms are not the identity, so swapped or missing norm weights would show."""
    sd = minisd.build(config, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in sd.named_parameters():
        if p.dim() == 1:
            p.data += 0.1 * torch.randn(p.shape, generator=g)
    return sd


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(path):
    """A file (path relative to the repository) imported as a fresh module, e.g. a top-level script."""
    name = os.path.splitext(os.path.basename(path))[0] + "_under_test"
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
