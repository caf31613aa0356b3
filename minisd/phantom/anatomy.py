"""A patient: anatomy, acquisition and findings drawn from (seed, index), and the geometry that places them."""
import math
from dataclasses import dataclass, replace

import numpy as np

SIDES = ("right", "left")  # the patient's sides
SIGN = {"right": -1.0, "left": 1.0}  # where each side lies along the image's x axis
MM = 0.005  # normalised units per millimetre: the film spans about 40 cm

# Lobe zones on a frontal film: side, height range q (0 apex, 1 costophrenic angle), lateral range p
# (0 midline, 1 lateral rib margin).
LOBES = {
    "right upper lobe": ("right", (0.12, 0.42), (0.35, 0.85)),
    "right middle lobe": ("right", (0.55, 0.78), (0.25, 0.6)),
    "right lower lobe": ("right", (0.62, 0.9), (0.5, 0.88)),
    "left upper lobe": ("left", (0.12, 0.5), (0.35, 0.85)),
    "left lower lobe": ("left", (0.62, 0.9), (0.5, 0.88)),
}
SIZES = ("small", "moderate", "large")
DEVICES = ("pacemaker", "central line", "endotracheal tube", "ecg leads")


@dataclass(frozen=True)
class Lesion:
    """A nodule or a focus of consolidation: where it is and how big (diameter)."""
    lobe: str
    size_mm: int
    x: float
    y: float


@dataclass(frozen=True)
class Case:
    """One patient: anatomy, acquisition and findings. `render` and `report` read nothing else."""
    # anatomy
    cx: float  # midline
    width: float  # half-width of the thoracic cage
    apex_y: float  # top of the lung apices
    base_right: float  # costophrenic angles; the left hemidiaphragm lies lower
    base_left: float
    dome: float  # height of the diaphragm domes
    body: float  # soft tissue beyond the ribs
    rib_start: float
    rib_pitch: float
    clavicle_y: float
    gastric_bubble: bool
    # acquisition
    scale: float  # magnification
    exposure: float
    contrast: float
    noise: float
    noise_seed: int
    text_seed: int
    # findings
    heart_ratio: float  # cardiothoracic ratio; above 0.5 is cardiomegaly
    effusion: tuple = ()  # ((side, size), ...)
    pneumothorax: tuple = ()  # (side, size) or ()
    nodules: tuple = ()  # (Lesion, ...)
    consolidation: Lesion = None
    hyperinflation: bool = False
    devices: tuple = ()

    @property
    def cardiomegaly(self):
        return self.heart_ratio > 0.5

    @property
    def effusion_side(self):
        """"right", "left", "bilateral" or ""."""
        sides = [side for side, _ in self.effusion]
        return "bilateral" if len(sides) == 2 else "".join(sides)

    def base(self, side):
        return self.base_right if side == "right" else self.base_left


# ------------------------------------------------------------------------------------------- geometry
def lung_coords(case, side, x, y):
    """(p, q): p = lateral fraction (0 midline, 1 lateral rib margin), q = height (0 apex, 1 base)."""
    p = SIGN[side] * (x - case.cx) / case.width
    q = (y - case.apex_y) / (case.base(side) - case.apex_y)
    return p, q


def dome_height(case, side):
    return case.dome * (1.1 if side == "right" else 0.9)  # the liver pushes the right dome higher


def diaphragm_y(case, side, p):
    """Top of a hemidiaphragm: a dome that meets the lateral wall in a sharp costophrenic angle."""
    return case.base(side) - dome_height(case, side) * np.sin(math.pi * np.clip(p, 0.0, 1.0) ** 0.8)


def lung_outline(case, side, x, y):
    """Signed distances (about) inside one lung: to its apical and lateral pleura, and to its whole outline."""
    p, q = lung_coords(case, side, x, y)
    qc = np.clip(q, 0.0, 1.0)
    top = (q - 0.3 * ((p - 0.42) / 0.5) ** 2) * (case.base(side) - case.apex_y)
    lateral = (0.97 - 0.4 * (1 - qc) ** 3 - p) * case.width
    wall = np.minimum(top, lateral)
    medial = (p - 0.05 - 0.2 * (1 - qc) ** 2) * case.width
    bottom = diaphragm_y(case, side, p) - y
    return wall, np.minimum(np.minimum(wall, medial), bottom)


def heart_level(case):
    """Height at which the heart is widest."""
    return 0.5 * (case.base_left - case.dome * 0.6) + 0.05


def silhouette_widths(case, y):
    """How far the mediastinum + heart reach towards the image's left and right at height y."""
    total = case.heart_ratio * 2 * case.width
    mid, top = heart_level(case), -0.2
    upper = 0.11 + 0.03 * np.clip((y + 0.8) / 0.6, 0, 1)
    right_atrium = 0.34 * total * np.sqrt(np.clip(1 - ((y - mid - 0.03) / (mid - top + 0.05)) ** 2, 0, 1))
    left_ventricle = 0.66 * total * np.clip(1 - ((y - mid) / (mid - top + 0.1)) ** 2, 0, 1) ** 0.4
    aortic_knob = 0.055 * np.exp(-(((y + 0.36) / 0.07) ** 2))
    return np.maximum(upper, right_atrium), np.maximum(upper + aortic_knob, left_ventricle)


def effusion_top(case, side, size, p):
    """Upper edge of pleural fluid, a meniscus climbing the lateral wall. A small effusion only blunts
    the costophrenic angle; a moderate one hides the hemidiaphragm; a large one fills the lower lung."""
    pc = np.clip(p, 0, 1)
    if size == "small":
        return case.base(side) - 0.05 - 0.12 * pc ** 3
    dome_top = case.base(side) - dome_height(case, side)
    return dome_top - (0.04 if size == "moderate" else 0.3) - 0.16 * pc ** 2


def pneumothorax_gap(size, q):
    """Distance from the chest wall to the collapsed lung's edge, widest at the apex where air rises."""
    return {"small": 0.07, "moderate": 0.14, "large": 0.24}[size] * np.clip(1.3 - q, 0.2, 1.3)


def hilum(case, side):
    return case.cx + SIGN[side] * 0.27 * case.width, heart_level(case) - 0.36


def visible_in_lung(case, side, x, y, margin):
    """Whether (x, y) lies in open lung: inside the outline, off the heart, above fluid, inside a
    collapsed lung's edge, all by `margin`."""
    p, q = lung_coords(case, side, x, y)
    wall, field = lung_outline(case, side, x, y)
    right, left = silhouette_widths(case, y)
    fluid = dict(case.effusion)
    return (field > margin and abs(x - case.cx) > (right if side == "right" else left) + margin
            and (side not in fluid or y < effusion_top(case, side, fluid[side], p) - margin)
            and (case.pneumothorax[:1] != (side,) or wall > pneumothorax_gap(case.pneumothorax[1], q) + margin))


# ------------------------------------------------------------------------------------------- sampling
def make_case(seed, index):
    """The patient and findings of sample `index` of the phantom set drawn with `seed` (both >= 0)."""
    rng = np.random.default_rng([seed, index])
    hyper = bool(rng.random() < 0.1)
    base = rng.uniform(0.42, 0.56) + (0.12 if hyper else 0.0)
    enlarged = rng.random() < 0.3
    case = Case(
        cx=rng.normal(0, 0.02), width=rng.uniform(0.68, 0.8), apex_y=rng.uniform(-0.8, -0.7) - 0.04 * hyper,
        base_right=base, base_left=base + rng.uniform(0.02, 0.07),
        dome=rng.uniform(0.06, 0.09) if hyper else rng.uniform(0.16, 0.24), body=rng.uniform(0.08, 0.2),
        rib_start=rng.uniform(-0.78, -0.7), rib_pitch=rng.uniform(0.11, 0.13),
        clavicle_y=rng.uniform(-0.7, -0.6), gastric_bubble=bool(rng.random() < 0.6),
        scale=rng.uniform(0.94, 1.04), exposure=rng.uniform(-0.04, 0.04), contrast=rng.uniform(0.9, 1.1),
        noise=rng.uniform(0.006, 0.02), noise_seed=int(rng.integers(2**31)), text_seed=int(rng.integers(2**31)),
        heart_ratio=rng.uniform(0.55, 0.66) if enlarged else rng.uniform(0.38, 0.47) - 0.03 * hyper,
        hyperinflation=hyper)

    effusion = ()
    if rng.random() < 0.3:
        sides = [("right",), ("left",), ("right", "left")][rng.choice(3, p=[0.4, 0.3, 0.3])]
        effusion = tuple((side, SIZES[rng.choice(3, p=[0.5, 0.35, 0.15])]) for side in sides)
    pneumothorax = ()
    if rng.random() < 0.12:
        pneumothorax = (SIDES[rng.integers(2)], SIZES[rng.choice(3, p=[0.45, 0.35, 0.2])])
        # fluid and air on one side would be a hydropneumothorax, a finding of its own: keep them apart
        effusion = tuple(e for e in effusion if e[0] != pneumothorax[0])
    case = replace(case, effusion=effusion, pneumothorax=pneumothorax)

    consolidation = place_lesion(rng, case, [], rng.integers(40, 70)) if rng.random() < 0.12 else None
    nodules = []
    for _ in range(rng.choice(4, p=[0.62, 0.23, 0.1, 0.05])):
        nodule = place_lesion(rng, case, nodules + [consolidation] * bool(consolidation), rng.integers(6, 26))
        nodules += [nodule] * bool(nodule)
    devices = ()
    if rng.random() < 0.15:
        devices = tuple(DEVICES[i] for i in sorted(rng.choice(len(DEVICES), size=rng.integers(1, 3), replace=False)))
    return replace(case, nodules=tuple(nodules), consolidation=consolidation, devices=devices)


def place_lesion(rng, case, others, size_mm):
    """A lesion in a random lobe where it is visible and clear of `others`; None if none fits."""
    for _ in range(30):
        lobe = list(LOBES)[rng.integers(len(LOBES))]
        side, (q0, q1), (p0, p1) = LOBES[lobe]
        p, q = rng.uniform(p0, p1), rng.uniform(q0, q1)
        x = case.cx + SIGN[side] * p * case.width
        y = case.apex_y + q * (case.base(side) - case.apex_y)
        margin = size_mm / 2 * MM + 0.03
        if visible_in_lung(case, side, x, y, margin) and all(
                math.hypot(x - o.x, y - o.y) > (o.size_mm + size_mm) / 2 * MM + 0.08 for o in others):
            return Lesion(lobe, int(size_mm), float(x), float(y))
    return None
