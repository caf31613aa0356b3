"""Procedural chest X-rays (PA view) with report text whose findings are visible in the image.

A sample is a pure function of (seed, index): `make_case` draws a patient and its findings,
`render` draws the film at any resolution, `report` writes the radiology text. Coordinates are
normalised to [-1, 1] with y pointing down and x pointing to the image's right, which is the
PATIENT'S LEFT (radiology convention): the patient's right lung is on the image's left.

The film is a sum of attenuations along each ray, shown as 1 - exp(-attenuation): the body adds
soft tissue, the lungs take most of it away where they hold air, and whatever replaces that air
(heart, pleural fluid, consolidation, nodules) gives it back. Bones, vessels and devices add on top.
"""
import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

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


# ------------------------------------------------------------------------------------------- rendering
class Canvas:
    """Strokes in the film's coordinates, drawn by PIL at twice the size and box-reduced (anti-aliasing)."""

    def __init__(self, case, n):
        self.scale, self.n = case.scale, n
        self.image = Image.new("F", (2 * n, 2 * n), 0.0)
        self.draw = ImageDraw.Draw(self.image)

    def line(self, points, width, value):
        """A polyline `width` normalised units wide; one thinner than a (drawn) pixel is drawn fainter."""
        self.lines(np.asarray([points]), np.asarray([width]), np.asarray([value]))

    def lines(self, points, widths, values):
        """Polylines points [N, K, 2] with their widths [N] and values [N]."""
        pixels = widths * self.scale * self.n
        xy = (points * (self.scale * self.n) + self.n).reshape(len(points), -1).tolist()
        for xy, width, fill in zip(xy, np.maximum(1, np.rint(pixels)).astype(int).tolist(),
                                   (values * np.minimum(pixels, 1.0)).tolist()):
            self.draw.line(xy, fill=fill, width=width)

    def array(self):
        return np.asarray(self.image.reduce(2))


def smooth_noise(rng, cells, n):
    """A smooth random field [n, n] of unit-ish variance with about `cells` features across the image."""
    grid = rng.standard_normal((cells + 3, cells + 3), dtype=np.float32)
    return np.asarray(Image.fromarray(grid).resize((n, n), Image.BICUBIC, box=(1, 1, cells + 2, cells + 2)))


def smooth3(image):
    """Separable [1, 2, 1] / 4 blur: the unsharpness of screen and film."""
    for axis in (0, 1):
        image = np.swapaxes(image, 0, axis)
        out = 0.5 * image
        out[1:] += 0.25 * image[:-1]
        out[:-1] += 0.25 * image[1:]
        out[0] += 0.25 * image[0]
        out[-1] += 0.25 * image[-1]
        image = np.swapaxes(out, 0, axis)
    return image


def ramp(distance, width):
    """0 outside, 1 inside, linear across an edge `width` wide: anti-aliased masks from distances."""
    return np.clip(0.5 + distance / width, 0.0, 1.0)


def window(t, centre, radius):
    """The slice of the 1-D coordinate grid `t` within `radius` of `centre`: local work on a patch."""
    return slice(np.searchsorted(t, centre - radius), np.searchsorted(t, centre + radius))


RIB_SAMPLES = 64


def rib_profile(thickness, ribs=11):
    """Attenuation across the rib cage by rib phase (rib i spans phase [i, i + 1)), sampled at
    1 / RIB_SAMPLES: each rib a chord through a tube with brighter cortex at its edges, fading in at the
    first rib and out after the last."""
    phase = np.arange(-RIB_SAMPLES, (ribs + 1) * RIB_SAMPLES, dtype=np.float32) / RIB_SAMPLES
    across = phase - np.floor(phase) - 0.5
    chord = np.sqrt(np.clip(1 - (across / thickness) ** 2, 0, 1))
    cortex = np.sqrt(np.clip(1 - ((np.abs(across) - 0.9 * thickness) / 0.05) ** 2, 0, 1))
    return (chord + 0.6 * cortex) * ramp(np.minimum(phase, ribs - phase), 0.3)


RIBS = (  # posterior ribs arch up from the spine; anterior ribs, fainter, slope down towards the midline
    ("posterior", 1.0, 0.14, rib_profile(0.16)),
    ("anterior", 0.45, 0.4, rib_profile(0.2)),
)


def vessel_tree(rng, case, side):
    """Pulmonary vessels as polylines [N, 3, 2] and widths [N]: trunks from the hilum that fork three
    times, tapering towards the periphery."""
    trunks, generations = 7, 4
    count = trunks * (2 ** generations - 1)
    bends, turns = rng.normal(0, 0.25, count).tolist(), rng.uniform(0.2, 0.55, (count, 2)).tolist()
    shrinks = rng.uniform(0.7, 0.85, (count, 2)).tolist()
    angles = (np.linspace(-1.5, 1.4, trunks) + rng.normal(0, 0.1, trunks)).tolist()  # radians below the horizontal
    lengths = (rng.uniform(0.13, 0.19, trunks) * case.width / 0.75).tolist()
    hx, hy = hilum(case, side)
    sign = SIGN[side]
    # lower-zone vessels are wider in an upright patient
    branches = [(hx, hy, a, length, 0.013 * (1.1 + 0.3 * math.sin(a))) for a, length in zip(angles, lengths)]
    points, widths = [], []
    for k, (x0, y0, angle, length, width) in enumerate(branches):  # grows while it is read: breadth first
        bend = angle + bends[k]
        xm, ym = x0 + sign * math.cos(bend) * length / 2, y0 + math.sin(bend) * length / 2
        x1, y1 = xm + sign * math.cos(angle) * length / 2, ym + math.sin(angle) * length / 2
        points.append(((x0, y0), (xm, ym), (x1, y1)))
        widths.append(width)
        if len(branches) < count:
            for turn, shrink in zip((-turns[k][0], turns[k][1]), shrinks[k]):
                branches.append((x1, y1, angle + turn, length * shrink, width * 0.7))
    return np.asarray(points), np.asarray(widths)


def render(case, resolution):
    """The film as float32 [resolution, resolution] in [0, 1], white = dense."""
    c, n = case, resolution
    noise = lambda part: np.random.default_rng([c.noise_seed, part])  # a stream per part: findings shift no other
    t = ((np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1) / np.float32(c.scale)
    x, y = t[None, :], t[:, None]  # separable coordinates: many terms below stay 1-D until combined
    px = 2.0 / n / c.scale
    edge = max(1.5 * px, 0.006)
    dx = x - c.cx
    p = np.abs(dx) / c.width

    # body: soft tissue as thick as the chord through an elliptic section of neck, shoulders, chest
    half = np.interp(y, [-1.0, -0.9, -0.75, -0.55, 0.3, 1.0],
                     [0.38, 0.55, c.width + c.body + 0.35, c.width + c.body + 0.12, c.width + c.body,
                      c.width + c.body - 0.06]).astype(np.float32)
    att = 1.75 * np.sqrt(np.clip(1 - (dx / half) ** 2, 0, 1))

    # lungs: air that replaces tissue, less where heart, fluid, consolidation or a nodule fill them
    wall, field = {}, {}
    for side in SIDES:
        wall[side], field[side] = lung_outline(c, side, x, y)
    lung = {side: ramp(field[side], edge) for side in SIDES}
    lungs = lung["right"] + lung["left"]
    right_reach, left_reach = silhouette_widths(c, y)
    silhouette = ramp(np.minimum(right_reach + dx, left_reach - dx), 1.5 * edge)
    air = sum(lung[side] * np.clip(0.6 + 4 * field[side], 0, 1) for side in SIDES)  # thinner at the rim
    air *= 1 - 0.85 * silhouette

    filled = np.zeros_like(air)
    for side, size in c.effusion:
        top = effusion_top(c, side, size, lung_coords(c, side, x, y)[0])
        filled = np.maximum(filled, 0.92 * np.clip((y - top) / 0.04, 0, 1) * ramp(wall[side] + 0.02, edge))
    if c.consolidation:
        rng, r = noise(1), c.consolidation.size_mm / 2 * MM
        blob = np.exp(-((x - c.consolidation.x) / r) ** 2) * np.exp(-((y - c.consolidation.y) / (0.7 * r)) ** 2)
        filled = np.maximum(filled, 0.7 * np.clip(1.6 * blob - 0.3 + 0.25 * smooth_noise(rng, 30, n), 0, 1))
    for nodule in c.nodules:
        r = nodule.size_mm / 2 * MM
        rows, cols = window(t, nodule.y, r + px), window(t, nodule.x, r + px)
        disk = np.clip(1 - ((x[:, cols] - nodule.x) ** 2 + (y[rows] - nodule.y) ** 2) / r ** 2, 0, 1)
        filled[rows, cols] = np.maximum(filled[rows, cols], 0.85 * np.sqrt(np.sqrt(disk)))
    air *= 1 - filled

    # pneumothorax: air without lung between the chest wall and the visceral pleural line
    collapsed = 0
    if c.pneumothorax:
        side, size = c.pneumothorax
        gap = pneumothorax_gap(size, lung_coords(c, side, x, y)[1])
        collapsed = lung[side] * ramp(gap - wall[side], edge)
        att = att + 0.2 * np.clip(1 - np.abs(wall[side] - gap) / max(1.2 * px, 0.004), 0, 1) * lung[side]
        air = air + 0.3 * collapsed
    att -= (1.35 if c.hyperinflation else 1.2) * air

    # vessels: branching trees from each hilum, absent where the lung has collapsed away
    rng = noise(10)
    canvas = Canvas(c, n)
    for side in SIDES:
        points, widths = vessel_tree(rng, c, side)
        canvas.lines(points, widths, np.sqrt(widths / 0.013))
    markings = 0.2 * canvas.array() + 0.04 * smooth_noise(rng, n // 4, n)
    for side in SIDES:
        hx, hy = hilum(c, side)
        rows, cols = window(t, hy, 0.4), window(t, hx, 0.2)
        markings[rows, cols] += 0.3 * np.exp(-((x[:, cols] - hx) / 0.07) ** 2) * np.exp(-((y[rows] - hy) / 0.13) ** 2)
    att += markings * lungs * (1 - collapsed) * (1 - 0.7 * silhouette)

    # bones: ribs, spine, clavicles, humeral heads
    lateral_drop = np.clip(p - 0.75, 0, None) ** 2
    phases = {"posterior": (y - c.rib_start - 0.3 * ((p - 0.7) ** 2 - 0.49) - 1.5 * lateral_drop) / c.rib_pitch,
              "anterior": (y - c.rib_start + 0.12 - 0.4 * (1 - p)) / c.rib_pitch}
    ribs = 0
    for name, strength, medial, profile in RIBS:
        phase = phases[name] * (1.06 - 0.012 * phases[name])  # lower ribs lie further apart
        index = np.clip((phase + 1) * RIB_SAMPLES, 0, len(profile) - 1).astype(np.int32)
        ribs = ribs + profile[index] * (strength * ramp(p - medial, 0.1) * ramp(1.06 - p, 0.03))
    att += 0.13 * ribs * (0.3 + 0.7 * lungs * (1 - silhouette))
    vertebra = np.abs(np.mod((y - c.rib_start) / (0.95 * c.rib_pitch), 1.0) - 0.5)
    att += 0.12 * ramp(0.085 - np.abs(dx), edge) * (0.7 + 0.6 * vertebra)
    medial_end = p - 0.08
    clavicle = (c.clavicle_y + 0.05 - 0.12 * medial_end - 0.1 * medial_end ** 2
                + 0.02 * np.sin(2 * math.pi * medial_end / 0.85))  # an S rising to the shoulder
    thickness = 0.032 - 0.01 * medial_end
    across = (y - clavicle) / thickness
    cortex = np.sqrt(np.clip(1 - ((np.abs(across) - 0.9) * thickness / 0.006) ** 2, 0, 1))
    bone = np.sqrt(np.clip(1 - across ** 2, 0, 1)) + 0.5 * cortex
    att += 0.5 * bone * (ramp(medial_end, 0.03) * ramp(0.9 - medial_end, 0.06))
    for side in SIDES:
        hx, hy = c.cx + SIGN[side] * (c.width + 0.36), c.apex_y + 0.1
        rows, cols = window(t, hy, 0.15), window(t, hx, 0.15)
        att[rows, cols] += 0.5 * np.sqrt(np.clip(1 - ((x[:, cols] - hx) ** 2 + (y[rows] - hy) ** 2) / 0.15 ** 2, 0, 1))

    # airways and bowel gas
    carina_y = heart_level(c) - 0.5
    att -= 0.35 * ramp(0.03 - np.abs(dx + 0.01 * (y + 1)), edge) * ramp(carina_y - y, 0.03)
    if c.gastric_bubble:
        bx, by = c.cx + 0.45 * c.width, float(diaphragm_y(c, "left", 0.45)) + 0.07
        rows, cols = window(t, by, 0.06), window(t, bx, 0.12)
        ellipse = np.sqrt(((x[:, cols] - bx) / 0.11) ** 2 + ((y[rows] - by) / 0.05) ** 2)
        att[rows, cols] -= 0.6 * ramp(1 - ellipse, 0.25) * (y[rows] < by + 0.01)  # flat fluid level below
    if c.devices:
        att += devices(c, n, t, x, y, edge)

    # acquisition: unsharpness, exposure, quantum mottle
    if n >= 96:
        att = smooth3(att)
    film = 1 - np.exp(-c.contrast * np.maximum(att, 0))
    film += c.exposure + c.noise * math.sqrt(12) * (noise(2).random((n, n), dtype=np.float32) - 0.5)
    return np.clip(film, 0, 1)


def devices(c, n, t, x, y, edge):
    """Attenuation of support devices: metal and radio-opaque lines."""
    canvas = Canvas(c, n)
    carina_y, heart_y = heart_level(c) - 0.5, heart_level(c)
    out = np.zeros((n, n), np.float32)
    if "pacemaker" in c.devices:
        gx, gy = c.cx + 0.62 * c.width, c.clavicle_y + 0.14
        rows, cols = window(t, gy, 0.06), window(t, gx, 0.085)
        out[rows, cols] += 2.5 * ramp(np.minimum(0.075 - np.abs(x[:, cols] - gx), 0.05 - np.abs(y[rows] - gy)), edge)
        canvas.line([(gx - 0.07, gy), (c.cx + 0.22, gy - 0.05), (c.cx + 0.06, carina_y - 0.02),
                     (c.cx - 0.08, carina_y + 0.15), (c.cx - 0.11, heart_y - 0.05), (c.cx - 0.02, heart_y + 0.1),
                     (c.cx + 0.15, heart_y + 0.15)], 0.008, 2.0)
    if "central line" in c.devices:
        canvas.line([(c.cx - 0.22, -1.1), (c.cx - 0.17, c.clavicle_y - 0.05), (c.cx - 0.08, carina_y + 0.05),
                     (c.cx - 0.07, carina_y + 0.16)], 0.008, 1.2)
    if "endotracheal tube" in c.devices:
        tip = carina_y - 0.16
        canvas.line([(c.cx - 0.005, -1.1), (c.cx - 0.003, tip)], 0.045, 0.15)
        canvas.line([(c.cx + 0.01, -1.1), (c.cx + 0.012, tip)], 0.008, 1.2)
    if "ecg leads" in c.devices:
        for ex, ey in ((-0.55, -0.5), (0.55, -0.5), (0.6, 0.4)):
            x0, y0 = c.cx + ex * c.width, ey
            canvas.line([(x0 + 0.03 * math.cos(a), y0 + 0.03 * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 17)],
                        0.007, 1.5)
            canvas.line([(x0, y0 + 0.03), (x0 + 0.1 * ex, 1.1)], 0.005, 1.0)
    return out + canvas.array()


# ------------------------------------------------------------------------------------------- text
def report(case):
    """Radiology-report findings for the case, in the order a radiologist dictates them."""
    rng = np.random.default_rng(case.text_seed)
    pick = lambda *options: options[rng.integers(len(options))]
    sentences = [{
        "pacemaker": "Left chest wall pacemaker with leads in the right atrium and right ventricle.",
        "central line": "Right internal jugular central venous catheter with tip in the SVC.",
        "endotracheal tube": "Endotracheal tube tip is 4 cm above the carina.",
        "ecg leads": "Overlying EKG leads.",
    }[device] for device in case.devices]
    if case.cardiomegaly:
        degree = "Moderate" if case.heart_ratio > 0.6 else "Mild"
        sentences.append(pick("The heart is enlarged.", f"{degree} cardiomegaly.",
                              "The cardiac silhouette is enlarged."))
    else:
        sentences.append(pick("The heart is normal in size.", "Heart size is normal.",
                              "The cardiomediastinal silhouette is within normal limits."))
    if case.hyperinflation:
        sentences.append(pick("The lungs are hyperinflated with flattening of the hemidiaphragms.",
                              "Hyperinflated lungs with flattened hemidiaphragms."))
    if case.consolidation:
        lobe = case.consolidation.lobe
        sentences.append(pick(f"Focal airspace opacity in the {lobe}, concerning for pneumonia.",
                              f"Patchy consolidation in the {lobe}."))
    for nodule in case.nodules:
        sentences.append(f"{nodule.size_mm} mm nodule in the {nodule.lobe}.")
    if not case.consolidation and not case.nodules:
        sentences.append(pick("The lungs are clear.", "No focal airspace consolidation."))
    effusion = dict(case.effusion)
    if len(effusion) == 2 and effusion["right"] == effusion["left"]:
        sentences.append(f"{effusion['right'].capitalize()} bilateral pleural effusions.")
    elif len(effusion) == 2:
        sentences.append(f"Bilateral pleural effusions, {effusion['right']} on the right "
                         f"and {effusion['left']} on the left.")
    elif effusion:
        (side, size), = effusion.items()
        sentences.append(f"{size.capitalize()} {side} pleural effusion.")
    if case.pneumothorax:
        side, size = case.pneumothorax
        sentences.append(f"{size.capitalize()} {side}{' apical' if size == 'small' else ''} pneumothorax.")
    if not effusion and not case.pneumothorax:
        sentences.append("No pleural effusion or pneumothorax.")
    elif not effusion:
        sentences.append("No pleural effusion.")
    elif not case.pneumothorax:
        sentences.append("No pneumothorax.")
    return " ".join(sentences)
