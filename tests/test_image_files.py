"""Image files: DICOM films against pydicom's own display pipeline (real films from the pydicom-data package),
the 12-bit rule for 16-bit PNGs, and every bad DICOM as one line."""
import csv
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import write_dicom
from minisd import image_files, metrics
from minisd.data import load_dataset
from minisd.errors import MinisdError

pydicom = pytest.importorskip("pydicom")
from pydicom.pixels import apply_modality_lut, apply_voi_lut  # noqa: E402  (pydicom may be missing: skipped)


def film(name):
    """A file of the pydicom-data package (test extra), found through pydicom, never downloaded."""
    from pydicom.data import get_testdata_file
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} comes with the pydicom-data package (pip install pydicom-data)")
    return path


@pytest.fixture(scope="module")
def chest_film():
    """The real CR chest film (1955 x 1841, 15-bit, MONOCHROME1) read by minisd, uncompressed and as J2K."""
    return {name: image_files.read_planes(film(name)) for name in ("RG1_UNCR.dcm", "RG1_J2KR.dcm")}


def unit_range(values, ds):
    """pydicom's windowing output range for these unsigned, unrescaled films: [0, 2^BitsStored - 1]."""
    assert ds.PixelRepresentation == 0 and "RescaleSlope" not in ds and "ModalityLUTSequence" not in ds
    return values / (2 ** ds.BitsStored - 1)


# ------------------------------------------------------------------------------------------- real films
def test_real_film_is_pydicoms_modality_lut_then_voi_then_inversion(chest_film):
    ds = pydicom.dcmread(film("RG1_UNCR.dcm"))
    assert ds.PhotometricInterpretation == "MONOCHROME1" and "VOILUTSequence" not in ds and "WindowCenter" in ds
    expected = 1 - unit_range(apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds), ds)
    plane, = chest_film["RG1_UNCR.dcm"]
    assert plane.shape == (1955, 1841) and plane.dtype == np.float32
    assert np.abs(plane - expected).max() < 1e-6
    # the inversion shows bone bright: the spine's column is brighter than the lung fields beside it
    middle = plane[600:1200]
    assert middle[:, 880:960].mean() > middle[:, 400:700].mean() + 0.1


def test_jpeg2000_twin_loads_identically(chest_film):
    assert image_files.image_problem(film("RG1_J2KR.dcm")) is None
    assert pydicom.dcmread(film("RG1_J2KR.dcm"), stop_before_pixels=True).file_meta.TransferSyntaxUID.is_compressed
    (uncompressed,), (j2k,) = chest_film["RG1_UNCR.dcm"], chest_film["RG1_J2KR.dcm"]
    assert np.array_equal(uncompressed, j2k)


def test_voi_lut_sequence_is_preferred_to_a_window(tmp_path):
    ds = pydicom.dcmread(film("vlut_04.dcm"))
    table = ds.VOILUTSequence[0].LUTData
    significant = 2 ** int(max(table)).bit_length() - 1   # the LUT's own range: its declared 16 bits are not used
    expected = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds) / significant
    ours, = image_files.read_planes(film("vlut_04.dcm"))
    assert np.abs(ours - expected).max() < 1e-6 and ours.max() > 0.9
    ds.WindowCenter, ds.WindowWidth = 10, 20   # both present: the LUT wins, as pydicom's prefer_lut default
    ds.save_as(tmp_path / "both.dcm")
    assert np.array_equal(image_files.read_planes(tmp_path / "both.dcm")[0], ours)
    windowed, = image_files.read_planes(tmp_path / "both.dcm", window=(100, 50))   # --window replaces both
    del ds.VOILUTSequence
    ds.WindowCenter, ds.WindowWidth = 100, 50
    assert np.abs(windowed - unit_range(apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds), ds)).max() < 1e-6


def test_voi_lut_declared_16_bit_holding_12_bit_values_reaches_white(tmp_path):
    from pydicom.dataset import Dataset
    stored = np.random.default_rng(2).integers(0, 4096, (16, 16)).astype(np.uint16)
    stored[0, 0] = 4095
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]   # 16 bits declared, as films of the Indiana University set
    item.LUTData = [int(4095 * (v / 4095) ** 0.5) for v in range(4096)]   # a curve that stays within 12 bits
    item["LUTData"].VR = "US"
    path = write_dicom(tmp_path / "lut.dcm", stored, VOILUTSequence=[item])
    ds = pydicom.dcmread(path)
    ours, = image_files.read_planes(path)
    assert np.abs(ours - apply_voi_lut(ds.pixel_array, ds) / 4095).max() < 1e-6 and ours.max() == 1


def test_modality_lut_sequence_without_voi_spans_the_film(tmp_path):
    ds = pydicom.dcmread(film("mlut_18.dcm"))
    assert "ModalityLUTSequence" in ds and "WindowCenter" not in ds and "VOILUTSequence" not in ds
    values = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    expected = (values - values.min()) / (values.max() - values.min())
    assert np.abs(image_files.read_planes(film("mlut_18.dcm"))[0] - expected).max() < 1e-6


# ------------------------------------------------------------------------------------------- windows
@pytest.mark.parametrize("function", [None, "LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_window_with_rescale_follows_pydicom(tmp_path, function):
    stored = np.random.default_rng(0).integers(-2048, 2048, (20, 24)).astype(np.int16)
    extra = {"VOILUTFunction": function} if function else {}
    path = write_dicom(tmp_path / "ct.dcm", stored, RescaleSlope=2, RescaleIntercept=-1024,
                       WindowCenter=[40, 400], WindowWidth=[400, 1500], **extra)   # the first window is used
    ds = pydicom.dcmread(path)
    low, high = -2048 * 2 - 1024, 2047 * 2 - 1024   # pydicom's output range: signed 12 bits, rescaled
    expected = (apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds) - low) / (high - low)
    ours, = image_files.read_planes(path)
    assert np.abs(ours - expected).max() < 1e-6 and 0 < ours.mean() < 1
    ds.WindowCenter, ds.WindowWidth = -500, 1
    ds.VOILUTFunction = "LINEAR"
    expected = (apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds) - low) / (high - low)
    assert np.array_equal(image_files.read_planes(path, window=(-500, 1))[0], expected.astype(np.float32))


def test_monochrome1_is_the_inverse_of_monochrome2(tmp_path):
    stored = np.random.default_rng(1).integers(0, 4096, (16, 12)).astype(np.uint16)
    for window in ({"WindowCenter": 2000, "WindowWidth": 3000}, {}):
        one, = image_files.read_planes(write_dicom(tmp_path / "1.dcm", stored, "MONOCHROME1", **window))
        two, = image_files.read_planes(write_dicom(tmp_path / "2.dcm", stored, "MONOCHROME2", **window))
        assert np.allclose(one, 1 - two, atol=1e-7) and two.min() == 0 and two.max() == 1


def test_dicom_in_data_sets_and_eval_folders(tmp_path):
    stored = np.tile(np.arange(0, 4096, 128, dtype=np.uint16), (32, 1))
    for k in range(3):
        write_dicom(tmp_path / f"films/{k}.dcm", stored, WindowCenter=2048, WindowWidth=4096)
    with open(tmp_path / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows([["file_name", "text"]] + [[f"films/{k}.dcm", f"film {k}"] for k in range(3)])
    ds = load_dataset("folder", tmp_path, split="train", resolution=16)
    assert ds[0]["image"].shape == (3, 16, 16)
    windowed = load_dataset("folder", tmp_path, split="train", resolution=16, window=(1024, 1024))[0]["image"]
    assert (windowed == 1).float().mean() > 0.5 > (ds[0]["image"] == 1).float().mean()
    assert metrics.list_images(tmp_path / "films")[0].name == "0.dcm"
    image = metrics.load_image(tmp_path / "films" / "0.dcm")
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert torch.equal(image[0], torch.from_numpy(image_files.read_planes(tmp_path / "films" / "0.dcm")[0]))


# ------------------------------------------------------------------------------------------- 12-bit PNG
def test_sixteen_bit_png_below_4096_is_twelve_bit_data(tmp_path, monkeypatch):
    monkeypatch.setattr(image_files, "_warned_twelve_bit", False)
    ramp = np.linspace(0, 4000, 24 * 20).reshape(24, 20).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "a.png")
    Image.fromarray(ramp // 2).save(tmp_path / "b.png")
    Image.fromarray(ramp * 16).save(tmp_path / "full.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a, b, full = (image_files.read_planes(tmp_path / n)[0] for n in ("a.png", "b.png", "full.png"))
        from_eval = metrics.load_image(tmp_path / "a.png")
    assert np.allclose(a, ramp / 4095) and np.allclose(b, (ramp // 2) / 4095) and a.max() > 0.97
    assert np.allclose(full, ramp * 16 / 65535)   # above 12 bits: scaled by the full 16-bit range
    assert [str(w.message).split(":")[0] for w in caught] == [str(tmp_path / "a.png")]   # once, naming a file
    assert "read as 12-bit data" in str(caught[0].message)
    assert torch.allclose(from_eval, torch.from_numpy(ramp / 4095).float().expand(3, -1, -1))


def test_a_multi_page_image_is_refused_like_a_multi_frame_film(tmp_path):
    pages = [Image.fromarray(np.full((8, 8), 60 * k, np.uint8)) for k in range(3)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    pages[0].save(tmp_path / "moving.png", save_all=True, append_images=pages[1:])
    pages[0].save(tmp_path / "one.tif")
    for name, kind in (("stack.tif", "TIFF"), ("moving.png", "PNG")):
        reason = f"multi-page {kind} (minisd reads single films)"
        assert image_files.image_problem(tmp_path / name) == reason
        with pytest.raises(MinisdError, match=re.escape(f"{tmp_path / name}: {reason}")):
            metrics.load_image(tmp_path / name)
    assert image_files.image_problem(tmp_path / "one.tif") is None


# ------------------------------------------------------------------------------------------- bad DICOMs
def bad_dicoms(folder):
    """{file name: the reason minisd gives}, one file per kind of bad DICOM."""
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless, UID
    pixels = np.zeros((8, 8), np.uint16)
    reasons = {}
    ds = pydicom.dcmread(write_dicom(folder / "nopixels.dcm", pixels))
    del ds.PixelData
    ds.save_as(folder / "nopixels.dcm")
    reasons["nopixels.dcm"] = "DICOM without pixel data"
    write_dicom(folder / "frames.dcm", np.zeros((3, 8, 8), np.uint16))
    reasons["frames.dcm"] = "multi-frame DICOM (minisd reads single films)"
    for name, syntax in (("jpegls.dcm", JPEGLSLossless), ("private.dcm", UID("1.2.826.0.1.3680043.9.9999.1"))):
        ds = pydicom.dcmread(write_dicom(folder / name, pixels))
        ds.file_meta.TransferSyntaxUID = syntax
        ds.PixelData = encapsulate([b"\xff\x4f not a codestream"])
        ds["PixelData"].VR = "OB"
        ds.save_as(folder / name, enforce_file_format=True)
    if not get_decoder(JPEGLSLossless).is_available:
        reasons["jpegls.dcm"] = ("DICOM in JPEG-LS Lossless Image Compression without an installed decoder "
                                 "(install one of: python-gdcm>=3.0.10; pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1; "
                                 "pyjpegls>=1.2)")
    reasons["private.dcm"] = "DICOM in transfer syntax 1.2.826.0.1.3680043.9.9999.1, which pydicom cannot decode"
    whole = write_dicom(folder / "cut.dcm", np.ones((64, 64), np.uint16)).read_bytes()
    (folder / "cut.dcm").write_bytes(whole[:len(whole) - 1000])
    (folder / "text.dcm").write_text("not a DICOM file")
    reasons["cut.dcm"] = reasons["text.dcm"] = "unreadable image"
    return reasons


def test_every_bad_dicom_is_one_line(tmp_path):
    reasons = bad_dicoms(tmp_path)
    for name, reason in reasons.items():
        assert image_files.image_problem(tmp_path / name) == reason, name
        with pytest.raises(MinisdError) as error:
            metrics.load_image(tmp_path / name)
        message = str(error.value)
        assert message.startswith(f"{tmp_path / name}: ") and "\n" not in message, message
        if reason != "unreadable image":
            assert message == f"{tmp_path / name}: {reason}"


def test_damaged_dicoms_read_or_fail_in_one_line(tmp_path):
    ramp = np.arange(0, 4096, 16, dtype=np.uint16).reshape(16, 16)
    good = write_dicom(tmp_path / "good.dcm", ramp, WindowCenter=2000, WindowWidth=3000, RescaleSlope=1,
                       RescaleIntercept=0).read_bytes()
    rng = np.random.default_rng(0)
    path = tmp_path / "damaged.dcm"
    for k in range(60):
        data = bytearray(good[:rng.integers(1, len(good))] if k % 3 == 0 else good)   # cut short, or bytes changed
        for position in rng.integers(128, len(data), 0 if k % 3 == 0 else 6):
            data[position] = rng.integers(0, 256)
        path.write_bytes(bytes(data))
        reason = image_files.image_problem(path)
        assert reason is None or "\n" not in reason
        try:
            planes = image_files.read_planes(path)
        except image_files.UnreadableImage as error:
            assert str(error).startswith(f"{path}: ") and "\n" not in str(error)
        else:
            assert all(np.isfinite(p).all() and 0 <= p.min() and p.max() <= 1 for p in planes)
    ds = pydicom.dcmread(tmp_path / "good.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # pydicom says that NaN is no valid decimal string: that is the point
        ds.RescaleSlope = "NaN"
        ds.save_as(path)
    with pytest.raises(image_files.UnreadableImage, match="transform cannot be applied .*not finite"):
        image_files.read_planes(path)


def test_bad_dicoms_in_a_data_set_are_skipped_counted_and_named(tmp_path):
    reasons = bad_dicoms(tmp_path)
    for k in range(2):
        write_dicom(tmp_path / f"good{k}.dcm", np.full((8, 8), 100 * k, np.uint16))
    rows = [[name, "a film"] for name in [*reasons, "good0.dcm", "good1.dcm"]]
    with open(tmp_path / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows([["file_name", "text", "split"]] + [row + ["train"] for row in rows])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_dataset("folder", tmp_path, resolution=8)
    assert sorted(r["file"] for r in ds.manifest()) == ["good0.dcm", "good1.dcm"]
    message, = [str(w.message) for w in caught]
    assert "1 DICOM without pixel data" in message and "1 multi-frame DICOM" in message
    assert "2 unreadable image" in message and "which pydicom cannot decode" in message
    assert ds.report["DICOM without pixel data"] == 1 and ds.report["unreadable image"] == 2


# ------------------------------------------------------------------------------------------- header edge cases
def edited_dicom(path, edit, pixels=None, **kwargs):
    """A film written by write_dicom, then changed by `edit(ds)` as pydicom allows (no validation)."""
    from pydicom import config
    ds = pydicom.dcmread(write_dicom(path, np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) if pixels is None
                                     else pixels, **kwargs))
    with config.disable_value_validation():
        edit(ds)
        ds.save_as(path)
    return path


def halve_columns(ds):
    ds.Columns = 32


def one_bit(ds):
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0


def as_one_sample(ds):
    ds.SamplesPerPixel = 1


@pytest.mark.parametrize("edit, kwargs", [
    (halve_columns, {}),                                    # was: a traceback, or a [3, 2, 48, 32] "image"
    (one_bit, {}),                                          # 16 frames of 1-bit pixels
    (as_one_sample, {"pixels": np.zeros((16, 16, 3), np.uint8), "photometric": "RGB", "bits_stored": 8}),
])
def test_pixel_data_larger_than_one_film_is_one_line(tmp_path, edit, kwargs):
    path = edited_dicom(tmp_path / "long.dcm", edit, **kwargs)
    assert image_files.image_problem(path) == image_files.PIXELS_LONGER
    with pytest.raises(MinisdError, match=f"^{path}: {image_files.PIXELS_LONGER} .*decoded as"):
        metrics.load_image(path)
    with pytest.raises(image_files.UnreadableImage, match=image_files.PIXELS_LONGER):
        image_files.load_image(path, 8)


def test_bare_data_sets_read_as_the_film(tmp_path):
    """Files without the preamble, or without a transfer syntax, as older tools write them."""
    film_path = write_dicom(tmp_path / "film.dcm", np.arange(48 * 64, dtype=np.uint16).reshape(48, 64))
    expected = image_files.read_planes(film_path)[0]
    ds = pydicom.dcmread(film_path)
    ds.preamble = None
    pydicom.dcmwrite(tmp_path / "bare.dcm", ds, enforce_file_format=False)         # was: not a readable DICOM file
    empty = edited_dicom(tmp_path / "empty.dcm", lambda ds: setattr(ds.file_meta, "TransferSyntaxUID", ""))  # was: a traceback
    del ds.file_meta
    ds.save_as(tmp_path / "meta.dcm", implicit_vr=True, little_endian=True)    # was: its pixel data cannot be decoded
    for path in (tmp_path / "bare.dcm", empty, tmp_path / "meta.dcm"):
        assert image_files.image_problem(path) is None, path
        assert np.array_equal(image_files.read_planes(path)[0], expected), path
    (tmp_path / "text.dcm").write_bytes(b"\x08\x00\x05\x00CS\x04\x00ISO_" * 4)    # a data set, but no film
    assert image_files.image_problem(tmp_path / "text.dcm") == "unreadable image"


@pytest.mark.parametrize("attributes, reason", [
    ({"RescaleSlope": 0, "RescaleIntercept": 0}, "Rescale Slope 0"),       # was: a black film
    ({"RescaleSlope": "NaN", "RescaleIntercept": 0}, "not finite"),        # was: a black film (no window to show it)
    ({"RescaleSlope": "inf", "RescaleIntercept": 0}, "not finite"),
    ({"WindowCenter": 100, "WindowWidth": "inf"}, "Window Center 100.0 and Width inf"),   # was: a grey film
    ({"WindowCenter": "-inf", "WindowWidth": 100}, "Window Center -inf and Width 100.0"),
])
def test_degenerate_modality_or_window_is_one_line(tmp_path, attributes, reason):
    path = edited_dicom(tmp_path / "film.dcm", lambda ds: [ds.__setattr__(k, v) for k, v in attributes.items()])
    with pytest.raises(MinisdError, match=f"^{path}: its modality or VOI transform cannot be applied .*{reason}"):
        metrics.load_image(path)


def test_float_pixel_data_is_named(tmp_path):
    def to_float(ds):
        del ds.PixelData, ds.PixelRepresentation
        ds.FloatPixelData = np.zeros((48, 64), np.float32).tobytes()
        ds.BitsAllocated = ds.BitsStored = 32
    path = edited_dicom(tmp_path / "map.dcm", to_float)
    assert image_files.image_problem(path) == "DICOM with float pixel data (minisd reads films)"   # was: no pixel data


@pytest.mark.parametrize("values, reason", [
    (np.full((8, 8), 1000.0, np.float32), "floating-point image with values 1000 to 1000, outside \\[0, 1\\]"),  # was: white
    (np.full((8, 8), np.nan, np.float32), "floating-point image with values that are not finite"),              # was: black
    (np.full((8, 8), 70000, np.int32), "32-bit integer image with values 70000 to 70000, outside the 16-bit range"),
    (np.full((8, 8), -5, np.int32), "32-bit integer image with values -5 to -5, outside the 16-bit range"),
])
def test_tiffs_beyond_sixteen_bits_or_unit_floats_are_one_line(tmp_path, values, reason):
    path = tmp_path / "wide.tif"
    Image.fromarray(values).save(path)
    with pytest.raises(MinisdError, match=f"^{path}: {reason}"):
        metrics.load_image(path)
    with pytest.raises(image_files.UnreadableImage, match=reason):
        image_files.load_image(path, 8)


def test_float_tiff_in_unit_range_is_read_as_it_is(tmp_path):
    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "ramp.tif")
    assert np.array_equal(metrics.load_image(tmp_path / "ramp.tif")[0].numpy(), ramp)   # was: 8-bit steps of 0 and 1
