"""Data sets: readers on small trees in the real layouts, the image pipeline and splits."""
import csv
import json
import random
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from minisd.data import DATASETS, load_dataset, load_image, load_manifest, summary
from minisd.errors import MinisdError


def save_png(path, size=(20, 16), seed=0, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0]), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def load_quietly(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_dataset(*args, **kwargs)


# ------------------------------------------------------------------------------------------- IU X-Ray
REPORT_HEADER = ["uid", "MeSH", "Problems", "image", "indication", "comparison", "findings", "impression"]


@pytest.fixture
def iuxray(tmp_path):
    """A Kaggle-layout IU X-Ray tree exercising every kind of row."""
    root = tmp_path / "iu"
    images = root / "images" / "images_normalized"
    reports = [
        ["1", "normal", "normal", "Xray Chest PA and Lateral", "XXXX-year-old", "None.",
         "The heart is normal in size. XXXX are clear.", "No acute disease."],
        ["2", "Cardiomegaly", "Cardiomegaly", "", "", "", "", "  Cardiomegaly.  "],
        ["3", "normal", "normal", "", "", "", "nan", ""],
        ["4", "", "", "", "", "", "Line one of the findings.\nLine two.", "Stable."],
        ["5", "", "", "", "", "", "Small left effusion.", ""],
        ["6", "", "", "", "", "", "Clear lungs.", ""],
        ["8", "", "", "", "", "", "Mild cardiomegaly.", ""],
        ["9", "", "", "", "", "", "   ", "No active disease."],
        ["10", "", "", "", "", "", "findings", "impression", "one field too many"],
    ]
    projections = [
        ["1", "1_a.png", "Frontal"], ["1", "1_b.png", "Lateral"],
        ["2", "2_a.png", "Frontal"], ["2", "2_b.png", "Lateral"],
        ["3", "3_a.png", "Frontal"],
        ["4", "4_a.png", "Frontal"], ["4", "4_b.png", "Frontal"], ["4", "4_c.png", "Lateral"],
        ["5", "5_a.png", "Frontal"], ["5", "5_b.png", "Frontal"], ["5", "5_c.png", "Lateral"],
        ["6", "6_a.png", "Frontal"], ["6", "6_b.png", "Frontal"],
        ["7", "7_a.png", "Frontal"],
        ["8", "8_a.png", "Frontal"], ["8", "8_b.png", "Frontal"],
        ["9", "9_a.png", "Frontal"],
        ["11", "11_a.png"],  # a field short
    ]
    root.mkdir()
    write_csv(root / "indiana_reports.csv", REPORT_HEADER, reports)
    write_csv(root / "indiana_projections.csv", ["uid", "filename", "projection"], projections)
    for k, (_, name, *_) in enumerate(projections):
        save_png(images / name, seed=k)
    (images / "8_a.png").unlink()  # listed, not there
    truncated = (images / "5_a.png").read_bytes()
    (images / "5_a.png").write_bytes(truncated[: len(truncated) // 2])
    (images / "6_a.png").write_text("not an image at all")
    return root


KEPT_IU = {"1_a": "The heart is normal in size. XXXX are clear.", "2_a": "Cardiomegaly.",
           "4_a": "Line one of the findings.\nLine two.", "4_b": "Line one of the findings.\nLine two.",
           "5_b": "Small left effusion.", "6_b": "Clear lungs.", "8_b": "Mild cardiomegaly.",
           "9_a": "No active disease."}
SKIPPED_IU = {"lateral projection": 4, "unreadable image": 2, "malformed row": 2, "no findings or impression": 1,
              "no report": 1, "missing image": 1}


def test_iuxray_prompts_counts_and_reasons(iuxray):
    splits = {split: load_quietly("iuxray", iuxray, split=split, resolution=16) for split in ("train", "val", "test")}
    prompts = {row["id"]: row["prompt"] for ds in splits.values() for row in ds.manifest()}
    assert prompts == KEPT_IU  # findings, else impression, stripped; XXXX kept
    for split, ds in splits.items():
        assert ds.splits == ("train", "val", "test")
        assert {k: v for k, v in ds.report.items() if k != "kept"} == SKIPPED_IU
        assert ds.report["kept"] == len(ds) > 0
    assert sum(len(ds) for ds in splits.values()) == len(KEPT_IU)
    row = splits["train"].manifest()[0]
    assert (iuxray / row["file"]).is_file() and row["file"].startswith("images/images_normalized/")


def test_iuxray_warns_once_with_counts_and_summary(iuxray):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_dataset("iuxray", iuxray, split="train", resolution=16)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "2 unreadable image" in message and "2 malformed row" in message and "1 missing image" in message
    assert "lateral projection" not in message  # a selection, not a problem
    line = summary(ds)
    assert "4 lateral projection" in line and "1 no findings or impression" in line


def test_summary_gives_each_split_its_own_counts(iuxray):
    sizes = {split: len(load_quietly("iuxray", iuxray, split=split, resolution=16)) for split in ("train", "val", "test")}
    ds = load_quietly("iuxray", iuxray, split="train", resolution=16)
    line = summary(ds)   # was: "iuxray/train: N images (skipped: <the whole set's counts>)", no test split
    assert line.startswith(f"iuxray: train {sizes['train']} images")
    assert f"val {sizes['val']} images" in line and f"test {sizes['test']} images" in line
    assert sum(ds.split_counts[split]["unreadable image"] for split in sizes) == 2   # each image counted once
    assert line.count("unreadable image") == sum(ds.split_counts[split]["unreadable image"] > 0 for split in sizes)
    assert "before the split, skipped " in line and "2 malformed row" in line


def test_iuxray_split_by_study(iuxray):
    uids = {}
    for split in ("train", "val", "test"):
        for row in load_quietly("iuxray", iuxray, split=split, resolution=16).manifest():
            uids.setdefault(row["id"].split("_")[0], set()).add(split)
    assert all(len(splits) == 1 for splits in uids.values())  # no study in two splits
    assert set(uids) == {"1", "2", "4", "5", "6", "8", "9"}  # every kept study, once


def write_big_iuxray(root, uids, order_seed):
    rows = [[str(u), "", "", "", "", "", f"Findings of study {u}.", ""] for u in uids]
    projections = [[str(u), f"{u}_{k}.png", "Frontal"] for u in uids for k in range(1 + u % 2)]
    random.Random(order_seed).shuffle(rows)
    random.Random(order_seed).shuffle(projections)
    root.mkdir()
    write_csv(root / "indiana_reports.csv", REPORT_HEADER, rows)
    write_csv(root / "indiana_projections.csv", ["uid", "filename", "projection"], projections)
    for _, name, _ in projections:
        save_png(root / "images" / "images_normalized" / name, size=(4, 4))


def split_of_uids(root, seed=0, fractions=None):
    out = {}
    for split in ("train", "val", "test"):
        for row in load_dataset("iuxray", root, split=split, resolution=4, seed=seed, fractions=fractions).manifest():
            out.setdefault(row["id"].split("_")[0], set()).add(split)
    return out


def test_iuxray_split_proportions_and_determinism(tmp_path):
    uids = list(range(1, 501))
    write_big_iuxray(tmp_path / "a", uids, order_seed=1)
    write_big_iuxray(tmp_path / "b", uids, order_seed=2)  # same data, rows in another order
    a, b = split_of_uids(tmp_path / "a"), split_of_uids(tmp_path / "b")
    assert a == b
    assert set(a) == {str(u) for u in uids} and all(len(s) == 1 for s in a.values())
    sizes = {split: sum(s == {split} for s in a.values()) for split in ("train", "val", "test")}
    assert abs(sizes["train"] - 400) <= 1 and abs(sizes["val"] - 80) <= 1 and abs(sizes["test"] - 20) <= 1
    assert split_of_uids(tmp_path / "a", seed=1) != a  # the seed chooses the split
    paper = split_of_uids(tmp_path / "a", fractions={"train": 0.7, "val": 0.1, "test": 0.2})   # --split 70/10/20
    assert all(len(s) == 1 for s in paper.values())
    assert [sum(s == {split} for s in paper.values()) for split in ("train", "val", "test")] == [350, 50, 100]


def test_split_fractions_apply_to_every_data_set(montgomery, tmp_path):
    """--split: montgomery gains a validation split; a phantom split's manifest reads back; a folder whose
    metadata names the splits refuses fractions."""
    three = {"train": 0.5, "val": 0.25, "test": 0.25}
    assert len(load_quietly("montgomery", montgomery, split="val", fractions=three)) == 1
    val = load_dataset("phantom", split="val", resolution=16, fractions={"train": 0.7, "val": 0.1, "test": 0.2})
    assert len(val) == 200 and val.sample_id(0) == "phantom-0-01400"
    val.write_manifest(tmp_path / "manifest_val.jsonl")
    again = load_manifest(tmp_path / "manifest_val.jsonl", "phantom", resolution=16)
    assert torch.equal(again[5]["image"], val[5]["image"]) and again.manifest() == val.manifest()
    (tmp_path / "manifest_test.jsonl").write_bytes((tmp_path / "manifest_val.jsonl").read_bytes())
    with pytest.raises(MinisdError, match="manifest_test.jsonl: not a manifest of the phantom's 'test' split"):
        load_manifest(tmp_path / "manifest_test.jsonl", "phantom", resolution=16)   # was: val images, as the test's
    test = load_dataset("phantom", split="test", resolution=16)
    test.write_manifest(tmp_path / "manifest_test.jsonl")
    with open(tmp_path / "manifest_test.jsonl", "r+b") as f:
        text = f.read()
        f.seek(0)
        f.write(b"\xef\xbb\xbf" + text)   # an editor's byte order mark: was "line 1 is not a manifest row"
    assert load_manifest(tmp_path / "manifest_test.jsonl", "phantom", resolution=16).manifest() == test.manifest()
    for k in range(2):
        save_png(tmp_path / f"{k}.png", seed=k)
    write_csv(tmp_path / "metadata.csv", ["file_name", "text", "split"], [["0.png", "a", "train"], ["1.png", "b", "test"]])
    with pytest.raises(MinisdError, match="its metadata names each image's split, so split fractions do not apply"):
        load_dataset("folder", tmp_path, resolution=8, fractions=three)


# ------------------------------------------------------------------------------------------- Montgomery
@pytest.fixture
def montgomery(tmp_path):
    base = tmp_path / "mc" / "MontgomerySet"
    readings = {
        "MCUCXR_0001_0": "Patient's Sex: M\nPatient's Age: 032Y\n\nnormal\n",
        "MCUCXR_0002_1": "Patient's Sex: F \r\n  Patient's Age:  045Y\r\n\r\n  right upper lobe   infiltrate\r\n"
                         "  consistent with TB \r\n",
        "MCUCXR_0003_1": "Patient's Sex: O\nPatient's Age: 060Y\nbilateral pleural effusions\n",
        "MCUCXR_0004_0": "Patient's Sex: F\n\nnormal",
        "MCUCXR_0006_0": "Patient's Sex: M\nPatient's Age: 050Y\n\n   \n",
        "MCUCXR_0007_1": "patient's sex:m\npatient's age:071Y\ncavity in the left upper lobe",
    }
    for k, name in enumerate(["MCUCXR_0001_0", "MCUCXR_0002_1", "MCUCXR_0003_1", "MCUCXR_0004_0",
                              "MCUCXR_0005_0", "MCUCXR_0006_0", "MCUCXR_0007_1"]):
        save_png(base / "CXR_png" / f"{name}.png", size=(24, 30), seed=k)
    (base / "ClinicalReadings").mkdir()
    for name, text in readings.items():
        (base / "ClinicalReadings" / f"{name}.txt").write_bytes(text.encode())
    return base.parent


KEPT_MC = {
    "MCUCXR_0001_0": "age:32, gender:Male, findings:normal",
    "MCUCXR_0002_1": "age:45, gender:Female, findings:right upper lobe infiltrate consistent with TB",
    "MCUCXR_0003_1": "age:60, findings:bilateral pleural effusions",
    "MCUCXR_0004_0": "gender:Female, findings:normal",
    "MCUCXR_0007_1": "age:71, gender:Male, findings:cavity in the left upper lobe",
}


@pytest.mark.parametrize("inside", [False, True])
def test_montgomery_prompts_and_split(montgomery, inside):
    root = montgomery / "MontgomerySet" if inside else montgomery
    train, test = (load_quietly("montgomery", root, split=s, resolution=16) for s in ("train", "test"))
    assert train.splits == ("train", "test")
    rows = train.manifest() + test.manifest()
    assert {r["id"]: r["prompt"] for r in rows} == KEPT_MC
    assert (len(train), len(test)) == (4, 1)
    assert all((root / r["file"]).is_file() for r in rows)
    assert train.report["no clinical reading"] == 1 and train.report["empty clinical reading"] == 1
    assert train[0]["image"].shape == (3, 16, 16)


def test_montgomery_has_no_validation_split(montgomery):
    with pytest.raises(MinisdError, match=r"montgomery has no split 'val'.*train, test"):
        load_quietly("montgomery", montgomery, split="val")


# ------------------------------------------------------------------------------------------- folder
def test_folder_csv_and_jsonl(tmp_path):
    csv_root, jsonl_root = tmp_path / "c", tmp_path / "j"
    for root in (csv_root, jsonl_root):
        for k in range(10):
            save_png(root / "img" / f"{k}.png", seed=k)
    write_csv(csv_root / "metadata.csv", ["file_name", "text"],
              [[f"img/{k}.png", f"caption {k}"] for k in range(10)] + [["img/9.png", "again"], ["img/10.png", ""]])
    lines = [json.dumps({"file_name": f"img/{k}.png", "text": f"caption {k}"}) for k in range(10)]
    (jsonl_root / "metadata.jsonl").write_text("\n".join(lines + ["{not json", json.dumps({"text": "no file"})]) + "\n")

    from_csv = {s: load_quietly("folder", csv_root, split=s, resolution=8) for s in ("train", "val", "test")}
    from_jsonl = {s: load_quietly("folder", jsonl_root, split=s, resolution=8) for s in ("train", "val", "test")}
    for sets in (from_csv, from_jsonl):
        rows = [r for ds in sets.values() for r in ds.manifest()]
        assert sorted(r["file"] for r in rows) == sorted(f"img/{k}.png" for k in range(10))
        assert all(r["prompt"] == "caption " + r["file"][4:-4] for r in rows)
        assert [len(sets[s]) for s in ("train", "val", "test")] == [8, 1, 1]
    assert from_csv["train"].manifest() == from_jsonl["train"].manifest()  # the split depends on the rows only
    assert from_csv["train"].report["duplicate file_name"] == 1 and from_csv["train"].report["empty text"] == 1
    assert from_jsonl["train"].report["malformed row"] == 2


@pytest.mark.parametrize("name", ["metadata.csv", "metadata.jsonl"])
def test_text_that_is_not_utf8_is_refused_with_its_line(tmp_path, name):
    save_png(tmp_path / "a.png")
    rows = ["file_name,text", "a.png,épanchement pleural"] if name.endswith(".csv") else \
        [json.dumps({"file_name": "a.png", "text": "épanchement pleural"}, ensure_ascii=False)]
    (tmp_path / name).write_bytes(("\n".join(rows) + "\n").encode("latin-1"))
    with pytest.raises(MinisdError, match=rf"{name}: line {len(rows)} is not UTF-8 text \(byte 0xe9\)"):
        load_dataset("folder", tmp_path, split="train", resolution=8)   # was: "\ufffdpanchement pleural"


def test_utf16_text_with_a_byte_order_mark_is_read(tmp_path):
    for k in range(3):
        save_png(tmp_path / f"{k}.png", seed=k)
    text = "file_name,text\n" + "".join(f"{k}.png,épanchement {k}\n" for k in range(3))
    (tmp_path / "metadata.csv").write_bytes(text.encode("utf-16"))   # Excel's "Unicode text"
    rows = [r for s in ("train", "val", "test") for r in load_quietly("folder", tmp_path, split=s, resolution=8).manifest()]
    assert sorted(r["prompt"] for r in rows) == [f"épanchement {k}" for k in range(3)]


def test_images_far_smaller_than_the_resolution_are_warned_and_counted(tmp_path):
    for k in range(10):
        save_png(tmp_path / f"{k}.png", size=(1, 1) if k < 3 else (40, 40), seed=k)
    write_csv(tmp_path / "metadata.csv", ["file_name", "text"], [[f"{k}.png", f"caption {k}"] for k in range(10)])
    with pytest.warns(UserWarning, match=r"3 images are smaller than half of --resolution 32 and are upscaled"):
        ds = load_dataset("folder", tmp_path, split="train", resolution=32)   # was: silently upscaled
    assert sum(counts["upscaled more than 2×"] for counts in ds.split_counts.values()) == 3
    assert "upscaled more than 2×" in summary(ds)


def test_skipped_images_warning_names_only_skipped_ones(tmp_path):
    save_png(tmp_path / "small.png", size=(1, 1), seed=0)
    save_png(tmp_path / "large.png", size=(40, 40), seed=1)
    rows = [["small.png", "a"], ["large.png", "b"], ["gone.png", "c"]]
    write_csv(tmp_path / "metadata.csv", ["file_name", "text"], rows)
    with pytest.warns(UserWarning) as caught:
        load_dataset("folder", tmp_path, split="train", resolution=32, fractions={"train": 1.0})
    skipped = [str(w.message) for w in caught if ": skipped " in str(w.message)]
    assert len(skipped) == 1 and "gone.png" in skipped[0]
    assert "small.png" not in skipped[0]   # was: "(e.g. upscaled more than 2×: small.png; missing image: gone.png)"


def test_a_training_run_warns_about_skipped_images_once(tmp_path):
    from types import SimpleNamespace
    from minisd.training import Trainer
    for k in range(8):
        save_png(tmp_path / f"{k}.png", seed=k)
    rows = [[f"{k}.png", f"c {k}"] for k in range(8)] + [["gone.png", "x"]]
    write_csv(tmp_path / "metadata.csv", ["file_name", "text"], rows)
    trainer = SimpleNamespace(args=SimpleNamespace(data="folder", data_root=tmp_path, resolution=8, data_seed=0,
                                                   window=None, split="50/25/25"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for split in ("train", "val", "test"):   # as a run loads them
            Trainer.load_split(trainer, split)
    assert sum(": skipped 1 missing image" in str(w.message) for w in caught) == 1   # was: once per split


def test_folder_split_column(tmp_path):
    for k in range(6):
        save_png(tmp_path / f"{k}.png", seed=k)
    splits = ["train", "train", "validation", "test", "train", "test"]
    rows = [[f"{k}.png", f"c{k}", s] for k, s in enumerate(splits)]
    write_csv(tmp_path / "metadata.csv", ["file_name", "text", "split"], rows)
    sets = {s: load_dataset("folder", tmp_path, split=s, resolution=8) for s in ("train", "val", "test")}
    assert {s: sorted(r["file"] for r in ds.manifest()) for s, ds in sets.items()} == {
        "train": ["0.png", "1.png", "4.png"], "val": ["2.png"], "test": ["3.png", "5.png"]}
    assert sets["train"].splits == ("train", "val", "test")


def test_folder_metadata_errors(tmp_path):
    with pytest.raises(MinisdError, match="no metadata.csv or metadata.jsonl"):
        load_dataset("folder", tmp_path)
    write_csv(tmp_path / "metadata.csv", ["file", "caption"], [["a.png", "x"]])
    with pytest.raises(MinisdError, match=r"metadata.csv: no column file_name, text"):
        load_dataset("folder", tmp_path)
    (tmp_path / "metadata.jsonl").write_text("")
    with pytest.raises(MinisdError, match="both metadata.csv and metadata.jsonl"):
        load_dataset("folder", tmp_path)


# ------------------------------------------------------------------------------------------- errors
def test_missing_root_names_folder_and_layout(tmp_path, monkeypatch):
    with pytest.raises(MinisdError, match=r"data folder .*nowhere not found.*indiana_reports.csv"):
        load_dataset("iuxray", tmp_path / "nowhere")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MinisdError, match=r"data folder data/montgomery not found.*MontgomerySet/CXR_png"):
        load_dataset("montgomery")
    (tmp_path / "iu").mkdir()
    with pytest.raises(MinisdError, match=r"indiana_reports.csv not found"):
        load_dataset("iuxray", tmp_path / "iu")


def test_bad_arguments():
    with pytest.raises(MinisdError, match=r"unknown data set 'mimic'.*iuxray, montgomery, folder, phantom"):
        load_dataset("mimic")
    with pytest.raises(MinisdError, match="resolution"):
        load_dataset("phantom", resolution=0)
    with pytest.raises(MinisdError, match=r"phantom has no split 'valid'.*train, val, test"):
        load_dataset("phantom", split="valid")
    assert DATASETS == ("iuxray", "montgomery", "folder", "phantom", "openi")


def test_missing_column_names_it(iuxray):
    write_csv(iuxray / "indiana_projections.csv", ["uid", "file", "projection"], [["1", "1_a.png", "Frontal"]])
    with pytest.raises(MinisdError, match=r"indiana_projections.csv: no column filename"):
        load_dataset("iuxray", iuxray)


def test_empty_data_set_says_why(tmp_path):
    for k in range(3):
        (tmp_path / f"{k}.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    write_csv(tmp_path / "metadata.csv", ["file_name", "text"], [[f"{k}.png", "x"] for k in range(3)])
    with pytest.raises(MinisdError, match=r"no usable images in split 'train' \(skipped: 3 unreadable image\)"):
        load_quietly("folder", tmp_path)


# ------------------------------------------------------------------------------------------- images
def test_pipeline_matches_torchvision(tmp_path):
    from torchvision.transforms import CenterCrop, InterpolationMode, Resize
    for k, size in enumerate([(40, 30), (30, 52), (33, 33), (300, 200)]):
        path = save_png(tmp_path / f"{k}.png", size=size, seed=k, mode="RGB")
        pixels = torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1).float() / 255
        expected = CenterCrop(17)(Resize(17, InterpolationMode.BICUBIC, antialias=True)(pixels[None]))[0]
        ours = load_image(path, 17)
        assert ours.shape == (3, 17, 17)
        assert torch.allclose(ours, expected.clamp(0, 1) * 2 - 1, atol=1e-5)


def test_image_modes(tmp_path):
    grey = np.random.default_rng(0).integers(0, 256, (24, 20), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "l.png")
    Image.fromarray(grey).convert("RGB").save(tmp_path / "rgb.png")
    Image.fromarray(grey).convert("P").save(tmp_path / "p.png")
    rgba = np.dstack([np.stack([grey] * 3, -1), np.full_like(grey, 255)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    rgba[..., 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    Image.fromarray(grey).save(tmp_path / "l.jpg", quality=100)
    reference = load_image(tmp_path / "l.png", 16)
    assert reference.shape == (3, 16, 16) and reference.dtype == torch.float32
    assert torch.equal(reference[0], reference[1]) and torch.equal(reference[0], reference[2])
    assert reference.min() >= -1 and reference.max() <= 1 and reference.min() < -0.5 and reference.max() > 0.5
    for name in ("rgb.png", "p.png", "rgba.png"):
        assert torch.allclose(load_image(tmp_path / name, 16), reference, atol=1e-6), name
    assert torch.allclose(load_image(tmp_path / "l.jpg", 16), reference, atol=0.05)
    assert torch.equal(load_image(tmp_path / "clear.png", 16), torch.full((3, 16, 16), -1.0))


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    ramp16 = np.linspace(0, 65535, 32 * 40).reshape(40, 32).astype(np.uint16)
    Image.fromarray(ramp16).save(tmp_path / "ramp16.png")
    Image.fromarray((ramp16 // 257).astype(np.uint8)).save(tmp_path / "ramp8.png")
    assert Image.open(tmp_path / "ramp16.png").mode.startswith("I")
    wide, narrow = load_image(tmp_path / "ramp16.png", 16), load_image(tmp_path / "ramp8.png", 16)
    assert torch.allclose(wide, narrow, atol=2 / 255)
    Image.fromarray(np.full((8, 8), 5000, np.uint16)).save(tmp_path / "dark16.png")  # above 12 bits: 16-bit data
    assert torch.allclose(load_image(tmp_path / "dark16.png", 8), torch.tensor(5000 / 65535 * 2 - 1), atol=1e-5)


def test_broken_image_data_is_replaced_at_load_time(tmp_path):
    for k in range(5):
        save_png(tmp_path / f"{k}.png", size=(64, 64), seed=k)
    data = bytearray((tmp_path / "2.png").read_bytes())
    start = data.index(b"IDAT") + 8
    data[start:start + 200] = bytes(200)  # header and end intact, pixel data destroyed
    (tmp_path / "2.png").write_bytes(bytes(data))
    rows = [[f"{k}.png", f"c{k}", "train"] for k in range(5)]
    write_csv(tmp_path / "metadata.csv", ["file_name", "text", "split"], rows)
    ds = load_dataset("folder", tmp_path, resolution=8)  # passes the cheap check
    position = [r["file"] for r in ds.manifest()].index("2.png")
    with pytest.warns(UserWarning, match=r"2.png: cannot be decoded"):
        item = ds[position]
    assert item["id"] == ds.manifest()[(position + 1) % len(ds)]["id"]
    assert item["image"].shape == (3, 8, 8)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_manifest_written_atomically(iuxray, tmp_path):
    ds = load_quietly("iuxray", iuxray, split="train", resolution=8)
    path = tmp_path / "run" / "train.jsonl"
    ds.write_manifest(path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == ds.manifest() and set(rows[0]) == {"id", "file", "prompt"}
    assert [p.name for p in path.parent.iterdir()] == ["train.jsonl"]
