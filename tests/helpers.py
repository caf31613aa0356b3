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


def write_dicom(path, pixels, photometric="MONOCHROME2", bits_stored=12, **attributes):
    """A DICOM file (CR, explicit VR little endian) holding `pixels` ([rows, columns], or [frames, rows, columns]),
    with any further attributes set by keyword, e.g. WindowCenter=..., RescaleSlope=...."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    ds.Modality = "CR"
    ds.set_pixel_data(pixels, photometric, bits_stored)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID or generate_uid()
    for name, value in attributes.items():
        setattr(ds, name, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
