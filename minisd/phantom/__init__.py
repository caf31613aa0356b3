"""Procedural chest X-rays (PA view) with report text whose findings are visible in the image.

A sample is a pure function of (seed, index): `make_case` draws a patient and its findings,
`render` draws the film at any resolution, `report` writes the radiology text. Coordinates are
normalised to [-1, 1] with y pointing down and x pointing to the image's right, which is the
PATIENT'S LEFT (radiology convention): the patient's right lung is on the image's left.

The film is a sum of attenuations along each ray, shown as 1 - exp(-attenuation): the body adds
soft tissue, the lungs take most of it away where they hold air, and whatever replaces that air
(heart, pleural fluid, consolidation, nodules) gives it back. Bones, vessels and devices add on top.
"""
from .anatomy import SIDES, SIGN, Case, Lesion, heart_level, lung_coords, lung_outline, make_case, pneumothorax_gap
from .film import render
from .report import report

__all__ = ["SIDES", "SIGN", "Case", "Lesion", "heart_level", "lung_coords", "lung_outline", "make_case",
           "pneumothorax_gap", "render", "report"]
