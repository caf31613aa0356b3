"""The film: attenuation along each ray from the body, lungs, heart, findings, bones, vessels and devices."""
import math

import numpy as np
from PIL import Image, ImageDraw

from .anatomy import (MM, SIDES, SIGN, diaphragm_y, effusion_top, heart_level, hilum, lung_coords, lung_outline,
                      pneumothorax_gap, silhouette_widths)


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
