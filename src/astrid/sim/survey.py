"""Simulated reference/science pairs with known truth, and the survey directory they live in.

One pair is one patch of sky seen twice: a deep reference and a shallower science exposure,
with their own pointing (a few pixels apart and slightly rotated), PSF, sky, zero point, gain
and noise. Between the two, real transients appear, fade or move and detector artefacts come
and go; ``truth.csv`` lists every such change on the science pixel grid.

How an epoch is made: the static sky (Sérsic galaxies convolved with the local Moffat PSF,
stars as pixel-integrated PSF stamps) is rendered at the positions the epoch's true TAN WCS
gives; transients are added with fluxes solved for a target S/N in the difference (see
:mod:`astrid.sim.transients`); satellite trails are added as light; then Poisson noise on
(sky + sources) x gain and Gaussian read noise; then cosmic rays, hot pixels and bad columns;
finally charge above SATURATE bleeds along columns and the image is clipped there. The
header WCS is the true one shifted by a small recorded error (``wcs_error_px``).

Each pair draws from its own child of ``SeedSequence(seed)`` (``spawn_key=(index,)``), so a
pair is the same whether 1 or 1000 pairs are made, and pairs can be simulated in any order
or in parallel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS

from astrid.config import SimSettings
from astrid.errors import ConfigError
from astrid.progress import track
from astrid.provenance import config_hash, provenance, write_json_atomic, write_table_atomic
from astrid.sim import artefacts
from astrid.sim.psf import TRAIL_POINTS, MoffatPsf
from astrid.sim.scene import (
    Galaxies,
    add_galaxies,
    add_point_sources,
    draw_galaxies,
    power_law_mags,
    sample_sersic_offsets,
)
from astrid.sim.transients import EpochNoise, difference_snr, flux_for_snr

TRUTH_COLUMNS = ["kind", "x", "y", "ra", "dec", "flux", "mag", "snr", "is_real", "sign"]
STATIC_COLUMNS = ["kind", "x", "y", "ra", "dec", "flux", "mag", "saturated", "r_eff_px",
                  "sersic_n", "axis_ratio"]
PAIR_FILES = ("ref.fits", "sci.fits", "truth.csv", "static.csv", "pair.json")
_REFERENCE_SIZE_PX = 2048  # counts in the settings are per 2048² image
_FLOOR_SIGMA = 0.02  # render source wings down to this fraction of the sky noise
_EDGE_PX = 4  # transients are placed at least this far inside both images


@dataclass(frozen=True)
class SimEpoch:
    """One simulated exposure.

    ``data`` (ny, nx) float32 ADU, sky included, clipped at ``saturation_adu``; ``header``
    holds the (deliberately slightly wrong) WCS and the keywords ``read_image`` reads; ``wcs``
    is that header WCS; ``true_wcs`` is the exact one; ``wcs_error_px`` = header pixel - true
    pixel of any sky position. ``sky`` (ny, nx) float32 is the noiseless sky (ADU);
    ``sky_sigma_adu`` the noise of an empty pixel at the mean sky level.
    """

    data: np.ndarray
    header: fits.Header
    wcs: WCS
    fwhm_px: float
    sky_sigma_adu: float
    true_wcs: WCS = None
    wcs_error_px: tuple[float, float] = (0.0, 0.0)
    psf: MoffatPsf = None
    sky: np.ndarray = None
    gain: float = 1.0
    read_noise_e: float = 0.0
    zero_point: float = 0.0
    saturation_adu: float = np.inf


@dataclass(frozen=True)
class SimPair:
    """A simulated pair: ``truth`` (what changed, science grid) and ``static`` (stars and
    galaxies); ``info`` the pair's drawn parameters (geometry, PSFs, photometry) as JSON."""

    pair_id: str
    ref: SimEpoch
    sci: SimEpoch
    truth: pd.DataFrame
    static: pd.DataFrame
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def pair_id_for(settings: SimSettings, index: int) -> str:
    """Unique across surveys made with different seeds, so datasets can be merged."""
    return f"sim-s{settings.seed}-{index:04d}"


def simulate_pair(settings: SimSettings, index: int) -> SimPair:
    """Simulate reference/science pair number ``index`` of the survey ``settings`` describes.

    Deterministic for (settings, index); independent of how many pairs a survey has.
    """
    check_settings(settings)
    rng = np.random.default_rng(np.random.SeedSequence(settings.seed, spawn_key=(index,)))
    n = settings.size_px
    shape = (n, n)
    area = (n / _REFERENCE_SIZE_PX) ** 2

    geometry = _draw_geometry(rng, settings, shape)
    sci_p = _draw_epoch(rng, settings, shape, is_reference=False)
    ref_p = _draw_epoch(rng, settings, shape, is_reference=True)
    ref_p["mjd"] = settings.mjd_start + rng.uniform(0, 365)
    sci_p["mjd"] = ref_p["mjd"] + rng.uniform(*settings.baseline_days)
    flux_ratio = 10 ** (0.4 * (sci_p["zero_point"] - ref_p["zero_point"]))
    snr_radius = int(np.ceil(4 * max(sci_p["fwhm_px"], ref_p["fwhm_px"]))) + 3  # equal sizes: FFT
    for p in (sci_p, ref_p):
        p["psf_grid"] = _PsfGrid(p["psf"], snr_radius)
    sci_true, ref_true = geometry["sci_wcs"], geometry["ref_wcs"]

    # ---- the static sky, defined on the science frame (plus a margin covering the reference)
    # The reference's corners reach beyond the science frame by the offset plus the rotation
    # (0.3 deg turns a corner by 0.0037 n); the 40 px also cover PSF and galaxy wings.
    margin = settings.offset_range_px[1] + 0.003 * n + 40
    frac_area = ((n + 2 * margin) / n) ** 2 * area
    n_star = int(rng.poisson(settings.n_stars * frac_area))
    star_x = rng.uniform(-margin, n - 1 + margin, n_star)
    star_y = rng.uniform(-margin, n - 1 + margin, n_star)
    star_mag = power_law_mags(rng, n_star, settings.star_mag_range, settings.star_count_slope)
    gal = draw_galaxies(rng, int(rng.poisson(settings.n_galaxies * frac_area)), shape, margin,
                        settings.galaxy_mag_range, settings.galaxy_count_slope,
                        settings.galaxy_reff_range_px, settings.sersic_n_range)
    if settings.clean:
        bright = np.zeros(n_star, bool)
        for p in (sci_p, ref_p):
            bright |= _peak_adu(_flux(star_mag, p["zero_point"]), p["psf"]) + p["sky_adu"] \
                > 0.7 * settings.saturation_adu
        star_x, star_y, star_mag = star_x[~bright], star_y[~bright], star_mag[~bright]

    star_ra, star_dec = sci_true.wcs_pix2world(star_x, star_y, 0)
    gal_ra, gal_dec = sci_true.wcs_pix2world(gal.x, gal.y, 0)
    star_ref = ref_true.wcs_world2pix(star_ra, star_dec, 0)
    gal_ref = ref_true.wcs_world2pix(gal_ra, gal_dec, 0)
    gal_angle_ref = _map_angles(gal.x, gal.y, gal.angle_deg, sci_true, ref_true)

    static_img = {}
    for name, p, (gx, gy), gangle, (sx, sy) in (
            ("sci", sci_p, (gal.x, gal.y), gal.angle_deg, (star_x, star_y)),
            ("ref", ref_p, gal_ref, gal_angle_ref, star_ref)):
        img = np.zeros(shape)
        floor = _FLOOR_SIGMA * p["sky_sigma_adu"]
        add_galaxies(img, p["psf"], gal, gx, gy, gangle, _flux(gal.mag, p["zero_point"]))
        add_point_sources(img, p["psf"], sx, sy, _flux(star_mag, p["zero_point"]), floor)
        static_img[name] = img

    # ---- real transients
    n_real = 0 if settings.clean else int(rng.poisson(settings.n_transients * area))
    real = _draw_transients(rng, settings, n_real, shape, gal, star_x, star_y, star_mag,
                            sci_p, ref_p, static_img, sci_true, ref_true, flux_ratio)

    # ---- exposures
    sci_art, ref_art = [], []
    images = {}
    for name, p, art in (("sci", sci_p, sci_art), ("ref", ref_p, ref_art)):
        expected = p["sky"] + static_img.pop(name)
        floor = _FLOOR_SIGMA * p["sky_sigma_adu"]
        xs, ys, fs = [np.zeros(0)], [np.zeros(0)], [np.zeros(0)]
        for tr in real:
            flux_here = tr["render_sci"] if name == "sci" else tr["render_ref"]
            if flux_here == 0:
                continue
            x, y = (tr["x"], tr["y"]) if name == "sci" else tr["ref_xy"]
            tx, ty = _along(x, y, tr["trail_px"], tr["trail_angle"])
            xs.append(tx)
            ys.append(ty)
            fs.append(np.full(len(tx), flux_here / len(tx)))
        add_point_sources(expected, p["psf"], np.concatenate(xs), np.concatenate(ys),
                          np.concatenate(fs), floor)
        depth = 1.0 if name == "sci" else settings.ref_cosmic_ray_fraction
        if not settings.clean:
            art.append(artefacts.add_trails(expected, rng, int(rng.poisson(settings.n_trails * area)),
                                            p["fwhm_px"], settings.trail_sample_px))
        image = _expose(rng, expected, p["gain"], p["read_noise_e"])
        if not settings.clean:
            art.append(artefacts.add_cosmic_rays(
                image, rng, int(rng.poisson(settings.n_cosmic_rays * area * depth)), p["gain"]))
            art.append(artefacts.add_hot_pixels(image, rng, int(rng.poisson(settings.n_hot_pixels * area))))
            art.append(artefacts.add_bad_columns(
                image, rng, int(rng.poisson(settings.n_bad_columns * area)), p["sky_sigma_adu"],
                settings.trail_sample_px))
        art.append(artefacts.saturate(image, settings.saturation_adu, settings.trail_sample_px))
        images[name] = image.astype(np.float32)

    pair_id = pair_id_for(settings, index)
    epochs = {}
    for name, p, wcs_true in (("sci", sci_p, sci_true), ("ref", ref_p, ref_true)):
        epochs[name] = _make_epoch(settings, pair_id, name, images[name], p, wcs_true)

    truth = _truth_table(settings, real, sci_art, ref_art, sci_true, ref_true, sci_p, ref_p,
                         flux_ratio, shape)
    static = _static_table(star_x, star_y, star_ra, star_dec, star_mag, star_ref, gal,
                           gal_ra, gal_dec, sci_p, epochs, settings, shape)
    info = _info(pair_id, index, settings, geometry, sci_p, ref_p, epochs, flux_ratio, truth,
                 static)
    return SimPair(pair_id=pair_id, ref=epochs["ref"], sci=epochs["sci"], truth=truth,
                   static=static, info=info)


def write_pair(pair_dir: str | Path, pair: SimPair, settings: SimSettings) -> list[Path]:
    """Write one pair: ``ref.fits, sci.fits, truth.csv, static.csv`` and, last, ``pair.json``
    (drawn parameters, settings hash; its presence marks the pair complete). Atomic per file."""
    from astrid.fitsio import write_image

    pair_dir = Path(pair_dir)
    pair_dir.mkdir(parents=True, exist_ok=True)
    record = provenance(_pair_settings(settings), inputs=[], seed=settings.seed)
    paths = [
        write_image(pair_dir / "ref.fits", pair.ref.data, header=pair.ref.header, provenance=record),
        write_image(pair_dir / "sci.fits", pair.sci.data, header=pair.sci.header, provenance=record),
        write_table_atomic(pair_dir / "truth.csv", pair.truth),
        write_table_atomic(pair_dir / "static.csv", pair.static),
    ]
    paths.append(write_json_atomic(pair_dir / "pair.json",
                                   {**pair.info, "settings_hash": _pair_hash(settings),
                                    "provenance": record}))
    return paths


def write_survey(out_dir: str | Path, settings: SimSettings) -> list[Path]:
    """Simulate ``settings.pairs`` pairs into ``out_dir/<pair_id>/`` plus ``out_dir/survey.json``.

    Resumable: a pair whose directory is complete for the same settings (``pair.json`` with a
    matching settings hash, and all its files) is skipped; every file is written atomically.
    Changing only ``pairs`` keeps the pairs already made.
    """
    check_settings(settings)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir}: exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    dirs, infos = [], []
    for index in track(range(settings.pairs), "simulating pairs", total=settings.pairs):
        pair_dir = out_dir / pair_id_for(settings, index)
        info = _complete_pair_info(pair_dir, settings)
        if info is None:
            pair = simulate_pair(settings, index)
            write_pair(pair_dir, pair, settings)
            info = pair.info
        dirs.append(pair_dir)
        infos.append(info)
    write_json_atomic(out_dir / "survey.json", {
        "settings": settings.model_dump(mode="json"),
        "seed": settings.seed,
        "provenance": provenance(settings, inputs=[], seed=settings.seed),
        "pair_ids": [d.name for d in dirs],
        "pairs": {i["pair_id"]: _summary(i) for i in infos},
    })
    return dirs


def check_settings(settings: SimSettings) -> None:
    """Raise ConfigError (one line) for settings that cannot make a sensible survey."""
    for name, value in settings:
        if isinstance(value, tuple) and len(value) == 2 and value[0] > value[1]:
            raise ConfigError(f"sim.{name}: low end {value[0]} is above high end {value[1]}")
    if settings.fwhm_range_px[0] < 0.8:
        raise ConfigError("sim.fwhm_range_px: a FWHM below 0.8 px cannot be rendered faithfully")
    if settings.beta_range[0] <= 1.5:
        raise ConfigError("sim.beta_range: beta must exceed 1.5 (the Moffat flux diverges)")
    if settings.snr_range[0] <= 0:
        raise ConfigError("sim.snr_range: S/N must be positive")
    unknown = set(settings.transient_mix) - set(("sn", "sn_nuclear", "sn_hostless", "variable",
                                                 "asteroid"))
    if unknown:
        raise ConfigError(f"sim.transient_mix: unknown kind {sorted(unknown)[0]!r}")
    if settings.n_transients and sum(settings.transient_mix.values()) <= 0:
        raise ConfigError("sim.transient_mix: weights must sum to a positive number")
    for name in ("gain_range", "read_noise_range_e", "galaxy_reff_range_px"):
        if getattr(settings, name)[0] <= 0:
            raise ConfigError(f"sim.{name}: must be positive")


# --------------------------------------------------------------------------------------------
# Geometry and per-epoch parameters
# --------------------------------------------------------------------------------------------

def tan_wcs(ra_deg: float, dec_deg: float, shape: tuple[int, int], scale_arcsec: float,
            rotation_deg: float, crpix_shift_px=(0.0, 0.0)) -> WCS:
    """A TAN WCS with its tangent point at the image centre, north up and east left when
    ``rotation_deg`` is 0 (rotation turns the pixel axes counter-clockwise on the sky)."""
    ny, nx = shape
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.cunit = ["deg", "deg"]
    w.wcs.radesys = "ICRS"
    w.wcs.crval = [ra_deg, dec_deg]
    w.wcs.crpix = [(nx + 1) / 2 + crpix_shift_px[0], (ny + 1) / 2 + crpix_shift_px[1]]
    s = scale_arcsec / 3600
    t = math.radians(rotation_deg)
    w.wcs.cd = [[-s * math.cos(t), s * math.sin(t)], [s * math.sin(t), s * math.cos(t)]]
    w.pixel_shape = (nx, ny)
    return w


def _draw_geometry(rng, settings: SimSettings, shape) -> dict:
    ny, nx = shape
    ra0 = rng.uniform(0, 360)
    dec0 = math.degrees(math.asin(rng.uniform(math.sin(math.radians(-30)),
                                              math.sin(math.radians(70)))))
    sci_rot = rng.uniform(-1, 1)
    rotation = rng.choice([-1, 1]) * rng.uniform(*settings.rotation_range_deg)
    offset = rng.uniform(*settings.offset_range_px)
    phi = rng.uniform(0, 2 * np.pi)
    offset_px = (offset * math.cos(phi), offset * math.sin(phi))
    sci_wcs = tan_wcs(ra0, dec0, shape, settings.pixel_scale_arcsec, sci_rot)
    # The reference points at the sky seen at science pixel (centre + offset).
    ra1, dec1 = sci_wcs.wcs_pix2world([[(nx - 1) / 2 + offset_px[0], (ny - 1) / 2 + offset_px[1]]], 0)[0]
    ref_wcs = tan_wcs(ra1, dec1, shape, settings.pixel_scale_arcsec, sci_rot + rotation)
    return {"sci_wcs": sci_wcs, "ref_wcs": ref_wcs, "ra_deg": ra0, "dec_deg": dec0,
            "ref_offset_px": offset_px, "rotation_deg": float(rotation),
            "sci_rotation_deg": float(sci_rot)}


def _draw_epoch(rng, settings: SimSettings, shape, is_reference: bool) -> dict:
    ny, nx = shape
    fwhm = rng.uniform(*settings.fwhm_range_px)
    var = settings.psf_variation
    psf = MoffatPsf(
        fwhm_px=fwhm, beta=rng.uniform(*settings.beta_range),
        ellipticity=rng.uniform(0, settings.max_ellipticity), pa_deg=rng.uniform(0, 180),
        shape=shape,
        fwhm_coeffs=tuple(rng.uniform(-var, var, 3) / 2),
        ellipticity_coeffs=tuple(rng.uniform(-1, 1, 2) * settings.max_ellipticity / 4),
        pa_coeffs_deg=tuple(rng.uniform(-15, 15, 2)),
    )
    zp = rng.uniform(*settings.zero_point_range)
    exptime = settings.exptime_s
    if is_reference:
        zp += 2.5 * math.log10(settings.ref_depth)
        exptime *= settings.ref_depth
    gain = rng.uniform(*settings.gain_range)
    read_noise = rng.uniform(*settings.read_noise_range_e)
    sky_mag = rng.uniform(*settings.sky_mag_range)
    sky_adu = 10 ** (-0.4 * (sky_mag - zp)) * settings.pixel_scale_arcsec ** 2
    gx, gy = rng.uniform(-0.5, 0.5, 2) * settings.sky_gradient
    u = ((np.arange(nx) - (nx - 1) / 2) / (nx / 2))[None, :]
    v = ((np.arange(ny) - (ny - 1) / 2) / (ny / 2))[:, None]
    # A gentle plane plus a little curvature, as moonlight and scattered light give.
    curve = rng.uniform(-0.25, 0.25) * settings.sky_gradient
    sky = sky_adu * (1 + gx * u + gy * v + curve * (u * u + v * v - 2 / 3))
    sky_sigma = math.sqrt(sky_adu * gain + read_noise ** 2) / gain
    err = rng.uniform(*settings.wcs_error_range_px)
    phi = rng.uniform(0, 2 * np.pi)
    return {"psf": psf, "fwhm_px": fwhm, "zero_point": zp, "exptime_s": exptime, "gain": gain,
            "read_noise_e": read_noise, "sky_mag": sky_mag, "sky_adu": sky_adu, "sky": sky,
            "sky_sigma_adu": sky_sigma,
            "wcs_error_px": (err * math.cos(phi), err * math.sin(phi))}


def _flux(mag, zero_point) -> np.ndarray:
    return 10 ** (-0.4 * (np.asarray(mag, float) - zero_point))


def _peak_adu(flux, psf: MoffatPsf) -> np.ndarray:
    """Peak pixel of a point source (generous: the sharpest PSF in the field, centred)."""
    sharpest = psf.fwhm_px * (1 - sum(abs(c) for c in psf.fwhm_coeffs))
    stamp = MoffatPsf(sharpest, psf.beta, psf.ellipticity, psf.pa_deg, psf.shape).stamp(
        (psf.shape[1] - 1) / 2, (psf.shape[0] - 1) / 2, 3, normalise=False)
    return np.asarray(flux) * stamp.max()


def _map_angles(x, y, angle_deg, from_wcs: WCS, to_wcs: WCS) -> np.ndarray:
    """Angles (deg, pixel frame of ``from_wcs``) at x, y as seen in the pixel frame of ``to_wcs``."""
    t = np.deg2rad(angle_deg)
    ra0, dec0 = from_wcs.wcs_pix2world(x, y, 0)
    ra1, dec1 = from_wcs.wcs_pix2world(x + np.cos(t), y + np.sin(t), 0)
    x0, y0 = to_wcs.wcs_world2pix(ra0, dec0, 0)
    x1, y1 = to_wcs.wcs_world2pix(ra1, dec1, 0)
    return np.rad2deg(np.arctan2(y1 - y0, x1 - x0))


def _expose(rng, expected_adu: np.ndarray, gain: float, read_noise_e: float) -> np.ndarray:
    """Poisson photon noise on the expected electrons plus Gaussian read noise, back in ADU."""
    electrons = rng.poisson(np.clip(expected_adu, 0, None) * gain).astype(np.float64)
    electrons += rng.normal(0.0, read_noise_e, expected_adu.shape)
    return electrons / gain


# --------------------------------------------------------------------------------------------
# Transients
# --------------------------------------------------------------------------------------------

def _draw_transients(rng, settings, n_real, shape, gal: Galaxies, star_x, star_y, star_mag,
                     sci_p, ref_p, static_img, sci_true, ref_true, flux_ratio) -> list[dict]:
    ny, nx = shape
    kinds = list(settings.transient_mix)
    weights = np.array([settings.transient_mix[k] for k in kinds], float)
    out = []
    if n_real == 0:
        return out
    lo, hi_x, hi_y = _EDGE_PX, nx - 1 - _EDGE_PX, ny - 1 - _EDGE_PX
    hosts = np.flatnonzero((gal.x > lo) & (gal.x < hi_x) & (gal.y > lo) & (gal.y < hi_y))
    ok_star = (star_x > lo) & (star_x < hi_x) & (star_y > lo) & (star_y < hi_y)
    star_peak = np.maximum(_peak_adu(_flux(star_mag, sci_p["zero_point"]), sci_p["psf"]),
                           _peak_adu(_flux(star_mag, ref_p["zero_point"]), ref_p["psf"]))
    ok_star &= star_peak < 0.3 * settings.saturation_adu  # variables must stay measurable
    used_stars: set[int] = set()
    for kind in rng.choice(kinds, size=n_real, p=weights / weights.sum()):
        kind = str(kind)
        if kind in ("sn", "sn_nuclear") and len(hosts) == 0:
            kind = "sn_hostless"
        if kind == "variable" and len(used_stars) >= np.count_nonzero(ok_star):
            kind = "sn_hostless"  # no star left to vary
        target = math.exp(rng.uniform(math.log(settings.snr_range[0]), math.log(settings.snr_range[1])))
        sign, in_science, trail_px, trail_angle = _draw_change(rng, kind, settings)
        if kind == "variable":
            x, y, base_sci, base_ref = _pick_variable(rng, star_x, star_y, star_mag, ok_star,
                                                      used_stars, sign, target, sci_p, ref_p,
                                                      static_img, sci_true, ref_true, flux_ratio,
                                                      shape)
        else:
            x, y = _place(rng, kind, hosts, gal, shape, sci_true, ref_true)
            base_sci = base_ref = 0.0
        ref_xy = tuple(float(v) for v in ref_true.wcs_world2pix(*sci_true.wcs_pix2world(x, y, 0), 0))
        noise_sci, noise_ref = _noise_at(x, y, ref_xy, sci_p, ref_p, static_img, base_sci, base_ref)
        if trail_px > 0:  # a trailed asteroid matches the point-source filter only in part
            if in_science:
                noise_sci = replace(noise_sci, source=_trailed_like(noise_sci, sci_p["psf"], x, y,
                                                                    trail_px, trail_angle))
            else:
                noise_ref = replace(noise_ref, source=_trailed_like(noise_ref, ref_p["psf"], *ref_xy,
                                                                    trail_px, trail_angle))
        delta = flux_for_snr(target, noise_sci, noise_ref, flux_ratio, base_sci, base_ref, sign,
                             in_science)
        if kind == "variable" and sign < 0 and delta > 0.9 * base_sci:
            # A star cannot fade below nothing: too faint to fade this much, so it brightens.
            sign = 1
            delta = flux_for_snr(target, noise_sci, noise_ref, flux_ratio, base_sci, base_ref,
                                 sign, in_science)
        f_sci = base_sci + sign * delta if in_science else base_sci
        f_ref = base_ref if in_science else base_ref + delta / flux_ratio
        snr = difference_snr(delta, f_sci, f_ref, noise_sci, noise_ref, flux_ratio, in_science)
        out.append({"kind": kind, "x": float(x), "y": float(y), "ref_xy": ref_xy,
                    "flux": float(delta), "snr": snr, "sign": sign,
                    "render_sci": sign * delta if in_science else 0.0,
                    "render_ref": 0.0 if in_science else delta / flux_ratio,
                    "trail_px": trail_px, "trail_angle": trail_angle})
    return out


def _draw_change(rng, kind: str, settings: SimSettings) -> tuple[int, bool, float, float]:
    """Sign, whether the change is in the science epoch, and trail length (px) and angle (deg).

    Supernovae appear in the science image, or (``fading_fraction``) were there only in the
    reference; asteroids are in one epoch only; variable stars brighten or fade.
    """
    if kind == "asteroid":
        in_science = bool(rng.random() < 0.5)
        # Main-belt motion over a minute: up to a few pixels of trailing.
        return (1 if in_science else -1), in_science, rng.uniform(0, 4), rng.uniform(0, 180)
    if kind == "variable":
        return int(rng.choice([-1, 1])), True, 0.0, 0.0
    if rng.random() < settings.fading_fraction:
        return -1, False, 0.0, 0.0
    return 1, True, 0.0, 0.0


def _place(rng, kind: str, hosts, gal: Galaxies, shape, sci_true, ref_true) -> tuple[float, float]:
    """Science-frame position of a new source: on a host (offset drawn from its light), at its
    nucleus, or anywhere; retried until it lies inside both images."""
    ny, nx = shape
    for _attempt in range(50):
        if kind == "sn":
            h = rng.choice(hosts)
            dx, dy = sample_sersic_offsets(rng, gal.r_eff_px[[h]], gal.sersic_n[[h]],
                                           gal.axis_ratio[[h]], gal.angle_deg[[h]])
            x, y = gal.x[h] + dx[0], gal.y[h] + dy[0]
        elif kind == "sn_nuclear":
            h = rng.choice(hosts)
            x, y = gal.x[h] + rng.normal(0, 0.1), gal.y[h] + rng.normal(0, 0.1)
        else:
            x, y = rng.uniform(_EDGE_PX, nx - 1 - _EDGE_PX), rng.uniform(_EDGE_PX, ny - 1 - _EDGE_PX)
        if _inside_both(x, y, shape, sci_true, ref_true):
            break
    return float(x), float(y)


def _inside_both(x, y, shape, sci_true, ref_true) -> bool:
    ny, nx = shape
    rx, ry = ref_true.wcs_world2pix(*sci_true.wcs_pix2world(x, y, 0), 0)
    return all(_EDGE_PX <= a <= n - 1 - _EDGE_PX for a, n in ((x, nx), (y, ny), (rx, nx), (ry, ny)))


def _noise_at(x, y, ref_xy, sci_p, ref_p, static_img, base_sci, base_ref) -> tuple[EpochNoise, EpochNoise]:
    """Per-epoch PSF and background variance at a position.

    The static light there (``static_img``, None for none) includes the host galaxy and any
    star. A variable star's own light is its base flux, counted as shot noise of the changing
    source, so its peak is removed from the static part.
    """
    out = []
    for name, (px, py), p, base in (("sci", (x, y), sci_p, base_sci), ("ref", ref_xy, ref_p, base_ref)):
        psf = p["psf_grid"].at(px, py)
        ny, nx = p["sky"].shape
        ix = min(max(int(np.rint(px)), 0), nx - 1)
        iy = min(max(int(np.rint(py)), 0), ny - 1)
        light = 0.0
        if static_img is not None:
            # The matched filter weights light near the centre: the mean over 3x3 pixels.
            img = static_img[name]
            light = float(np.mean(img[max(iy - 1, 0):iy + 2, max(ix - 1, 0):ix + 2]))
            light = max(light - base * float(np.max(psf)), 0.0)
        sky = float(p["sky"][iy, ix])
        var = (sky * p["gain"] + p["read_noise_e"] ** 2) / p["gain"] ** 2 + light / p["gain"]
        out.append(EpochNoise(psf=psf, background_var_adu2=var, gain=p["gain"]))
    return out[0], out[1]


def _trailed_like(noise: EpochNoise, psf: MoffatPsf, x, y, length_px, angle_deg) -> np.ndarray:
    """The trailed profile on the same grid and centring as the S/N PSF stamp of ``noise``."""
    step = _PsfGrid.step_px
    return psf.trailed_stamp(step * round(x / step), step * round(y / step), length_px,
                             angle_deg, radius_px=noise.psf.shape[0] // 2)


class _PsfGrid:
    """PSF stamps for S/N estimates on a 64-px grid of one epoch, computed on demand in
    batches: the PSF changes over hundreds of pixels, and |FFT(P)|^2 hardly depends on the
    sub-pixel phase, so the nearest grid node's stamp serves."""

    step_px = 64

    def __init__(self, psf: MoffatPsf, radius_px: int):
        self.psf, self.radius_px = psf, radius_px
        self._stamps: dict[tuple[int, int], np.ndarray] = {}

    def _keys(self, x, y) -> list[tuple[int, int]]:
        gx = np.rint(np.atleast_1d(np.asarray(x, float)) / self.step_px).astype(int)
        gy = np.rint(np.atleast_1d(np.asarray(y, float)) / self.step_px).astype(int)
        return list(zip(gx.tolist(), gy.tolist(), strict=True))

    def prefill(self, x, y) -> None:
        missing = sorted(set(self._keys(x, y)) - set(self._stamps))
        if not missing:
            return
        gx, gy = (np.array(v, float) * self.step_px for v in zip(*missing, strict=True))
        stamps = self.psf.stamps(gx, gy, self.radius_px)[0].astype(float)
        stamps /= stamps.sum(axis=(1, 2), keepdims=True)
        for key, stamp in zip(missing, stamps, strict=True):
            stamp.flags.writeable = False
            self._stamps[key] = stamp

    def at(self, x: float, y: float) -> np.ndarray:
        self.prefill(x, y)
        return self._stamps[self._keys(x, y)[0]]


def _pick_variable(rng, star_x, star_y, star_mag, ok_star, used, sign, target, sci_p, ref_p,
                   static_img, sci_true, ref_true, flux_ratio, shape):
    """A star for a variable: any for a brightening one; for a fading one, a star bright enough
    to lose the flux the target S/N needs (estimated from the sky noise alone, with margin for
    the star's own shot noise)."""
    ny, nx = shape
    base = _flux(star_mag, sci_p["zero_point"])
    pool = ok_star.copy()
    pool[list(used)] = False
    if sign < 0:
        centre = ((nx - 1) / 2, (ny - 1) / 2)
        ns, nr = _noise_at(*centre, centre, sci_p, ref_p, None, 0.0, 0.0)
        need = flux_for_snr(target, ns, nr, flux_ratio, 0.0, 0.0, 1, True)
        if np.any(pool & (base > 3 * need)):
            pool &= base > 3 * need
    candidates = rng.permutation(np.flatnonzero(pool))
    choice = next((i for i in candidates[:200]
                   if _inside_both(star_x[i], star_y[i], shape, sci_true, ref_true)), candidates[0])
    used.add(int(choice))
    base_sci = float(base[choice])
    return float(star_x[choice]), float(star_y[choice]), base_sci, base_sci / flux_ratio


def _along(x, y, length_px, angle_deg):
    """Points spread along a short trail (asteroid motion during the exposure) in an epoch."""
    if length_px <= 0:
        return np.array([x]), np.array([y])
    t = np.linspace(-0.5, 0.5, TRAIL_POINTS) * length_px
    a = math.radians(angle_deg)
    return x + t * math.cos(a), y + t * math.sin(a)


# --------------------------------------------------------------------------------------------
# Tables, headers and records
# --------------------------------------------------------------------------------------------

def _truth_table(settings, real, sci_art, ref_art, sci_true, ref_true, sci_p, ref_p,
                 flux_ratio, shape) -> pd.DataFrame:
    ny, nx = shape
    rows = []
    for tr in real:
        rows.append({"kind": tr["kind"], "x": tr["x"], "y": tr["y"], "flux": tr["flux"],
                     "snr": tr["snr"], "is_real": True, "sign": tr["sign"]})
    compact = {"cosmic_ray", "hot_pixel"}
    for art, epoch in ((sci_art, "sci"), (ref_art, "ref")):
        table = pd.concat(art, ignore_index=True) if art else artefacts.empty()
        if table.empty:
            continue
        x, y = table["x"].to_numpy(float), table["y"].to_numpy(float)
        flux = table["flux"].to_numpy(float)
        sign = table["effect"].to_numpy(float)
        if epoch == "ref":
            x, y = sci_true.wcs_world2pix(*ref_true.wcs_pix2world(x, y, 0), 0)
            flux = flux * flux_ratio
            sign = -sign
        rx, ry = ref_true.wcs_world2pix(*sci_true.wcs_pix2world(x, y, 0), 0)
        is_compact = table["kind"].isin(compact).to_numpy()
        sci_p["psf_grid"].prefill(x[is_compact], y[is_compact])
        ref_p["psf_grid"].prefill(rx[is_compact], ry[is_compact])
        for i, kind in enumerate(table["kind"]):
            snr = np.nan
            if kind in compact:
                # Sharper than any PSF: what the point-source filter makes of a one-pixel spike.
                ns, nr = _noise_at(x[i], y[i], (rx[i], ry[i]), sci_p, ref_p, None, 0.0, 0.0)
                spike = np.zeros_like(ns.psf)
                spike[spike.shape[0] // 2, spike.shape[1] // 2] = 1.0
                if epoch == "sci":
                    ns = replace(ns, source=spike)
                else:
                    nr = replace(nr, source=spike)
                snr = difference_snr(flux[i], 0.0, 0.0, ns, nr, flux_ratio, epoch == "sci")
            rows.append({"kind": kind, "x": x[i], "y": y[i], "flux": flux[i], "snr": snr,
                         "is_real": False, "sign": int(sign[i])})
    truth = pd.DataFrame(rows, columns=["kind", "x", "y", "flux", "snr", "is_real", "sign"])
    inside = (truth["x"] >= -0.5) & (truth["x"] < nx - 0.5) & (truth["y"] >= -0.5) & (truth["y"] < ny - 0.5)
    truth = truth[inside].reset_index(drop=True)
    ra, dec = sci_true.wcs_pix2world(truth["x"].to_numpy(float), truth["y"].to_numpy(float), 0)
    truth["ra"], truth["dec"] = ra, dec
    with np.errstate(divide="ignore", invalid="ignore"):
        truth["mag"] = np.where(truth["flux"] > 0,
                                sci_p["zero_point"] - 2.5 * np.log10(truth["flux"].clip(lower=1e-30)),
                                np.nan)
    truth["sign"] = truth["sign"].astype(int)
    truth["is_real"] = truth["is_real"].astype(bool)
    return truth[TRUTH_COLUMNS]


def _static_table(star_x, star_y, star_ra, star_dec, star_mag, star_ref, gal, gal_ra, gal_dec,
                  sci_p, epochs, settings, shape) -> pd.DataFrame:
    ny, nx = shape
    sat = settings.saturation_adu
    star_sat = _saturated_at(epochs["sci"].data, star_x, star_y, sat) | \
        _saturated_at(epochs["ref"].data, star_ref[0], star_ref[1], sat)
    stars = pd.DataFrame({"kind": "star", "x": star_x, "y": star_y, "ra": star_ra, "dec": star_dec,
                          "flux": _flux(star_mag, sci_p["zero_point"]), "mag": star_mag,
                          "saturated": star_sat, "r_eff_px": np.nan, "sersic_n": np.nan,
                          "axis_ratio": np.nan})
    gals = pd.DataFrame({"kind": "galaxy", "x": gal.x, "y": gal.y, "ra": gal_ra, "dec": gal_dec,
                         "flux": _flux(gal.mag, sci_p["zero_point"]), "mag": gal.mag,
                         "saturated": _saturated_at(epochs["sci"].data, gal.x, gal.y, sat),
                         "r_eff_px": gal.r_eff_px, "sersic_n": gal.sersic_n,
                         "axis_ratio": gal.axis_ratio})
    static = pd.concat([stars, gals], ignore_index=True)
    inside = (static["x"] >= -0.5) & (static["x"] < nx - 0.5) & (static["y"] >= -0.5) & (static["y"] < ny - 0.5)
    return static[inside].reset_index(drop=True)[STATIC_COLUMNS]


def _saturated_at(data, x, y, saturation_adu) -> np.ndarray:
    ny, nx = data.shape
    ix = np.clip(np.rint(np.asarray(x)).astype(int), 0, nx - 1)
    iy = np.clip(np.rint(np.asarray(y)).astype(int), 0, ny - 1)
    inside = (np.asarray(x) > -0.5) & (np.asarray(x) < nx - 0.5) & (np.asarray(y) > -0.5) & (np.asarray(y) < ny - 0.5)
    return inside & (data[iy, ix] >= saturation_adu)


def _make_epoch(settings, pair_id, name, data, p, wcs_true: WCS) -> SimEpoch:
    err = p["wcs_error_px"]
    header_wcs = wcs_true.deepcopy()
    header_wcs.wcs.crpix = wcs_true.wcs.crpix + np.asarray(err)
    header = fits.Header()
    header.update(header_wcs.to_header(relax=True))
    header.remove("MJDREF", ignore_missing=True)  # a WCS time default, not the observation
    date = Time(p["mjd"], format="mjd", scale="utc")
    for key, value, comment in (
            ("TELESCOP", settings.mission, "simulated survey"),
            ("INSTRUME", "AstrID-sim", "astrid.sim"),
            ("FILTER", settings.filter, ""),
            ("MJD-OBS", round(p["mjd"], 6), "[d] start of exposure"),
            ("DATE-OBS", date.isot, "UTC start of exposure"),
            ("EXPTIME", p["exptime_s"], "[s] exposure time"),
            ("GAIN", round(p["gain"], 5), "[e-/ADU]"),
            ("RDNOISE", round(p["read_noise_e"], 4), "[e-] read noise"),
            ("SATURATE", settings.saturation_adu, "[ADU] saturation level"),
            ("MAGZP", round(p["zero_point"], 5), "AB mag of 1 ADU in the image"),
            ("SEEING", round(p["fwhm_px"] * settings.pixel_scale_arcsec, 4), "[arcsec] PSF FWHM at centre"),
            ("FWHM", round(p["fwhm_px"], 4), "[px] PSF FWHM at centre"),
            ("SKYLEVEL", round(p["sky_adu"], 3), "[ADU] mean sky"),
            ("SKYSIG", round(p["sky_sigma_adu"], 4), "[ADU] noise of an empty pixel"),
            ("BUNIT", "adu", ""),
            ("OBJECT", pair_id, "simulated pair"),
            ("SIMEPOCH", name, "ref or sci"),
    ):
        header[key] = (value, comment)
    return SimEpoch(data=data, header=header, wcs=header_wcs, fwhm_px=p["fwhm_px"],
                    sky_sigma_adu=p["sky_sigma_adu"], true_wcs=wcs_true,
                    wcs_error_px=tuple(float(e) for e in err), psf=p["psf"],
                    sky=p["sky"].astype(np.float32), gain=p["gain"], read_noise_e=p["read_noise_e"],
                    zero_point=p["zero_point"], saturation_adu=settings.saturation_adu)


def _info(pair_id, index, settings, geometry, sci_p, ref_p, epochs, flux_ratio, truth, static) -> dict:
    def epoch(p, e: SimEpoch) -> dict:
        psf = p["psf"]
        return {"fwhm_px": psf.fwhm_px, "beta": psf.beta, "ellipticity": psf.ellipticity,
                "pa_deg": psf.pa_deg, "fwhm_coeffs": list(psf.fwhm_coeffs),
                "ellipticity_coeffs": list(psf.ellipticity_coeffs),
                "pa_coeffs_deg": list(psf.pa_coeffs_deg), "zero_point": p["zero_point"],
                "exptime_s": p["exptime_s"], "gain": p["gain"], "read_noise_e": p["read_noise_e"],
                "sky_adu": p["sky_adu"], "sky_sigma_adu": p["sky_sigma_adu"], "mjd": p["mjd"],
                "wcs_error_px": list(e.wcs_error_px),
                "true_crpix": list(e.true_wcs.wcs.crpix), "true_crval": list(e.true_wcs.wcs.crval),
                "true_cd": e.true_wcs.wcs.cd.tolist()}

    return {
        "pair_id": pair_id, "index": index, "size_px": settings.size_px,
        "ra_deg": geometry["ra_deg"], "dec_deg": geometry["dec_deg"],
        "ref_offset_px": list(geometry["ref_offset_px"]), "rotation_deg": geometry["rotation_deg"],
        "flux_ratio": flux_ratio, "clean": settings.clean,
        "sci": epoch(sci_p, epochs["sci"]), "ref": epoch(ref_p, epochs["ref"]),
        "n_truth": {k: int(v) for k, v in truth["kind"].value_counts().items()},
        "n_static": {k: int(v) for k, v in static["kind"].value_counts().items()},
        "n_saturated_stars": int(static["saturated"].sum()),
    }


def _summary(info: dict) -> dict:
    keys = ("ref_offset_px", "rotation_deg", "flux_ratio", "n_truth", "n_saturated_stars")
    out = {k: info[k] for k in keys if k in info}
    for epoch in ("ref", "sci"):
        if epoch in info:
            out[epoch] = {k: info[epoch][k] for k in ("fwhm_px", "zero_point", "sky_sigma_adu",
                                                       "wcs_error_px", "mjd")}
    return out


def _pair_settings(settings: SimSettings) -> dict:
    """The settings that shape a pair: all but the number of pairs."""
    return settings.model_dump(mode="json", exclude={"pairs"})


def _pair_hash(settings: SimSettings) -> str:
    return config_hash(_pair_settings(settings))


def _complete_pair_info(pair_dir: Path, settings: SimSettings) -> dict | None:
    """The pair's recorded info if it was completely written with these settings, else None."""
    import json

    marker = pair_dir / "pair.json"
    if not marker.exists() or not all((pair_dir / f).exists() for f in PAIR_FILES):
        return None
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return info if info.get("settings_hash") == _pair_hash(settings) else None
