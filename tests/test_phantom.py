"""The phantom: its data set and splits, determinism, and films whose findings are where the text says."""
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from minisd import phantom
from minisd.data import load_dataset, summary


def test_phantom_dataset_items_and_splits():
    sets = {s: load_dataset("phantom", split=s, resolution=32, seed=3) for s in ("train", "val", "test")}
    assert [len(sets[s]) for s in ("train", "val", "test")] == [1600, 320, 80]
    ids = [r["id"] for ds in sets.values() for r in ds.manifest()]
    assert len(set(ids)) == 2000
    item = sets["val"][5]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert torch.equal(item["image"][0], item["image"][2])
    assert item["prompt"] == sets["val"].manifest()[5]["prompt"] and item["id"] == sets["val"].manifest()[5]["id"]
    assert sets["val"].manifest()[5]["file"] == ""
    case = phantom.make_case(3, 1600 + 5)
    assert torch.equal(item["image"][0], torch.from_numpy(phantom.render(case, 32)) * 2 - 1)
    assert summary(sets["test"]) == "phantom: train 1,600 images, val 320 images, test 80 images"


def test_phantom_is_deterministic_per_seed_and_index():
    a, b = phantom.make_case(7, 11), phantom.make_case(7, 11)
    assert a == b and phantom.report(a) == phantom.report(b)
    assert np.array_equal(phantom.render(a, 64), phantom.render(b, 64))
    assert not np.array_equal(phantom.render(a, 64), phantom.render(phantom.make_case(7, 12), 64))
    assert not np.array_equal(phantom.render(a, 64), phantom.render(phantom.make_case(8, 11), 64))
    image = phantom.render(a, 100)
    assert image.shape == (100, 100) and image.dtype == np.float32 and 0 <= image.min() and image.max() <= 1


def test_phantom_text_states_every_finding():
    counts = {"cardiomegaly": 0, "effusion": 0, "pneumothorax": 0, "nodule": 0, "consolidation": 0}
    for index in range(400):
        case = phantom.make_case(0, index)
        text = phantom.report(case)
        assert case.cardiomegaly == ("enlarged" in text or "cardiomegaly" in text)
        effusion = dict(case.effusion)
        if len(effusion) == 2:
            assert "bilateral pleural effusions" in text.lower()
            assert effusion["right"] in text.lower() and effusion["left"] in text.lower()
        elif effusion:
            (side, size), = effusion.items()
            assert f"{size} {side} pleural effusion" in text.lower()
            assert "bilateral" not in text and f"{'left' if side == 'right' else 'right'} pleural" not in text
        else:
            assert "No pleural effusion" in text
        if case.pneumothorax:
            side, size = case.pneumothorax
            assert f"{size.capitalize()} {side}" in text
            assert "No pneumothorax" not in text and "or pneumothorax" not in text
        else:
            assert "No pneumothorax" in text or "No pleural effusion or pneumothorax" in text
        assert text.count("mm nodule") == len(case.nodules)
        for nodule in case.nodules:
            assert f"{nodule.size_mm} mm nodule in the {nodule.lobe}." in text
        stated = "Patchy consolidation" in text or "airspace opacity" in text
        assert (case.consolidation is not None) == stated
        if case.consolidation:
            assert case.consolidation.lobe in text
        assert case.hyperinflation == ("yperinflated" in text)
        counts["cardiomegaly"] += case.cardiomegaly
        counts["effusion"] += bool(case.effusion)
        counts["pneumothorax"] += bool(case.pneumothorax)
        counts["nodule"] += bool(case.nodules)
        counts["consolidation"] += case.consolidation is not None
    assert all(count >= 20 for count in counts.values()), counts  # every finding is common enough to learn


def cases_with(predicate, count=6):
    found = []
    for index in range(2000):
        case = phantom.make_case(0, index)
        if predicate(case):
            found.append(case)
            if len(found) == count:
                return found
    raise AssertionError("too few cases")


def pixel_box(case, n, side, x_range, y_range):
    """Pixel slice of a box given in lung coordinates: p (lateral fraction) and absolute y."""
    def to_pixel(v):
        return int(round((v * case.scale + 1) / 2 * n))
    xs = sorted(to_pixel(case.cx + phantom.SIGN[side] * p * case.width) for p in x_range)
    ys = sorted(to_pixel(v) for v in y_range)
    return slice(*ys), slice(*xs)


N = 128


def test_phantom_effusion_brightens_its_side_base():
    for case in cases_with(lambda c: len(c.effusion) == 1 and c.effusion[0][1] != "small"):
        (side,), other = [s for s, _ in case.effusion], [s for s in phantom.SIDES if s not in dict(case.effusion)][0]
        film, dry = phantom.render(case, N), phantom.render(replace(case, effusion=()), N)
        base = {s: pixel_box(case, N, s, (0.5, 0.85), (case.base(s) - 0.25, case.base(s) - 0.1)) for s in phantom.SIDES}
        assert film[base[side]].mean() > film[base[other]].mean() + 0.1  # the patient's side, as radiology shows it
        assert (film - dry)[base[side]].mean() > 0.1
        assert abs((film - dry)[base[other]].mean()) < 0.01


def test_phantom_right_means_image_left():
    case = cases_with(lambda c: c.effusion_side == "right" and dict(c.effusion)["right"] == "large")[0]
    difference = phantom.render(case, N) - phantom.render(replace(case, effusion=()), N)
    assert difference[:, : N // 2].mean() > 0.02 and abs(difference[:, N // 2:].mean()) < 0.002


def silhouette_width(film, case, n):
    """Width in pixels of the bright central shadow a little above the diaphragm: the run of pixels
    brighter than halfway between the darkest lung and the midline."""
    row = film[int(round(((phantom.heart_level(case) - 0.1) * case.scale + 1) / 2 * n))]
    centre = int(round((case.cx * case.scale + 1) / 2 * n))
    threshold = (row[int(0.1 * n): int(0.9 * n)].min() + row[centre]) / 2
    left = right = centre
    while row[left - 1] > threshold:
        left -= 1
    while row[right + 1] > threshold:
        right += 1
    return right - left + 1


def test_phantom_cardiomegaly_widens_the_heart_shadow():
    for case in cases_with(lambda c: not c.effusion and not c.pneumothorax and not c.devices):
        normal = phantom.render(replace(case, heart_ratio=0.42), N)
        enlarged = phantom.render(replace(case, heart_ratio=0.62), N)
        assert silhouette_width(enlarged, case, N) > 1.15 * silhouette_width(normal, case, N)
    # and across patients, as the reports say: shadow width relative to the chest
    ratios = {True: [], False: []}
    for case in cases_with(lambda c: not c.effusion and not c.pneumothorax and not c.devices, count=40):
        chest = case.width * case.scale * N
        ratios[case.cardiomegaly].append(silhouette_width(phantom.render(case, N), case, N) / chest)
    assert min(map(len, ratios.values())) >= 5
    assert np.mean(ratios[True]) > 1.15 * np.mean(ratios[False])


def test_phantom_pneumothorax_darkens_its_periphery():
    t = ((np.arange(N) + 0.5) / N * 2 - 1)
    for case in cases_with(lambda c: bool(c.pneumothorax)):
        side, size = case.pneumothorax
        x, y = t[None, :] / case.scale, t[:, None] / case.scale
        film, whole = phantom.render(case, N), phantom.render(replace(case, pneumothorax=()), N)
        rims = {}
        for s in phantom.SIDES:  # the band along the apical and lateral pleura that the air fills
            wall, field = phantom.lung_outline(case, s, x, y)
            gap = phantom.pneumothorax_gap(size, phantom.lung_coords(case, s, x, y)[1])
            rims[s] = (field > 0.01) & (wall < gap - 0.01)
        other = "left" if side == "right" else "right"
        assert rims[side].sum() > 20
        assert (film - whole)[rims[side]].mean() < -0.05
        assert abs((film - whole)[rims[other]].mean()) < 0.005
        lost = np.clip(whole - film, 0, None)
        image_half = slice(0, N // 2) if side == "right" else slice(N // 2, N)  # the patient's right is on the left
        assert lost[:, image_half].sum() > 0.95 * lost.sum()


def test_phantom_nodules_and_consolidation_are_where_the_text_says():
    for case in cases_with(lambda c: len(c.nodules) > 0 or c.consolidation is not None, count=10):
        film = phantom.render(case, 256)
        clear = phantom.render(replace(case, nodules=(), consolidation=None), 256)
        for lesion in case.nodules + ((case.consolidation,) if case.consolidation else ()):
            side = "right" if "right" in lesion.lobe else "left"
            assert (lesion.x - case.cx) * phantom.SIGN[side] > 0  # on the named side of the image
            row, col = (int((v * case.scale + 1) / 2 * 256) for v in (lesion.y, lesion.x))
            assert film[row, col] - clear[row, col] > 0.1, lesion
        assert np.abs(film - clear)[:, :].max() > 0.1


@pytest.mark.parametrize("resolution", [64, 224])
def test_phantom_renders_at_any_resolution(resolution):
    case = phantom.make_case(0, 1)
    image = phantom.render(case, resolution)
    small = np.asarray(Image.fromarray(image).resize((32, 32), Image.BOX))
    reference = np.asarray(Image.fromarray(phantom.render(case, 256)).resize((32, 32), Image.BOX))
    assert np.abs(small - reference).mean() < 0.03  # the same anatomy, not a resized bitmap
