"""Image footprints from MAST's ``s_region`` (STC-S) strings: containment and overlap.

Used before anything is downloaded: a pair is only worth fetching if the supernova lies in
both footprints and the reference covers enough of the science image. Footprints are
projected onto the tangent plane at the supernova (gnomonic), which is exact for containment
and accurate to well under a percent in area for fields of a few degrees.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from matplotlib.path import Path as _MplPath

from astrid.errors import AstridError

_FRAMES = {"ICRS", "FK5", "FK4", "J2000", "GSC1", "GALACTIC", "UNKNOWNFRAME", "TOPOCENTER",
           "GEOCENTER", "BARYCENTER", "SPHERICAL2", "CARTESIAN2"}


@dataclass(frozen=True)
class Footprint:
    """A footprint as polygons and circles in ICRS degrees.

    ``polygons``: tuple of (N, 2) arrays of (ra_deg, dec_deg) vertices; ``circles``: tuple of
    (ra_deg, dec_deg, radius_deg). A point is inside if it is inside any of them (HST
    footprints are unions of chip polygons).
    """

    polygons: tuple[np.ndarray, ...] = ()
    circles: tuple[tuple[float, float, float], ...] = ()

    @property
    def empty(self) -> bool:
        return not self.polygons and not self.circles


def parse_s_region(text: str | None) -> Footprint:
    """Parse an STC-S ``s_region`` such as ``POLYGON ICRS 23.1 60.6 ...`` or ``CIRCLE ICRS ra dec r``.

    Several shapes in one string (``POLYGON ... POLYGON ...``) make a union. Frames are
    treated as ICRS (J2000/FK5/GSC1 differ by far less than any footprint edge matters here).

    Raises
    ------
    AstridError
        Text that is not an STC-S polygon or circle.
    """
    if text is None or (isinstance(text, float) and np.isnan(text)) or not str(text).strip():
        return Footprint()
    tokens = str(text).replace(",", " ").split()
    polygons, circles = [], []
    i = 0
    while i < len(tokens):
        shape = tokens[i].upper()
        i += 1
        while i < len(tokens) and tokens[i].upper() in _FRAMES:
            i += 1
        numbers = []
        while i < len(tokens) and _is_number(tokens[i]):
            numbers.append(float(tokens[i]))
            i += 1
        if shape == "POLYGON" and len(numbers) >= 6 and len(numbers) % 2 == 0:
            polygons.append(np.array(numbers, float).reshape(-1, 2))
        elif shape == "CIRCLE" and len(numbers) == 3:
            circles.append((numbers[0], numbers[1], numbers[2]))
        else:
            raise AstridError(f"s_region {str(text)[:60]!r}: cannot parse {shape} with "
                              f"{len(numbers)} numbers")
    return Footprint(tuple(polygons), tuple(circles))


def _is_number(token: str) -> bool:
    return re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", token) is not None


def _cos_distance(ra_deg, dec_deg, ra0_deg: float, dec0_deg: float) -> np.ndarray:
    """Cosine of the angular distance of each point from (ra0, dec0)."""
    ra, dec = np.radians(ra_deg), np.radians(dec_deg)
    ra0, dec0 = np.radians(ra0_deg), np.radians(dec0_deg)
    return np.sin(dec0) * np.sin(dec) + np.cos(dec0) * np.cos(dec) * np.cos(ra - ra0)


def _tangent(ra_deg, dec_deg, ra0_deg: float, dec0_deg: float) -> np.ndarray:
    """Gnomonic projection about (ra0, dec0); (N, 2) plane coordinates in degrees.

    Only meaningful for points less than 90 deg away (callers check :func:`_cos_distance`).
    """
    ra, dec = np.radians(ra_deg), np.radians(dec_deg)
    ra0, dec0 = np.radians(ra0_deg), np.radians(dec0_deg)
    cos_c = np.maximum(_cos_distance(ra_deg, dec_deg, ra0_deg, dec0_deg), 1e-9)
    x = np.cos(dec) * np.sin(ra - ra0) / cos_c
    y = (np.cos(dec0) * np.sin(dec) - np.sin(dec0) * np.cos(dec) * np.cos(ra - ra0)) / cos_c
    return np.degrees(np.column_stack([x, y]))


def _inside(fp: Footprint, xy: np.ndarray, ra0: float, dec0: float) -> np.ndarray:
    """Boolean (N,) for plane points ``xy`` (projected about ra0, dec0) inside ``fp``."""
    inside = np.zeros(len(xy), bool)
    for poly in fp.polygons:
        # a footprint (a few degrees at most) with a vertex 60 deg or more from the tangent
        # point cannot hold points near it, and would turn inside out in the projection
        if _cos_distance(poly[:, 0], poly[:, 1], ra0, dec0).min() <= 0.5:
            continue
        verts = _tangent(poly[:, 0], poly[:, 1], ra0, dec0)
        inside |= _MplPath(verts).contains_points(xy)
    for ra_c, dec_c, radius in fp.circles:
        if _cos_distance(ra_c, dec_c, ra0, dec0) <= 0.5:
            continue
        centre = _tangent(np.array([ra_c]), np.array([dec_c]), ra0, dec0)[0]
        inside |= np.hypot(*(xy - centre).T) <= radius
    return inside


def contains(fp: Footprint, ra_deg: float, dec_deg: float) -> bool:
    """Whether (ra, dec) in degrees lies inside the footprint."""
    if fp.empty:
        return False
    return bool(_inside(fp, np.zeros((1, 2)), ra_deg, dec_deg)[0])


def _bounds(fp: Footprint, ra0: float, dec0: float) -> np.ndarray:
    """(xmin, ymin, xmax, ymax) of the footprint in the tangent plane, degrees."""
    boxes = []
    for poly in fp.polygons:
        v = _tangent(poly[:, 0], poly[:, 1], ra0, dec0)
        boxes.append([*v.min(0), *v.max(0)])
    for ra_c, dec_c, r in fp.circles:
        c = _tangent(np.array([ra_c]), np.array([dec_c]), ra0, dec0)[0]
        boxes.append([c[0] - r, c[1] - r, c[0] + r, c[1] + r])
    b = np.array(boxes)
    return np.array([b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()])


def overlap_fraction(reference: Footprint, science: Footprint, ra_deg: float, dec_deg: float,
                     samples: int = 80) -> float:
    """Fraction of the science footprint's area that the reference also covers, in [0, 1].

    Estimated on a ``samples`` x ``samples`` grid over the science footprint's bounding box in
    the tangent plane at (ra, dec); the error is about 1/samples.
    """
    if reference.empty or science.empty:
        return 0.0
    x0, y0, x1, y1 = _bounds(science, ra_deg, dec_deg)
    gx, gy = np.meshgrid(np.linspace(x0, x1, samples), np.linspace(y0, y1, samples))
    xy = np.column_stack([gx.ravel(), gy.ravel()])
    in_sci = _inside(science, xy, ra_deg, dec_deg)
    if not in_sci.any():
        return 0.0
    in_both = in_sci & _inside(reference, xy, ra_deg, dec_deg)
    return float(in_both.sum() / in_sci.sum())


def footprint_from_wcs(wcs, shape: tuple[int, int]) -> str:
    """An ``s_region`` POLYGON string for an image of ``shape`` (ny, nx) with a celestial WCS."""
    ny, nx = shape
    # pixel corners (0-based centres, so the edges are at -0.5 and n-0.5)
    corners = np.array([[-0.5, -0.5], [nx - 0.5, -0.5], [nx - 0.5, ny - 0.5], [-0.5, ny - 0.5]])
    world = wcs.pixel_to_world_values(corners[:, 0], corners[:, 1])
    ra, dec = np.asarray(world[0]) % 360.0, np.asarray(world[1])
    return "POLYGON ICRS " + " ".join(f"{a:.7f} {d:.7f}" for a, d in zip(ra, dec, strict=True))
