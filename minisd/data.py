"""Image-text data sets: IU X-Ray (Kaggle's CSVs, or the original OpenI release: minisd.openi), the
Montgomery County CXR set, any image folder with captions, and the built-in phantom. Image files are read
by minisd.image_files (PNG, JPEG, TIFF, DICOM).

    ds = load_dataset("iuxray", root="data/iuxray", split="train", resolution=224, seed=0)
    ds[i]  # {"image": float [3, R, R] in [-1, 1], "prompt": str, "id": str}

File-based sets are read once at construction: rows that cannot be used are skipped and counted by
reason in `ds.report` (for the whole data set; "kept" counts this split), images are checked cheaply
(header and end of file) and the problems are reported in one warning. Splits are drawn from a fixed
seed over sorted keys, so they do not depend on row order; IU X-Ray splits by study (uid), in both releases.
"""
import codecs
import csv
import io
import json
import os
import random
import re
import warnings
from collections import Counter, namedtuple
from pathlib import Path

import numpy as np
import torch

from . import phantom
from .errors import MinisdError
from .image_files import UNREADABLE, image_check, image_problem, load_image

DATASETS = ("iuxray", "montgomery", "folder", "phantom", "openi")
# IU X-Ray's two releases hold the same studies and split them alike (by study, from the data seed): an adapter
# trained on one must be evaluated on the other with its own data seed.
SAME_STUDIES = {"openi": "iuxray"}
THREE_WAY = {"train": 0.8, "val": 0.16, "test": 0.04}
TWO_WAY = {"train": 0.8, "test": 0.2}
PHANTOM_SIZE = 2000
LAYOUTS = {
    "iuxray": "expected the Kaggle 'Chest X-rays (Indiana University)' layout: indiana_reports.csv, "
              "indiana_projections.csv and images/images_normalized/",
    "montgomery": "expected MontgomerySet/CXR_png/MCUCXR_####_{0,1}.png and "
                  "MontgomerySet/ClinicalReadings/MCUCXR_####_{0,1}.txt (give the folder holding "
                  "MontgomerySet, or MontgomerySet itself)",
    "folder": "expected a folder with metadata.csv or metadata.jsonl (columns file_name, text and "
              "optionally split) and the images it names",
    "openi": "expected the OpenI release: ecgen-radiology/*.xml reports and their images (PNG or DICOM, "
             "named by parentImage id) anywhere below, with projections.csv or indiana_projections.csv "
             "(filename, projection) where the images carry no DICOM View Position",
}
SELECTIONS = {"lateral projection"}  # skipped by design, not a problem worth a warning
SMALL = 2   # an image whose shorter side is less than --resolution / SMALL is upscaled more than that: warned
UPSCALED = f"upscaled more than {SMALL}×"

Sample = namedtuple("Sample", "id file prompt")  # file: relative to the data root


# ------------------------------------------------------------------------------------------- data sets
class ImageTextDataset(torch.utils.data.Dataset):
    """One split of a file-based data set: `samples` (id, file, prompt) read from `root`."""

    def __init__(self, name, root, split, splits, samples, report, resolution, window=None):
        self.name, self.root, self.split, self.splits = name, Path(root), split, tuple(splits)
        self.samples, self.report, self.resolution, self.window = samples, report, resolution, window

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        if not -len(self.samples) <= index < len(self.samples):
            raise IndexError(f"{self.name}/{self.split} has {len(self.samples)} images, not {index + 1}")
        # a file that passed the cheap check can still fail to decode: use the next one, and say so
        for step in range(len(self.samples)):
            sample = self.samples[(index + step) % len(self.samples)]
            try:
                image = load_image(self.root / sample.file, self.resolution, self.window)
            except UNREADABLE as error:
                warnings.warn(f"{self.root / sample.file}: cannot be decoded ({error}); using the next image")
                continue
            return {"image": image, "prompt": sample.prompt, "id": sample.id}
        raise MinisdError(f"{self.name} at {self.root}: no image of split {self.split!r} can be decoded")

    def prompt(self, index):
        """Item `index`'s prompt, without reading its image."""
        return self.samples[index].prompt

    def manifest(self):
        return [{"id": s.id, "file": s.file, "prompt": s.prompt} for s in self.samples]

    def write_manifest(self, path):
        """The manifest as JSON lines, written to a temporary file and renamed into place."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        with open(temporary, "w", encoding="utf-8") as f:
            for row in self.manifest():
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(temporary, path)


class PhantomDataset(ImageTextDataset):
    """One split of the procedural set (minisd.phantom): item i is a pure function of (seed, start + i)."""

    def __init__(self, split, resolution, seed, bounds):
        if split not in bounds:
            raise MinisdError(f"phantom has no split {split!r}: it has {', '.join(bounds)}")
        self.name, self.root, self.split, self.splits = "phantom", None, split, tuple(bounds)
        self.start, stop = bounds[split]
        self.size, self.seed, self.resolution = stop - self.start, seed, resolution
        self.report = {"kept": self.size}
        self.split_counts = {name: Counter(images=stop - start) for name, (start, stop) in bounds.items()}
        self.before_split = Counter()

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        if not -self.size <= index < self.size:
            raise IndexError(f"phantom/{self.split} has {self.size} images, not {index + 1}")
        index %= self.size
        case = phantom.make_case(self.seed, self.start + index)
        film = torch.from_numpy(phantom.render(case, self.resolution)) * 2 - 1
        return {"image": film.expand(3, -1, -1).clone(), "prompt": phantom.report(case), "id": self.sample_id(index)}

    def sample_id(self, index):
        return f"phantom-{self.seed}-{self.start + index:05d}"

    def prompt(self, index):
        return phantom.report(phantom.make_case(self.seed, self.start + index))

    def manifest(self):
        return [{"id": self.sample_id(i), "file": "", "prompt": self.prompt(i)} for i in range(self.size)]


def split_bounds(size, fractions):
    """Consecutive [start, stop) per split, sized by `fractions`, every split non-empty when size allows."""
    counts = split_counts(size, fractions)
    stops = np.cumsum(counts).tolist()
    return {name: (stop - count, stop) for name, count, stop in zip(fractions, counts, stops)}


def split_counts(size, fractions):
    """Largest-remainder rounding of size * fractions; an empty split takes one from the fullest."""
    ideal = [size * f for f in fractions.values()]
    counts = [int(x) for x in ideal]
    for k in sorted(range(len(ideal)), key=lambda k: counts[k] - ideal[k])[:size - sum(counts)]:
        counts[k] += 1
    for k in range(len(counts)):
        if counts[k] == 0 and size >= len(counts):
            donor = max((j for j in range(len(counts)) if counts[j] > 1), key=lambda j: counts[j] - ideal[j])
            counts[donor], counts[k] = counts[donor] - 1, 1
    return counts


def assign_splits(keys, fractions, seed):
    """{key: split}: the sorted distinct keys shuffled with `seed`, then cut by `fractions`."""
    keys = sorted(set(keys))
    random.Random(seed).shuffle(keys)
    bounds = split_bounds(len(keys), fractions)
    return {key: name for name, (start, stop) in bounds.items() for key in keys[start:stop]}


# ------------------------------------------------------------------------------------------- text files
BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def read_text(path):
    """A text file's contents: UTF-8 (spreadsheet programs start theirs with a byte-order mark), or UTF-16
    with its byte-order mark. Anything else is refused naming the line, rather than decoded into
    replacement characters or guessed into mojibake."""
    data = Path(path).read_bytes()
    encoding = next((name for bom, name in BOMS if data.startswith(bom)), "utf-8")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[:e.start].decode(encoding, errors="replace").count("\n") + 1
        raise MinisdError(f"{path}: line {line} is not {encoding.split('-sig')[0].upper()} text (byte "
                          f"0x{data[e.start]:02x}); save the file as UTF-8, e.g. iconv -f latin1 -t utf-8") from None


# ------------------------------------------------------------------------------------------- readers
# Each reader returns (candidates, skipped, fractions or split names): candidates are
# (Sample, group, split or None) with `group` the unit of splitting.
def present(value):
    """The text with surrounding whitespace removed, or "" where it is missing (empty, NaN, None ...)."""
    value = (value or "").strip()
    return "" if value.lower() in ("", "nan", "none", "null", "n/a") else value


def read_csv(path, required):
    """Rows of a csv file as dicts, or None for a row with too few or too many fields."""
    with io.StringIO(read_text(path), newline="") as f:
        reader = csv.DictReader(f)
        try:
            columns = reader.fieldnames or []
            missing = [column for column in required if column not in columns]
            if missing:
                raise MinisdError(f"{path}: no column {', '.join(missing)} (it has {', '.join(columns) or 'none'})")
            return [None if None in row or None in row.values() else row for row in reader]
        except csv.Error as e:   # a quoting error or a field over the csv module's size limit stops the reader
            raise MinisdError(f"{path}: line {reader.reader.line_num}: {e}") from None


def read_iuxray(root):
    reports_path, projections_path = root / "indiana_reports.csv", root / "indiana_projections.csv"
    for path in (reports_path, projections_path):
        if not path.is_file():
            raise MinisdError(f"{path} not found; {LAYOUTS['iuxray']}")
    skipped = Counter()
    prompts = {}
    for row in read_csv(reports_path, ("uid", "findings", "impression")):
        if row is None or not present(row["uid"]):
            skipped["malformed row"] += 1
        elif row["uid"].strip() in prompts:
            skipped["duplicate report"] += 1
        else:
            prompts[row["uid"].strip()] = present(row["findings"]) or present(row["impression"])
    candidates, seen = [], set()
    for row in read_csv(projections_path, ("uid", "filename", "projection")):
        if row is None or not present(row["uid"]) or not present(row["filename"]):
            skipped["malformed row"] += 1
            continue
        uid, filename, projection = row["uid"].strip(), row["filename"].strip(), row["projection"].strip().lower()
        reason = ("no report" if uid not in prompts else "lateral projection" if projection == "lateral"
                  else "unknown projection" if projection != "frontal" else "duplicate image" if filename in seen
                  else "no findings or impression" if not prompts[uid] else None)
        seen.add(filename)
        if reason:
            skipped[reason] += 1
        else:
            sample = Sample(filename.split(".")[0], f"images/images_normalized/{filename}", prompts[uid])
            candidates.append((sample, uid, None))
    return candidates, skipped, THREE_WAY


def read_montgomery(root):
    base = root / "MontgomerySet" if (root / "MontgomerySet").is_dir() else root
    if not (base / "CXR_png").is_dir() or not (base / "ClinicalReadings").is_dir():
        raise MinisdError(f"{root}: no MontgomerySet/CXR_png and ClinicalReadings folders; {LAYOUTS['montgomery']}")
    prefix = "" if base == root else "MontgomerySet/"
    candidates, skipped = [], Counter()
    for image in sorted((base / "CXR_png").glob("MCUCXR_*.png")):
        reading = base / "ClinicalReadings" / (image.stem + ".txt")
        prompt = montgomery_prompt(read_text(reading)) if reading.is_file() else None
        if prompt is None:
            skipped["no clinical reading" if not reading.is_file() else "empty clinical reading"] += 1
        else:
            candidates.append((Sample(image.stem, f"{prefix}CXR_png/{image.name}", prompt), image.stem, None))
    return candidates, skipped, TWO_WAY


SEX = {"m": "Male", "f": "Female"}  # "O" (other / unrecorded) and anything else leave the field out
AGE_UNITS = {"y": 1, "m": 12, "w": 52, "d": 365}


def montgomery_prompt(text):
    """`age:32, gender:Male, findings:<reading>` from a ClinicalReadings file; None if it has no reading."""
    age = sex = None
    reading = []
    for line in text.splitlines():
        header = re.match(r"\s*patient'?s\s+(sex|age)\s*:\s*(.*)", line, re.IGNORECASE)
        if header and header.group(1).lower() == "sex":
            sex = SEX.get(header.group(2).strip().lower()[:1])
        elif header:
            value = re.match(r"0*(\d+)\s*([ymwd]?)", header.group(2).strip(), re.IGNORECASE)
            age = int(value.group(1)) // AGE_UNITS[(value.group(2) or "y").lower()] if value else None
        elif line.strip():
            reading.append(line.strip())
    reading = " ".join(" ".join(reading).split())
    if not reading:
        return None
    fields = ([f"age:{age}"] if age is not None else []) + ([f"gender:{sex}"] if sex else [])
    return ", ".join(fields + [f"findings:{reading}"])


def read_folder(root):
    paths = [root / name for name in ("metadata.csv", "metadata.jsonl") if (root / name).is_file()]
    if len(paths) != 1:
        found = "both metadata.csv and metadata.jsonl" if paths else "no metadata.csv or metadata.jsonl"
        raise MinisdError(f"{root}: {found}; {LAYOUTS['folder']}")
    path, = paths
    if path.suffix == ".csv":
        rows = read_csv(path, ("file_name", "text"))
    else:
        rows = []
        for number, line in enumerate(read_text(path).splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError):   # not JSON, an over-long number, or nested too deep
                    row = None
                valid = isinstance(row, dict) and isinstance(row.get("file_name"), str)
                rows.append(row if valid and isinstance(row.get("text"), (str, type(None))) else None)
    has_split = any(row is not None and "split" in row for row in rows)
    candidates, skipped, seen = [], Counter(), set()
    for row in rows:
        file_name = present(row["file_name"]) if row is not None else ""
        split = present(str(row.get("split") or "")).lower() if row is not None else ""
        split = "val" if split == "validation" else split
        if not file_name or (has_split and not split):
            skipped["malformed row"] += 1
        elif file_name in seen:
            skipped["duplicate file_name"] += 1
        elif not present(row.get("text")):
            skipped["empty text"] += 1
        else:
            candidates.append((Sample(file_name, file_name, present(row.get("text"))), file_name, split or None))
        seen.add(file_name)
    if has_split:
        named = {split for _, _, split in candidates}
        return candidates, skipped, [s for s in THREE_WAY if s in named] + sorted(named - set(THREE_WAY))
    return candidates, skipped, THREE_WAY


def same_studies(a, b):
    """Whether data sets `a` and `b` (names) hold the same studies, so that one data seed splits both alike."""
    return SAME_STUDIES.get(a, a) == SAME_STUDIES.get(b, b)


def read_openi(root):
    from .openi import read_openi   # builds on this module's rows and samples
    return read_openi(root)


READERS = {"iuxray": read_iuxray, "montgomery": read_montgomery, "folder": read_folder, "openi": read_openi}


# ------------------------------------------------------------------------------------------- entry point
def load_dataset(name, root=None, split="train", resolution=224, seed=0, window=None, fractions=None):
    """One split of a data set in DATASETS; `root` defaults to data/<name>, `seed` fixes the split
    (and, for the phantom, the images); `window` (center, width) replaces the VOI transform of DICOM films;
    `fractions` {split: fraction} replace the data set's own."""
    if name not in DATASETS:
        raise MinisdError(f"unknown data set {name!r}: choose one of {', '.join(DATASETS)}")
    if not isinstance(resolution, int) or resolution < 1:
        raise MinisdError(f"resolution must be a positive integer of pixels, got {resolution!r}")
    if not isinstance(seed, int) or seed < 0:
        raise MinisdError(f"seed must be a non-negative integer, got {seed!r}")
    if name == "phantom":
        return PhantomDataset(split, resolution, seed, split_bounds(PHANTOM_SIZE, fractions or THREE_WAY))
    root = Path(root) if root is not None else Path("data") / name
    if not root.is_dir():
        raise MinisdError(f"data folder {root} not found; {LAYOUTS[name]}")

    candidates, skipped, splits = READERS[name](root)
    if fractions and not isinstance(splits, dict):
        raise MinisdError(f"{name} at {root}: its metadata names each image's split, so split fractions do not apply")
    splits = fractions or splits
    names = list(splits)
    if split not in names:
        raise MinisdError(f"{name} has no split {split!r}: it has {', '.join(names) or 'none'}")
    # the split is drawn before images are checked, so that one broken file moves no other image
    if isinstance(splits, dict):
        chosen = assign_splits([group for _, group, _ in candidates], splits, seed)
        candidates = [(sample, group, chosen[group]) for sample, group, _ in candidates]
    # a reader may name a file per reason
    problems, before_split = dict(getattr(skipped, "examples", {})), Counter(skipped)
    samples, split_counts = [], {name: Counter(images=0) for name in names}
    for sample, _, sample_split in candidates:
        problem, size = image_check(root / sample.file)
        counts = split_counts.setdefault(sample_split, Counter(images=0))
        if problem:
            skipped[problem] += 1
            counts[problem] += 1
            problems.setdefault(problem, sample.file)
            continue
        counts["images"] += 1
        if min(size) * SMALL < resolution:   # the shorter side, from the header
            counts[UPSCALED] += 1
            problems.setdefault(UPSCALED, sample.file)
        if sample_split == split:
            samples.append(sample)
    report = {"kept": len(samples), **dict(skipped.most_common())}
    upscaled = sum(counts[UPSCALED] for counts in split_counts.values())
    if upscaled:
        warnings.warn(f"{name} at {root}: {upscaled:,} images are smaller than half of --resolution {resolution} "
                      f"and are upscaled more than {SMALL}× (e.g. {problems[UPSCALED]})", stacklevel=2)
    trouble = [f"{count:,} {reason}" for reason, count in skipped.most_common() if reason not in SELECTIONS]
    if trouble:
        # an upscaled image is used, not skipped: it has its own warning above
        examples = "; ".join(f"{reason}: {file}" for reason, file in problems.items() if reason != UPSCALED)
        warnings.warn(f"{name} at {root}: skipped {', '.join(trouble)}" + (f" (e.g. {examples})" if examples else ""),
                      stacklevel=2)
    if not samples:
        counts = ", ".join(f"{count:,} {reason}" for reason, count in skipped.most_common()) or "none"
        raise MinisdError(f"{name} at {root}: no usable images in split {split!r} (skipped: {counts}); {LAYOUTS[name]}")
    ds = ImageTextDataset(name, root, split, names, samples, report, resolution, window)
    ds.split_counts, ds.before_split = split_counts, before_split
    return ds


def load_manifest(path, name, root=None, resolution=224, window=None):
    """The samples a run recorded in `path` (a manifest_SPLIT.jsonl of write_manifest), in its order, read
    from `root` at `resolution` (DICOM films with `window`): exactly the recorded split, whatever the data
    folder holds today."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()   # a byte order mark (an editor's) is no text
    except (OSError, UnicodeDecodeError) as e:
        raise MinisdError(f"{path}: cannot be read ({e})") from None
    samples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            row = None
        if not (isinstance(row, dict) and all(isinstance(row.get(key), str) for key in Sample._fields)):
            raise MinisdError(f"{path}: line {number} is not a manifest row with id, file and prompt")
        samples.append(Sample(row["id"], row["file"], row["prompt"]))
    split = path.stem.removeprefix("manifest_")
    if not samples:
        raise MinisdError(f"{path}: no samples recorded")
    if name == "phantom":   # its images are a function of the id: seed and index, consecutive in a split
        first = re.fullmatch(r"phantom-(\d+)-(\d+)", samples[0].id)
        start = int(first.group(2)) if first else 0
        stop = start + len(samples)
        # whatever the fractions, train comes first, test last and val between
        in_place = {"train": start == 0, "test": stop == PHANTOM_SIZE}.get(split, 0 < start and stop < PHANTOM_SIZE)
        ds = PhantomDataset(split, resolution, int(first.group(1)), {split: (start, stop)}) \
            if first and split in THREE_WAY and in_place and stop <= PHANTOM_SIZE else None
        if ds is None or [ds.sample_id(i) for i in range(len(ds))] != [sample.id for sample in samples]:
            raise MinisdError(f"{path}: not a manifest of the phantom's {split!r} split")
        return ds
    root = Path(root) if root is not None else Path("data") / name
    problems = [(sample.file, problem) for sample in samples if (problem := image_problem(root / sample.file))]
    if problems:
        raise MinisdError(f"{root / problems[0][0]}: {problems[0][1]}, recorded in {path} "
                          f"({len(problems)} of its {len(samples)} images cannot be read from {root})")
    return ImageTextDataset(name, root, split, (split,), samples, {"kept": len(samples)}, resolution, window)


def summary(ds):
    """One line for logs with each split's own counts: "iuxray: train 2,952 images (skipped 1 unreadable
    image), val 590 images, test 148 images (2 upscaled more than 2×); before the split, skipped 3 malformed row"."""
    splits = []
    for split, counts in ds.split_counts.items():
        skipped = [f"{n:,} {reason}" for reason, n in counts.items() if reason not in ("images", UPSCALED)]
        notes = ([f"skipped {', '.join(skipped)}"] if skipped else []) + \
            ([f"{counts[UPSCALED]:,} {UPSCALED}"] if counts[UPSCALED] else [])
        splits.append(f"{split} {counts['images']:,} images" + (f" ({'; '.join(notes)})" if notes else ""))
    before = [f"{n:,} {reason}" for reason, n in getattr(ds, "before_split", Counter()).most_common()]
    return f"{ds.name}: {', '.join(splits)}" + (f"; before the split, skipped {', '.join(before)}" if before else "")
