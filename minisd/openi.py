"""The original OpenI release of the Indiana University chest X-ray set: the studies of Kaggle's `iuxray`
CSVs, as one XML report per study and the films as PNG or DICOM.

    ROOT/ecgen-radiology/1.xml ...        the reports (NLMCXR_reports.tgz): FINDINGS, IMPRESSION, parentImage ids
    ROOT/**/CXR1_1_IM-0001-3001.png       the films, anywhere below ROOT: PNG named by parentImage id
    ROOT/**/1_IM-0001-3001.dcm            (NLMCXR_png.tgz), or DICOM (NLMCXR_dcm.tgz), or Kaggle's .dcm.png
    ROOT/projections.csv                  filename,projection (Kaggle's indiana_projections.csv also works)

A film is frontal when its DICOM View Position is PA or AP; films without one (PNG, or DICOM with the field
empty, as a third of this set's are) take their projection from the CSV. The prompt rule (FINDINGS, else
IMPRESSION), the study key (the report number, Kaggle's uid) and the sample id (Kaggle's file name stem,
"1_IM-0001-3001") are those of `iuxray`, so both releases give the same prompts, ids and splits.
"""
import os
import re
import warnings
import xml.etree.ElementTree as ElementTree
from collections import Counter
from pathlib import Path

from .data import LAYOUTS, THREE_WAY, Sample, present, read_csv
from .errors import MinisdError
from .image_files import DICOM_SUFFIXES, IMAGE_SUFFIXES

REPORTS = "ecgen-radiology"
PROJECTION_FILES = ("projections.csv", "indiana_projections.csv")
FRONTAL = {"frontal", "pa", "ap"}
LATERAL = {"lateral", "lat", "ll", "rl", "large lateral"}


class Skipped(Counter):
    """Counts by reason, with the first file met for each reason (load_dataset names it in its warning)."""

    def __init__(self):
        super().__init__()
        self.examples = {}

    def add(self, reason, file):
        self[reason] += 1
        self.examples.setdefault(reason, file)


def read_openi(root):
    """(candidates, skipped, fractions) as every reader of minisd.data returns them."""
    folder = root / REPORTS
    reports = sorted(folder.glob("*.xml")) if folder.is_dir() else []
    if not reports:
        raise MinisdError(f"{folder}: no .xml reports; {LAYOUTS['openi']}")
    films, projections = find_films(root), read_projections(root)
    skipped, candidates, studies, seen = Skipped(), [], set(), set()
    for path in reports:
        name = path.relative_to(root).as_posix()
        report = read_report(path)
        if report is None:
            skipped.add("malformed report", name)
            continue
        study, prompt, images = report
        if study in studies:
            skipped.add("duplicate report", name)
            continue
        studies.add(study)
        if not images:
            skipped.add("report without images", name)
        elif not prompt:
            skipped.add("report without findings or impression", name)
        for image in images if prompt else []:
            key = image_key(image)
            file = films.get(key)
            view = projection(dicom_view(root / file) if file and file.lower().endswith(DICOM_SUFFIXES) else None)
            view = view or projection(projections.get(key))
            reason = ("lateral projection" if view == "lateral" else "unknown projection" if view != "frontal"
                      else "duplicate image" if key in seen else None)
            seen.add(key)
            if reason:
                skipped.add(reason, file or Path(image).name)
            else:   # a film that is not there is counted when the images are checked, after the split
                candidates.append((Sample(key, file or Path(image).name, prompt), study, None))
    return candidates, skipped, THREE_WAY


def read_report(path):
    """(study key, prompt, parentImage ids) of one report, or None when it is not well-formed XML."""
    try:
        report = ElementTree.parse(path).getroot()
    except (ElementTree.ParseError, OSError, ValueError, LookupError):   # LookupError: an unknown declared encoding
        return None
    uid = report.find("uId")
    study = re.sub(r"^CXR", "", (uid.get("id") or "") if uid is not None else "").strip() or path.stem
    texts = {}
    for node in report.iter("AbstractText"):
        texts.setdefault((node.get("Label") or "").strip().upper(), "".join(node.itertext()))
    prompt = present(texts.get("FINDINGS")) or present(texts.get("IMPRESSION"))
    return study, prompt, [image for node in report.iter("parentImage") if (image := (node.get("id") or "").strip())]


def image_key(name):
    """A film's key in every release: "CXR1_1_IM-0001-3001.png" (parentImage id), "1_IM-0001-3001.dcm" and
    Kaggle's "1_IM-0001-3001.dcm.png" all give "1_IM-0001-3001" (report 1 alone repeats its number)."""
    stem = re.sub(r"^CXR", "", Path(name).name.split(".")[0])
    return re.sub(r"^(\d+)_\1_", r"\1_", stem)


def find_films(root):
    """{image key: file relative to root} of the image files below root; a DICOM wins over other copies."""
    found = {}
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not (Path(folder) == root and d == REPORTS))
        for name in sorted(names):
            if name.lower().endswith(IMAGE_SUFFIXES):
                key, file = image_key(name), Path(folder, name).relative_to(root).as_posix()
                if key not in found or (file.lower().endswith(DICOM_SUFFIXES)
                                        and not found[key].lower().endswith(DICOM_SUFFIXES)):
                    found[key] = file
    return found


def read_projections(root):
    """{image key: projection} from the projections CSV, if there is one."""
    for name in PROJECTION_FILES:
        if (root / name).is_file():
            rows = read_csv(root / name, ("filename", "projection"))
            return {image_key(row["filename"].strip()): row["projection"]
                    for row in rows if row is not None and present(row["filename"])}
    return {}


def dicom_view(path):
    """The View Position of a DICOM film, read from its header; None if it has none or cannot be read."""
    import pydicom
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["ViewPosition"]).get("ViewPosition")
        except Exception:   # pydicom raises many kinds on damaged files; the image check reports the file
            return None


def projection(value):
    """"frontal", "lateral" or None, from a View Position (PA, AP, LL, ...) or a CSV's Frontal/Lateral."""
    value = " ".join(str(value or "").split()).lower()
    return "frontal" if value in FRONTAL else "lateral" if value in LATERAL else None
