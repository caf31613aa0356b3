"""--data openi on the real reports of the OpenI release, which torchxrayvision ships (NLMCXR_reports.tgz, CC BY-NC-ND
4.0, and the films' DICOM metadata nlmcxr_dicom_metadata.csv.gz; read from the installed package, never copied),
with synthetic films; and the same studies in Kaggle's layout read by iuxray."""
import csv
import gzip
import importlib.util
import os
import tarfile
import warnings
import xml.etree.ElementTree as ElementTree
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import write_dicom
from minisd.data import assign_splits, load_dataset, read_iuxray
from minisd.errors import MinisdError
from minisd.openi import read_openi

REPORT_HEADER = ["uid", "MeSH", "Problems", "image", "indication", "comparison", "findings", "impression"]
KAGGLE_VIEWS = {"PA": "Frontal", "AP": "Frontal", "LL": "Lateral", "RL": "Lateral", "LATERAL": "Lateral"}


Report = namedtuple("Report", "uid findings impression images")
Film = namedtuple("Film", "study view filename")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The real OpenI release: a root with its reports in ecgen-radiology/, {report file: Report} read here with
    ElementTree on its own, and {film id: Film} from the films' DICOM metadata (Patient ID is the study)."""
    package = importlib.util.find_spec("torchxrayvision")   # its data files only: the package is not imported
    if package is None:
        pytest.skip("the OpenI reports come with torchxrayvision (pip install torchxrayvision)")
    shipped = Path(package.origin).parent / "data"
    root = tmp_path_factory.mktemp("openi")
    (root / "ecgen-radiology").mkdir()
    with tarfile.open(shipped / "NLMCXR_reports.tgz") as archive:
        for member in archive:
            if member.isfile() and member.name.endswith(".xml"):
                (root / "ecgen-radiology" / Path(member.name).name).write_bytes(archive.extractfile(member).read())
    reports = {}
    for path in sorted((root / "ecgen-radiology").glob("*.xml")):
        report = ElementTree.parse(path).getroot()
        texts = {node.get("Label"): node.text or "" for node in report.iter("AbstractText")}
        reports[path] = Report(report.find("uId").get("id")[3:], texts.get("FINDINGS", ""), texts.get("IMPRESSION", ""),
                               [node.get("id") for node in report.iter("parentImage")])
    with gzip.open(shipped / "nlmcxr_dicom_metadata.csv.gz", "rt", newline="") as f:
        rows = csv.reader(f)
        header = next(rows)
        columns = [header.index(name) for name in ("imageid", "Patient ID", "View Position", "filename")]
        films = {row[columns[0]]: Film(*(row[k] for k in columns[1:])) for row in rows}
    return root, reports, films


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)


def kaggle_layout(root, reports, films, with_images=False):
    """The Kaggle CSVs of these reports, as Kaggle made them: uid = report number, one row per DICOM film
    named <DICOM file name>.png, projection from the film's View Position."""
    rows = [[r.uid, "", "", "", "", "", r.findings, r.impression] for r in reports.values()]
    studies = {r.uid for r in reports.values()}
    projections = [[film.study, os.path.basename(film.filename) + ".png", KAGGLE_VIEWS.get(film.view, "")]
                   for film in films.values() if film.study in studies]
    root.mkdir(parents=True, exist_ok=True)
    write_csv(root / "indiana_reports.csv", REPORT_HEADER, rows)
    write_csv(root / "indiana_projections.csv", ["uid", "filename", "projection"], projections)
    if with_images:
        for k, (_, name, _) in enumerate(projections):
            save_film(root / "images" / "images_normalized" / name, k)
    return projections


def save_film(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8)).save(path)


def openi_layout(root, reports, projections):
    """The OpenI PNG release of these reports (films named by parentImage id), with Kaggle's projections CSV."""
    (root / "ecgen-radiology").mkdir(parents=True)
    for path in reports:
        (root / "ecgen-radiology" / path.name).write_bytes(path.read_bytes())
    for k, image in enumerate(image for report in reports.values() for image in report.images):
        save_film(root / "png" / f"{image}.png", k)
    write_csv(root / "indiana_projections.csv", ["uid", "filename", "projection"], projections)


def samples(candidates):
    return {sample.id: (sample.prompt, study) for sample, study, _ in candidates}


def test_openi_and_iuxray_agree_on_the_real_reports(release, tmp_path):
    root, reports, films = release
    projections = kaggle_layout(tmp_path / "kaggle", reports, films)
    write_csv(root / "indiana_projections.csv", ["uid", "filename", "projection"], projections)
    openi, skipped, fractions = read_openi(root)   # no films: the reader needs their names only
    kaggle, _, kaggle_fractions = read_iuxray(tmp_path / "kaggle")
    assert samples(openi) == samples(kaggle) and fractions == kaggle_fractions
    assert len(samples(openi)) > 3000 and "1_IM-0001-3001" in samples(openi)   # report 1's odd ids included
    for seed in (0, 1):
        assert (assign_splits([study for _, study, _ in openi], fractions, seed)
                == assign_splits([study for _, study, _ in kaggle], fractions, seed))
    assert skipped["report without findings or impression"] > 0 and skipped["report without images"] > 0
    assert skipped.examples["report without images"].startswith("ecgen-radiology/")


def test_same_manifests_end_to_end(release, tmp_path):
    _, reports, films = release
    subset = dict(list(reports.items())[:60])
    projections = kaggle_layout(tmp_path / "kaggle", subset, films, with_images=True)
    openi_layout(tmp_path / "openi", subset, projections)
    for split in ("train", "val", "test"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # both releases lack a few films; each says so
            openi = load_dataset("openi", tmp_path / "openi", split=split, resolution=8)
            kaggle = load_dataset("iuxray", tmp_path / "kaggle", split=split, resolution=8)
        assert sorted((r["id"], r["prompt"]) for r in openi.manifest()) == sorted(
            (r["id"], r["prompt"]) for r in kaggle.manifest())
        assert len(openi) > 0 and openi[0]["image"].shape == (3, 8, 8)
        assert all(r["file"].startswith("png/CXR") for r in openi.manifest())


def test_frontal_films_by_dicom_view_position_else_the_csv(release, tmp_path):
    _, reports, films = release
    root = tmp_path / "openi"
    (root / "ecgen-radiology").mkdir(parents=True)
    chosen = {}
    for path, report in reports.items():
        ids = [image for image in report.images if image in films]
        views = {films[image].view for image in ids}
        if len(chosen) < 8 and len(ids) == 2 and ({"PA", "LL"} <= views or views == {""}):
            (root / "ecgen-radiology" / path.name).write_bytes(path.read_bytes())
            chosen.update({image: films[image] for image in ids})
    for k, (image, film) in enumerate(chosen.items()):   # the DICOM release's names and View Positions
        write_dicom(root / "dcm" / os.path.basename(film.filename), np.full((8, 8), k, np.uint16), ViewPosition=film.view)
    blank = [image for image, film in chosen.items() if not film.view]
    assert len(blank) >= 4
    write_csv(root / "projections.csv", ["filename", "projection"],
              [[f"{blank[0]}.png", "Frontal"], [f"{blank[1]}.png", "Lateral"]])   # the others: no projection
    save_film(root / "png" / f"{blank[0]}.png", 0)   # a PNG copy of a DICOM film: the DICOM is read
    candidates, skipped, _ = read_openi(root)
    kept = {sample.file for sample, _, _ in candidates}
    frontal = {image for image, film in chosen.items() if film.view == "PA"}
    assert kept == {"dcm/" + os.path.basename(chosen[image].filename) for image in frontal | {blank[0]}}
    assert skipped["lateral projection"] == len(chosen) - len(frontal) - len(blank) + 1
    assert skipped["unknown projection"] == len(blank) - 2


def test_bad_reports_are_skipped_counted_and_named(release, tmp_path):
    folder = release[0] / "ecgen-radiology"
    root = tmp_path / "openi"
    (root / "ecgen-radiology").mkdir(parents=True)
    text = (folder / "1.xml").read_text()
    (root / "ecgen-radiology" / "1.xml").write_text(text)
    (root / "ecgen-radiology" / "2.xml").write_text(text.replace("CXR1", "CXR2").replace('"FINDINGS"', '"NOTES"')
                                                    .replace('"IMPRESSION"', '"OTHER"'))
    (root / "ecgen-radiology" / "3.xml").write_text(text.replace("CXR1", "CXR3")[:len(text) // 2])
    save_film(root / "CXR1_1_IM-0001-3001.png", 0)   # its twin CXR1_1_IM-0001-4001 is missing
    write_csv(root / "projections.csv", ["filename", "projection"],
              [[f"CXR{n}_1_IM-0001-{k}001.png", "Frontal"] for n in (1, 2) for k in (3, 4)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_dataset("openi", root, split="train", resolution=8)
    assert [r["id"] for r in ds.manifest()] == ["1_IM-0001-3001"]
    message, = [str(w.message) for w in caught]
    for part in ("1 malformed report", "1 report without findings or impression", "1 missing image",
                 "malformed report: ecgen-radiology/3.xml", "report without findings or impression: "
                 "ecgen-radiology/2.xml", "missing image: CXR1_1_IM-0001-4001"):
        assert part in message, message
    (root / "CXR1_1_IM-0001-3001.png").unlink()
    with pytest.raises(MinisdError, match=r"no usable images in split 'train' \(skipped: .*2 missing image"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_dataset("openi", root, split="train", resolution=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MinisdError, match=r"ecgen-radiology: no .xml reports; expected the OpenI release"):
        load_dataset("openi", tmp_path / "empty")


def report_xml(study, images, encoding="utf-8"):
    parents = "".join(f'<parentImage id="{image}"/>' for image in images)
    return (f'<?xml version="1.0" encoding="{encoding}"?><eCitation><uId id="CXR{study}"/>'
            f'<AbstractText Label="FINDINGS">Clear lungs.</AbstractText>{parents}</eCitation>')


def test_odd_reports_are_skipped_by_reason(tmp_path):
    (tmp_path / "ecgen-radiology").mkdir()
    reports = {"1": report_xml(1, ["CXR1_IM-0001-1001"]),
               "2": report_xml(2, ["CXR2_IM-0002-1001"], encoding="no-such-encoding"),   # was: a LookupError traceback
               "3": report_xml(3, ["  ", "CXR3_IM-0003-1001"])}                            # was: an image named ""
    for name, text in reports.items():
        (tmp_path / "ecgen-radiology" / f"{name}.xml").write_text(text)
    for n in (1, 3):
        save_film(tmp_path / f"CXR{n}_IM-000{n}-1001.png", n)
    write_csv(tmp_path / "projections.csv", ["filename", "projection"],
              [[f"CXR{n}_IM-000{n}-1001.png", "Frontal"] for n in (1, 3)])
    candidates, skipped, _ = read_openi(tmp_path)
    assert [sample.id for sample, _, _ in candidates] == ["1_IM-0001-1001", "3_IM-0003-1001"]
    assert dict(skipped) == {"malformed report": 1} and skipped.examples["malformed report"] == "ecgen-radiology/2.xml"
