"""Image files as float planes in [0, 1]: PNG, JPEG, TIFF ... through Pillow and DICOM through pydicom.

DICOM films go through the display pipeline of the standard (PS3.4 N.2): the modality LUT (rescale slope and
intercept, or a Modality LUT Sequence), then the first VOI transform of the file (a VOI LUT Sequence if there
is one, else the first Window Center/Width with its VOI LUT Function; `window=(center, width)` replaces
both with a linear window), then MONOCHROME1 inverted, so that bone is bright as in every other file. A
film without any VOI transform is scaled by its own minimum and maximum, as viewers show it.

A 16-bit file whose maximum is below 4096 holds 12-bit data (a common export of 12-bit films): it is scaled
by 4095, not 65535, with one warning per process.
"""
import math
import os
import re
import warnings

import numpy as np
import torch
from PIL import Image

from .checkpoint.files import first_line

DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff") + DICOM_SUFFIXES
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
WIDE = SIXTEEN_BIT + ("F",)   # modes that Pillow's convert would clip to 8 bits
TWELVE_BIT_MAX = 4095
GREY = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
SEQUENCE_END = b"\xfe\xff\xdd\xe0"  # the item that closes encapsulated (compressed) pixel data
PIXELS_LONGER = "DICOM pixel data larger than one film of its Rows × Columns"


class UnreadableImage(ValueError):
    """A file that cannot be used as an image; the message is one line that starts with the file name."""


UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_warned_twelve_bit = False


# ------------------------------------------------------------------------------------------- any image
def load_image(path, resolution, window=None):
    """An image file as float tensor [3, R, R] in [-1, 1]: any mode to 3 channels, shortest side resized to R
    (bicubic, antialiased), then centre-cropped."""
    planes = [resize_and_crop(plane, resolution) for plane in read_planes(path, window)]
    image = torch.from_numpy(np.stack(planes * (3 // len(planes))))
    return image.clamp_(0, 1).mul_(2).sub_(1)


def read_planes(path, window=None):
    """The image at `path`, full size, as one (grey) or three (colour) float32 planes in [0, 1]."""
    if is_dicom(path):
        return read_dicom(path, window)
    with Image.open(path) as image:
        if reason := several_pages(image):
            raise UnreadableImage(f"{path}: {reason}")
        image.load()
        return to_planes(image, path)


def several_pages(image):
    """Why a Pillow image is not one film (a multi-page TIFF, an animation), as a multi-frame DICOM is not; or
    None. A JPEG's extra pictures (MPO: thumbnails, depth maps) belong to its one picture."""
    if getattr(image, "n_frames", 1) > 1 and image.format != "MPO":
        return f"multi-page {image.format} (minisd reads single films)"
    return None


def to_planes(image, path="image"):
    """A Pillow image as one (grey) or three (colour) float32 planes in [0, 1]; transparency over black."""
    if image.mode == "F":
        return [float_plane(np.asarray(image, dtype=np.float32), path)]
    if image.mode in SIXTEEN_BIT:
        return [sixteen_bit_plane(np.asarray(image, dtype=np.float32), path)]
    grey = image.mode in ("1", "L", "LA", "La")
    alpha = "A" in image.getbands() or "transparency" in image.info
    mode = ("LA" if alpha else "L") if grey else ("RGBA" if alpha else "RGB")
    array = np.asarray(image.convert(mode), dtype=np.float32) / 255
    if array.ndim == 2:
        return [array]
    colour = array[..., :-1] * array[..., -1:] if alpha else array
    return [colour[..., k] for k in range(colour.shape[-1])]


def sixteen_bit_plane(values, path):
    """16-bit grey values scaled to [0, 1]: by 65535, or by 4095 where the maximum says they are 12-bit data."""
    global _warned_twelve_bit
    minimum, maximum = float(values.min()), float(values.max())
    if minimum < 0 or maximum > 65535:   # Pillow's mode I also holds 32-bit integers
        raise UnreadableImage(f"{path}: 32-bit integer image with values {minimum:.0f} to {maximum:.0f}, outside "
                              f"the 16-bit range 0 to 65535")
    if maximum > TWELVE_BIT_MAX:
        return values / 65535
    if not _warned_twelve_bit:
        _warned_twelve_bit = True
        warnings.warn(f"{path}: 16-bit image with maximum {maximum:.0f} < 4096, read as 12-bit data (scaled by "
                      f"{TWELVE_BIT_MAX}, not 65535); other such files are read the same way without a warning")
    return values / TWELVE_BIT_MAX


def float_plane(values, path):
    """A floating-point image (TIFF) holds its grey values in [0, 1]; any other range has no agreed scale."""
    if not np.isfinite(values).all():
        raise UnreadableImage(f"{path}: floating-point image with values that are not finite")
    minimum, maximum = float(values.min()), float(values.max())
    if minimum < 0 or maximum > 1:
        raise UnreadableImage(f"{path}: floating-point image with values {minimum:g} to {maximum:g}, outside [0, 1]")
    return values


def resize_and_crop(plane, resolution):
    """torchvision's Resize(R, bicubic, antialias) + CenterCrop(R) on one float plane."""
    height, width = plane.shape
    short, long = sorted((height, width))
    size = (resolution, int(resolution * long / short))
    size = size if height <= width else size[::-1]  # (height, width)
    resized = np.asarray(Image.fromarray(plane).resize(size[::-1], Image.BICUBIC))
    top = int(round((size[0] - resolution) / 2.0))
    left = int(round((size[1] - resolution) / 2.0))
    return resized[top:top + resolution, left:left + resolution]


def image_check(path):
    """(why the file at `path` cannot be used ("missing image", "unreadable image", a DICOM reason) or None,
    its (width, height) when it can). Cheap: reads the header and checks that the file is not cut short."""
    try:
        if is_dicom(path):
            return dicom_check(path)
        with Image.open(path) as image:
            kind, size = image.format, image.size
            if reason := several_pages(image):
                return reason, None
            if kind not in ("PNG", "JPEG"):
                image.verify()
        tail = file_tail(path)
    except FileNotFoundError:
        return "missing image", None
    except UNREADABLE:
        return "unreadable image", None
    if (kind == "PNG" and not tail.endswith(PNG_END)) or (kind == "JPEG" and b"\xff\xd9" not in tail):
        return "unreadable image", None
    return None, size


def image_problem(path):
    """Why the file at `path` cannot be used, or None (see image_check)."""
    return image_check(path)[0]


def file_tail(path, size=1024):
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - size))
        return f.read()


def is_dicom(path):
    """A .dcm/.dicom file, or any file with the DICOM preamble ("DICM" at byte 128)."""
    if str(path).lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


# ------------------------------------------------------------------------------------------- DICOM
def read_dicom(path, window=None):
    """A single-frame DICOM film as planes in [0, 1] (see the module's docstring); UnreadableImage otherwise."""
    # pydicom raises anything from ValueError to struct.error on damaged files, and warns about every
    # small departure from the standard; a film either reads or is one line
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = dicom_header(path, full=True)
        except Exception as e:
            raise UnreadableImage(f"{path}: not a readable DICOM file ({first_line(e)})") from None
        problem = dataset_problem(ds)
        if problem:
            raise UnreadableImage(f"{path}: {problem}")
        try:
            pixels = ds.pixel_array
        except Exception as e:
            raise UnreadableImage(f"{path}: its pixel data cannot be decoded ({first_line(e)})") from None
        # pydicom reads data that holds more than one frame as several frames
        film = (ds.Rows, ds.Columns) + ((3,) if ds.PhotometricInterpretation in COLOUR else ())
        if pixels.shape != film:
            raise UnreadableImage(f"{path}: {PIXELS_LONGER} (Rows {ds.Rows}, Columns {ds.Columns}, Samples per "
                                  f"Pixel {ds.get('SamplesPerPixel')}; decoded as {'×'.join(map(str, pixels.shape))})")
        try:
            return display_planes(pixels, ds, window)
        except Exception as e:   # a LUT or window the standard does not allow
            raise UnreadableImage(f"{path}: its modality or VOI transform cannot be applied ({first_line(e)})") from None


def dicom_header(path, full=False):
    """The data set of a DICOM file: all of it, or its header with the pixel data left unread. A file without
    the preamble (a bare data set, as older tools write) is read as pydicom's force=True reads it, when that
    finds pixel data; one without a transfer syntax gets the encoding pydicom read it in."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
    options = {} if full else {"defer_size": "1 KB"}
    try:
        ds = pydicom.dcmread(path, **options)
    except InvalidDicomError:
        ds = pydicom.dcmread(path, force=True, **options)
        if "PixelData" not in ds:   # not a data set at all: the error without force says so
            raise
    if not ds.file_meta.get("TransferSyntaxUID"):
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                          ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds


def display_planes(pixels, ds, window):
    """Decoded pixels through the modality LUT, the VOI transform and MONOCHROME1's inversion."""
    from pydicom.pixels import apply_modality_lut, apply_voi
    if ds.PhotometricInterpretation in COLOUR:   # decoded to RGB by pydicom
        scale = 2.0 ** ds.BitsStored - 1
        return [(pixels[..., k] / scale).astype(np.float32) for k in range(3)]
    rescaled = not ds.get("ModalityLUTSequence") and "RescaleSlope" in ds and "RescaleIntercept" in ds   # as pydicom
    if rescaled and float(ds.RescaleSlope) == 0:
        raise ValueError("Rescale Slope 0 makes every pixel the same value")
    values = apply_modality_lut(pixels, ds)
    if not np.isfinite(values).all():   # e.g. a rescale slope of NaN
        raise ValueError("it gives values that are not finite")
    if window is not None:
        grey = linear_window(values, *window)
    elif has_voi_lut(ds):
        grey = voi_lut(values, ds, apply_voi)
    elif all(ds.get(k) not in (None, "") for k in ("WindowCenter", "WindowWidth")):   # pydicom's test too
        grey = file_window(values, ds)
    else:
        low, high = float(values.min()), float(values.max())
        grey = (values - low) / (high - low) if high > low else np.zeros(values.shape)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        grey = 1 - grey
    return [np.asarray(grey, dtype=np.float32)]


def linear_window(values, center, width):
    """The standard's LINEAR window (PS3.3 C.11.2.1.2.1, width >= 1) mapped onto [0, 1]: pydicom's
    apply_windowing divided by its output range."""
    values = np.asarray(values, dtype=np.float64)
    if width == 1:   # a step at the centre
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0, 1)


def file_window(values, ds):
    """The file's first Window Center/Width with its VOI LUT Function (LINEAR, LINEAR_EXACT or SIGMOID)."""
    center, width = (float(v[0] if ds[k].VM > 1 else v) for k, v in
                     (("WindowCenter", ds.WindowCenter), ("WindowWidth", ds.WindowWidth)))
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    values = np.asarray(values, dtype=np.float64)
    if not (math.isfinite(center) and math.isfinite(width)):
        raise ValueError(f"Window Center {center} and Width {width}")
    if function == "LINEAR" and width >= 1:
        return linear_window(values, center, width)
    if function == "LINEAR_EXACT" and width > 0:
        return np.clip((values - center) / width + 0.5, 0, 1)
    if function == "SIGMOID" and width > 0:
        return 1 / (1 + np.exp(-4 * (values - center) / width))
    raise ValueError(f"VOI LUT Function {function} with Window Width {width}")


def has_voi_lut(ds):
    """A VOI LUT Sequence whose first item has its descriptor and data (pydicom's test in apply_voi_lut)."""
    sequence = ds.get("VOILUTSequence")
    return bool(sequence) and "LUTDescriptor" in sequence[0] and "LUTData" in sequence[0]


def voi_lut(values, ds, apply_voi):
    """The first VOI LUT (pydicom's apply_voi), scaled by the LUT's significant bits: the bit length of its
    largest entry, as viewers do, since real files often declare 16-bit entries that hold 12-bit values."""
    entries, first = ds.VOILUTSequence[0].LUTDescriptor[:2]
    table = apply_voi(np.arange(first, first + (entries or 2 ** 16)), ds)
    # pydicom truncates a non-integer input into the LUT's index; flooring first keeps that without its warning
    indices = np.floor(values).astype(np.int64) if values.dtype.kind == "f" else values
    return apply_voi(indices, ds) / (2.0 ** int(table.max()).bit_length() - 1 or 1)


def dicom_check(path):
    """image_check of a DICOM file, read from its header (the pixel data itself is not decoded)."""
    with warnings.catch_warnings():   # as in read_dicom: a film either reads or is one reason
        warnings.simplefilter("ignore")
        try:
            ds = dicom_header(path)
            problem = dataset_problem(ds)
            if problem:
                return problem, None
            size = int(ds.Columns), int(ds.Rows)
            element = ds.get_item("PixelData", keep_deferred=True)
            if ds.file_meta.TransferSyntaxUID.is_encapsulated:
                return (None, size) if SEQUENCE_END in file_tail(path) else ("unreadable image", None)
            frame = ds.Rows * ds.Columns * ds.get("SamplesPerPixel", 1) * ds.BitsAllocated
            complete = (element.length >= (frame + 7) // 8
                        and element.value_tell + element.length <= os.path.getsize(path))
            if 0 < frame and element.length >= 2 * ((frame + 7) // 8):
                return PIXELS_LONGER, None
        except FileNotFoundError:
            return "missing image", None
        except Exception:
            return "unreadable image", None
    return (None, size) if complete else ("unreadable image", None)


def dataset_problem(ds):
    """What makes a read DICOM data set unusable as one film: no pixel data, several frames, a colour model
    minisd does not read, or pixel data that no installed decoder reads. None if it can be used."""
    from pydicom.pixels import get_decoder
    if "PixelData" not in ds:
        floats = "FloatPixelData" in ds or "DoubleFloatPixelData" in ds   # parametric maps, not films
        return "DICOM with float pixel data (minisd reads films)" if floats else "DICOM without pixel data"
    if any(k not in ds for k in ("Rows", "Columns", "BitsAllocated", "BitsStored", "PhotometricInterpretation")):
        return "unreadable image"
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return "unreadable image"
    if frames > 1:
        return "multi-frame DICOM (minisd reads single films)"
    if ds.PhotometricInterpretation not in GREY + COLOUR:
        return f"DICOM with photometric interpretation {ds.PhotometricInterpretation}"
    syntax = ds.file_meta.TransferSyntaxUID   # always set by dicom_header
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        name = f" ({syntax.name})" if syntax.name != syntax else ""
        return f"DICOM in transfer syntax {syntax}{name}, which pydicom cannot decode"
    if not decoder.is_available:   # pydicom names each plugin's packages; on PyPI gdcm is python-gdcm
        needs = [re.sub(r"^gdcm\b", "python-gdcm", d.split(" - requires ")[-1].replace("numpy and ", ""))
                 for d in decoder.missing_dependencies]
        return f"DICOM in {syntax.name} without an installed decoder (install one of: {'; '.join(needs)})"
    return None
