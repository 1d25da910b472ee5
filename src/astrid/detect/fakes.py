"""Fake point-source injection: how complete is detection, versus S/N and magnitude?

Point sources shaped by the science image's own measured PSF (per tile, shifted to their
sub-pixel positions in Fourier space, with their Poisson noise) are added to the science image
on blank sky, on galaxies and near galaxy nuclei, over a grid of expected S/N (or magnitude).
Differencing (``diff.method``: ZOGY by default, or the Gaussian baseline) and detection then run
again exactly as on the real pair; a fake is
recovered when a positive candidate lies within ``recover_radius_px`` of it. Fakes are kept
``min_separation_px`` from each other and from the pair's own candidates, so a round holds as
many as the image has room for, and rounds repeat until every fake has been injected.

The expected S/N of a fake of flux F at (x, y) is ``F / flux_err(x, y)``, with ``flux_err`` the
PSF-flux error of the difference there (ZOGY's, which includes the noise of the host galaxy).
Detection thresholds S_corr, which has unit noise, so a correct pipeline is 50% complete at an
expected S/N equal to the threshold, with a width of about 1 (the noise).

Completeness curves are fitted by maximum likelihood with ``plateau * Phi((s - s0) / width)``
(Phi the normal CDF; magnitudes mirror it); the 50% point's error comes from the likelihood's
curvature.
The recovered fakes also yield realistic "real" triplets (label source ``fake``), as survey
pipelines use them for training.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import ndimage, optimize, special

from astrid.errors import AstridError
from astrid.fitsio import Image, read_image
from astrid.progress import track

if TYPE_CHECKING:
    from astrid.config import Settings

HOSTS: tuple[str, ...] = ("blank", "galaxy", "nuclear")


@dataclass(frozen=True)
class CompletenessFit:
    """Maximum-likelihood fit of ``plateau * Phi(±(x - centre) / width)`` to detections.

    ``x50`` is where the fitted completeness is 0.5 (NaN if it never reaches 0.5), with its
    standard error ``x50_err`` (inverse Hessian of the likelihood, delta method). ``variable`` is "snr" (completeness rises with x)
    or "mag" (falls with x).
    """

    variable: str
    x50: float
    x50_err: float
    centre: float
    width: float
    plateau: float
    n: int

    def predict(self, x) -> np.ndarray:
        z = (np.asarray(x, float) - self.centre) / self.width
        return self.plateau * special.ndtr(z if self.variable == "snr" else -z)


@dataclass(frozen=True)
class FakeResult:
    """Outcome of :func:`run_fakes`.

    Attributes
    ----------
    fakes : one row per fake: ``round, x, y, host, level, flux_adu, mag, snr_expected,
        detected, snr_measured, dist_px``.
    by_snr : completeness per expected-S/N bin (``lo, hi, snr, n, n_detected, completeness,
        err_lo, err_hi``; Wilson 68% interval), also per host (``host`` column, "all" for all).
    by_mag : the same per magnitude level (None without a zero point).
    fit_snr, fit_mag : fitted curves (``fit_mag`` None without a zero point).
    threshold_sigma : the detection threshold on S_corr.
    stamps : (N, 3, S, S) triplets of the recovered fakes, cut at their detections.
    meta : N rows of dataset metadata (label 1, label source "fake", kind ``fake_<host>``).
    quality : baseline difference quality plus ``psf_fwhm_px``, ``n_rounds``, ``elapsed_s``.
    """

    fakes: pd.DataFrame
    by_snr: pd.DataFrame
    by_mag: pd.DataFrame | None
    fit_snr: CompletenessFit
    fit_mag: CompletenessFit | None
    threshold_sigma: float
    stamps: np.ndarray
    meta: pd.DataFrame
    quality: dict

    def summary(self) -> str:
        """A few lines for a terminal."""
        f = self.fit_snr
        lines = [f"{len(self.fakes)} fakes in {self.quality.get('n_rounds', '?')} rounds, "
                 f"{int(self.fakes['detected'].sum())} recovered; detection threshold "
                 f"{self.threshold_sigma:g} sigma",
                 f"50% completeness at S/N {f.x50:.2f} ± {f.x50_err:.2f} (width {f.width:.2f}, "
                 f"plateau {f.plateau:.3f})"]
        if self.fit_mag is not None:
            lines.append(f"50% completeness at mag {self.fit_mag.x50:.2f} ± {self.fit_mag.x50_err:.2f}")
        bright = self.fakes[self.fakes["snr_expected"] >= 8]
        if len(bright):
            lines.append(f"completeness at S/N >= 8: {bright['detected'].mean():.3f} (n={len(bright)})")
        for host in HOSTS:
            part = self.fakes[self.fakes["host"] == host]
            if len(part):
                lines.append(f"  {host:<8} n={len(part):<5} recovered {part['detected'].mean():.3f}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Curves
# --------------------------------------------------------------------------------------------

def wilson_interval(k: np.ndarray, n: np.ndarray, z: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a binomial fraction k/n (z=1: 68%)."""
    k, n = np.asarray(k, float), np.asarray(n, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return np.clip(centre - half, 0, p), np.clip(centre + half, p, 1)


def completeness_table(values: np.ndarray, detected: np.ndarray, edges: np.ndarray) -> pd.DataFrame:
    """Completeness in bins of ``values`` (bins ``[edges[i], edges[i+1])``), empty bins dropped."""
    values, detected = np.asarray(values, float), np.asarray(detected, bool)
    index = np.digitize(values, edges) - 1
    rows = []
    for i in range(len(edges) - 1):
        sel = index == i
        if not sel.any():
            continue
        n, k = int(sel.sum()), int(detected[sel].sum())
        lo, hi = wilson_interval(k, n)
        rows.append({"lo": edges[i], "hi": edges[i + 1], "value": float(np.median(values[sel])),
                     "n": n, "n_detected": k, "completeness": k / n,
                     "err_lo": float(lo), "err_hi": float(hi)})
    return pd.DataFrame(rows, columns=["lo", "hi", "value", "n", "n_detected", "completeness",
                                       "err_lo", "err_hi"])


def _curve_nll(x: np.ndarray, detected: np.ndarray, rising: bool):
    """Negative log-likelihood of per-fake detections under the curve, in free parameters
    (centre, log width, logit of (2 plateau - 1)) so the optimiser needs no bounds."""
    sign = 1.0 if rising else -1.0

    def nll(params):
        centre, log_width, logit_plateau = params
        plateau = 0.5 + 0.5 * special.expit(logit_plateau)
        p = plateau * special.ndtr(sign * (x - centre) / np.exp(log_width))
        p = np.clip(p, 1e-9, 1 - 1e-9)
        return -np.sum(np.where(detected, np.log(p), np.log1p(-p)))

    return nll


def _x50(params, rising: bool) -> float:
    """Where ``plateau * Phi(±(x - centre) / width)`` equals 0.5, from free parameters."""
    centre, log_width, logit_plateau = params
    plateau = 0.5 + 0.5 * special.expit(logit_plateau)
    z = special.ndtri(min(0.5 / plateau, 1.0))
    return float(centre + np.exp(log_width) * z if rising else centre - np.exp(log_width) * z)


def _numeric_hessian(f, p: np.ndarray, step: np.ndarray) -> np.ndarray:
    n = len(p)
    h = np.empty((n, n))
    for i in range(n):
        for j in range(i, n):
            ei, ej = np.eye(n)[i] * step[i], np.eye(n)[j] * step[j]
            h[i, j] = h[j, i] = (f(p + ei + ej) - f(p + ei - ej) - f(p - ei + ej)
                                 + f(p - ei - ej)) / (4 * step[i] * step[j])
    return h


def fit_completeness(x, detected, variable: str = "snr") -> CompletenessFit:
    """Fit ``plateau * Phi(±(x - centre) / width)`` to per-fake detections (max likelihood).

    The error of the 50% point comes from the inverse Hessian of the likelihood (delta
    method), which needs no resampling.

    Parameters
    ----------
    x : (N,) expected S/N (``variable="snr"``, completeness rising) or magnitude ("mag").
    detected : (N,) bool.
    """
    x, detected = np.asarray(x, float), np.asarray(detected, bool)
    ok = np.isfinite(x)
    x, detected = x[ok], detected[ok]
    if len(x) < 5:
        raise AstridError(f"too few fakes ({len(x)}) to fit a completeness curve")
    rising = variable == "snr"
    nll = _curve_nll(x, detected, rising)
    # Start where a running mean of the sorted detections crosses 50%.
    order = np.argsort(x)
    running = np.convolve(detected[order].astype(float), np.ones(9) / 9, mode="same")
    start = (float(x[order][np.argmin(np.abs(running - 0.5))]),
             np.log(max(float(np.std(x)) / 4, 1e-2)), 4.0)
    best = optimize.minimize(nll, start, method="Nelder-Mead",
                             options={"xatol": 1e-5, "fatol": 1e-7, "maxiter": 4000}).x
    width = float(np.exp(best[1]))
    step = np.array([0.05 * width, 0.05, 0.05])
    cov = np.linalg.pinv(_numeric_hessian(nll, best, step))
    grad = np.array([(_x50(best + e, rising) - _x50(best - e, rising)) / (2 * e.max())
                     for e in np.eye(3) * step])
    err = float(np.sqrt(max(grad @ cov @ grad, 0.0)))
    plateau = float(0.5 + 0.5 * special.expit(best[2]))
    return CompletenessFit(variable, _x50(best, rising), err, float(best[0]), width, plateau,
                           int(len(x)))


# --------------------------------------------------------------------------------------------
# Placement and injection
# --------------------------------------------------------------------------------------------

def half_light_radius_px(stamp: np.ndarray, rmax_px: float | None = None) -> float:
    """Radius (px) holding half the flux within ``rmax_px`` of a centred stamp (e.g. a PSF)."""
    size = stamp.shape[-1]
    yy, xx = np.mgrid[:size, :size] - size // 2
    r = np.hypot(xx, yy).ravel()
    inside = r <= (rmax_px if rmax_px is not None else np.inf)
    order = np.argsort(r[inside])
    r = r[inside]
    cumulative = np.cumsum(np.asarray(stamp, float).ravel()[inside][order])
    return float(np.interp(0.5 * cumulative[-1], cumulative, r[order]))


def find_galaxies(data_bkgsub: np.ndarray, rms: np.ndarray, mask: np.ndarray, psf_stamp: np.ndarray,
                  *, snr_min: float = 5.0, extent: float = 1.3) -> pd.DataFrame:
    """Extended sources (galaxies) in a background-subtracted image, with sep.

    A source counts as a galaxy when its half-light radius (of the light within a fixed
    aperture of half the PSF stamp) exceeds ``extent`` times the PSF's in the same aperture
    (so stars of any brightness are excluded without a stellar-locus fit), it is detected at
    S/N >= ``snr_min`` and has no bad or saturated pixel near its centre.

    Returns
    -------
    DataFrame with ``x, y`` (0-based px), ``a, b`` (px, 1-sigma axes), ``theta`` (rad),
    ``r50_px`` (half-light radius).
    """
    import sep

    from astrid.diff.background import sep_array
    from astrid.diff.stars import sep_extract

    columns = ["x", "y", "a", "b", "theta", "r50_px"]
    bad = mask | ~np.isfinite(data_bkgsub)
    data = sep_array(np.where(bad, 0, data_bkgsub))
    err = sep_array(np.array(np.broadcast_to(rms, data.shape)))  # sep needs a writable buffer
    try:
        objects = sep_extract(data, 3.0, err=err, mask=bad, minarea=9)
    except AstridError as exc:
        raise AstridError(f"source extraction for galaxy hosts failed ({exc})") from None
    if len(objects) == 0:
        return pd.DataFrame(columns=columns)
    rmax_px = float(psf_stamp.shape[-1] // 2)
    r50, _ = sep.flux_radius(data, objects["x"], objects["y"], np.full(len(objects), rmax_px), 0.5,
                             subpix=5)
    flux_err = np.sqrt(np.maximum(objects["npix"], 1)) * float(np.nanmedian(rms))
    near_bad = ndimage.binary_dilation(bad, iterations=3)
    ix = np.clip(np.rint(objects["x"]).astype(int), 0, data.shape[1] - 1)
    iy = np.clip(np.rint(objects["y"]).astype(int), 0, data.shape[0] - 1)
    galaxy = ((r50 > extent * half_light_radius_px(psf_stamp, rmax_px))
              & (objects["flux"] / flux_err >= snr_min)
              & ((objects["flag"] & sep.OBJ_TRUNC) == 0) & ~near_bad[iy, ix])
    table = pd.DataFrame({name: objects[name][galaxy] for name in ("x", "y", "a", "b", "theta")})
    table["r50_px"] = r50[galaxy]
    return table.reset_index(drop=True)[columns]


def _host_position(rng, host: str, galaxy: pd.Series, fwhm_px: float) -> tuple[float, float]:
    """A position on a galaxy: within half a FWHM of its centre ("nuclear"), or in its light
    between 1 FWHM and 2 sigma-ellipses out ("galaxy")."""
    phi = rng.uniform(0, 2 * np.pi)
    if host == "nuclear":
        r = 0.5 * fwhm_px * np.sqrt(rng.uniform())
        return galaxy["x"] + r * np.cos(phi), galaxy["y"] + r * np.sin(phi)
    u = rng.uniform(1.0, 2.0)
    ex, ey = u * galaxy["a"] * np.cos(phi), u * galaxy["b"] * np.sin(phi)
    ct, st = np.cos(galaxy["theta"]), np.sin(galaxy["theta"])
    dx, dy = ex * ct - ey * st, ex * st + ey * ct
    r = np.hypot(dx, dy)
    if r < fwhm_px:  # keep it off the nucleus: that is the "nuclear" case
        dx, dy = dx * fwhm_px / max(r, 1e-6), dy * fwhm_px / max(r, 1e-6)
    return galaxy["x"] + dx, galaxy["y"] + dy


def inject_point_sources(data: np.ndarray, psf_model, x, y, flux_adu, *, gain: float | None = None,
                         rng: np.random.Generator | None = None) -> np.ndarray:
    """A copy of ``data`` with PSF-shaped point sources added.

    Parameters
    ----------
    data : (H, W) image in ADU (NaN at bad pixels stay NaN).
    psf_model : :class:`astrid.diff.psf.PSFModel` of this image (the tile PSF at each position
        is used), or one (S, S) stamp summing to 1.
    x, y : (N,) 0-based positions in px (sub-pixel).
    flux_adu : (N,) total fluxes in ADU.
    gain : e-/ADU; with ``rng``, each source's Poisson noise is added.
    """
    from astrid.diff.psf import fourier_shift, psf_at

    out = np.array(data, dtype=np.float32, copy=True)
    x, y, flux_adu = (np.atleast_1d(np.asarray(v, float)) for v in (x, y, flux_adu))
    if len(x) == 0:
        return out
    if isinstance(psf_model, np.ndarray):
        stamps = np.repeat(psf_model[None].astype(np.float32), len(x), axis=0)
    else:
        stamps = np.stack([psf_at(psf_model, xi, yi) for xi, yi in zip(x, y, strict=True)])
    ix, iy = np.floor(x + 0.5).astype(int), np.floor(y + 0.5).astype(int)
    stamps = fourier_shift(stamps, x - ix, y - iy) * flux_adu[:, None, None].astype(np.float32)
    if gain is not None and rng is not None:
        stamps = stamps + rng.normal(0, 1, stamps.shape).astype(np.float32) * np.sqrt(
            np.maximum(stamps, 0) / gain).astype(np.float32)
    half = stamps.shape[-1] // 2
    ny, nx = out.shape
    for k in range(len(x)):
        y0, y1 = max(iy[k] - half, 0), min(iy[k] + half + 1, ny)
        x0, x1 = max(ix[k] - half, 0), min(ix[k] + half + 1, nx)
        if y0 >= y1 or x0 >= x1:
            continue
        out[y0:y1, x0:x1] += stamps[k, y0 - iy[k] + half:y1 - iy[k] + half,
                                    x0 - ix[k] + half:x1 - ix[k] + half]
    return out


def _levels(settings, zero_point: float | None) -> tuple[str, np.ndarray]:
    if settings.grid == "mag":
        if zero_point is None:
            raise AstridError("fakes.grid is 'mag' but the science image has no zero point "
                              "(MAGZP); use fakes.grid: snr")
        if settings.mag_max <= settings.mag_min:
            raise AstridError("fakes.mag_max must exceed fakes.mag_min")
        return "mag", np.arange(settings.mag_min, settings.mag_max + 1e-9, settings.mag_step)
    if settings.snr_max <= settings.snr_min:
        raise AstridError("fakes.snr_max must exceed fakes.snr_min")
    return "snr", np.geomspace(settings.snr_min, settings.snr_max, settings.n_levels)


def _as_image(value) -> Image:
    if isinstance(value, Image):
        return value
    if isinstance(value, (str, Path)):
        return read_image(value)
    raise TypeError("run_fakes needs fitsio.Image objects or paths (the science pixels are "
                    "modified, so its metadata and mask must travel with it)")


# --------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------

def run_fakes(reference, science, settings: Settings | None = None, *,
              pair_id: str | None = None) -> FakeResult:
    """Inject fakes into ``science``, difference against ``reference``, measure completeness.

    Parameters
    ----------
    reference, science : :class:`astrid.fitsio.Image` or paths.
    settings : full settings (``fakes``, ``diff``, ``detect``, ``stamps`` sections are used).
    pair_id : id for the fakes' triplets (default: the science file's stem).

    Returns
    -------
    FakeResult
    """
    from astrid.config import Settings
    from astrid.detect.stamps import cut_triplets
    from astrid.diff.background import estimate_background
    from astrid.diff.high_level import difference
    from astrid.diff.psf import measure_psf

    start_s = time.perf_counter()
    settings = settings or Settings()
    fset = settings.fakes
    reference, science = _as_image(reference), _as_image(science)
    pair_id = pair_id or (Path(science.path).stem.removesuffix(".fits") if science.path else "pair")
    rng = np.random.default_rng(fset.seed)
    zero_point = science.meta.zero_point
    grid, levels = _levels(fset, zero_point)

    base, base_cands = difference(reference, science, diff_settings=settings.diff,
                                  detect_settings=settings.detect)
    background = estimate_background(science.data, science.mask)
    sci_bkgsub = science.data - background.level
    fwhm_guess = float(base.quality.get("fwhm_sci") or 3.0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zogy has just warned about this image's PSF
            psf_model = measure_psf(sci_bkgsub, background.rms, science.mask,
                                    size_px=settings.diff.psf_size_px,
                                    tile_px=settings.diff.tile_px,
                                    saturation=science.meta.saturation)
        fwhm_px = float(psf_model.fwhm_px)
    except AstridError:
        psf_model, fwhm_px = np.asarray(base.psf_sci, np.float32), fwhm_guess
    central_psf = psf_model if isinstance(psf_model, np.ndarray) else psf_model.central
    galaxies = find_galaxies(sci_bkgsub, background.rms, science.mask, central_psf)

    # Where fakes may go: well inside the image, on unmasked pixels, away from the pair's own
    # candidates (else recovery is ambiguous).
    ny, nx = science.data.shape
    margin = max(settings.detect.edge_px, settings.diff.psf_size_px // 2) + 2
    usable = (base.mask == 0) & np.isfinite(base.flux_err) & (base.flux_err > 0)
    usable[:margin], usable[-margin:], usable[:, :margin], usable[:, -margin:] = False, False, False, False
    usable = ndimage.binary_erosion(usable, iterations=2)
    blank = usable & ~ndimage.binary_dilation(background.source_mask, iterations=int(np.ceil(fwhm_px)))
    blank_pool = np.flatnonzero(blank)
    avoid_xy = base_cands[["x", "y"]].to_numpy(float) if len(base_cands) else np.zeros((0, 2))

    n_total = len(levels) * fset.per_level
    hosts_p = np.asarray(fset.hosts, float) / np.sum(fset.hosts)
    todo = pd.DataFrame({"level": np.repeat(levels, fset.per_level),
                         "host": rng.choice(HOSTS, size=n_total, p=hosts_p)})
    todo["host_requested"] = todo["host"]
    if len(blank_pool) == 0 and len(galaxies) == 0:
        raise AstridError(f"{science.path}: no usable position for fakes (image masked or too small)")
    todo = todo.sample(frac=1.0, random_state=rng.integers(2**31)).reset_index(drop=True)

    records, stamp_parts, meta_parts = [], [], []
    pending = todo
    n_rounds = 0
    for _ in track(range(fset.max_rounds), "fake injection rounds"):
        if len(pending) == 0:
            break
        pending = _reassign_hosts(rng, pending, len(galaxies), fset.max_rounds - n_rounds)
        placed = _place_round(rng, pending, blank_pool, galaxies, usable, avoid_xy,
                              fset.min_separation_px, fwhm_px, (ny, nx))
        if not placed:
            break
        n_rounds += 1
        rows = pending.loc[[p[0] for p in placed]].copy()
        rows["x"] = [p[1] for p in placed]
        rows["y"] = [p[2] for p in placed]
        flux_err = base.flux_err[np.floor(rows["y"] + 0.5).astype(int), np.floor(rows["x"] + 0.5).astype(int)]
        if grid == "snr":
            rows["flux_adu"] = rows["level"] * flux_err
        else:
            rows["flux_adu"] = 10 ** (-0.4 * (rows["level"] - zero_point))
        rows["snr_expected"] = rows["flux_adu"] / flux_err
        rows["mag"] = (zero_point - 2.5 * np.log10(rows["flux_adu"])) if zero_point is not None else np.nan
        rows["round"] = n_rounds
        data = inject_point_sources(science.data, psf_model, rows["x"], rows["y"], rows["flux_adu"],
                                    gain=science.meta.gain, rng=rng)
        with warnings.catch_warnings():
            # The baseline run already reported this pair's warnings; rounds repeat them.
            warnings.simplefilter("ignore")
            result, cands = difference(reference, dataclasses.replace(science, data=data),
                                       diff_settings=settings.diff,
                                       detect_settings=settings.detect)
        pos = cands[cands["sign"] > 0]
        _match(rows, pos, fset.recover_radius_px)
        for key in ("flux_ratio", "noise_ratio", "alignment_n_matched", "fwhm_sci"):
            rows[f"round_{key}"] = float(result.quality.get(key, np.nan) or np.nan)
        _check_round(n_rounds, len(rows), base.quality, result.quality)
        records.append(rows)
        hit = rows[rows["detected"]]
        if len(hit):
            cx = pos["x"].to_numpy(float)[hit["cand_index"].to_numpy(int)]
            cy = pos["y"].to_numpy(float)[hit["cand_index"].to_numpy(int)]
            stamps, edge = cut_triplets(result.sci, result.ref, result.diff, cx, cy,
                                        settings.stamps.size_px)
            stamp_parts.append(stamps)
            meta_parts.append(_fake_meta(hit, cx, cy, edge, pos, result, science, pair_id))
        pending = pending.drop(index=rows.index)

    fakes = pd.concat(records, ignore_index=True) if records else pd.DataFrame()
    if len(fakes) == 0:
        raise AstridError(f"{science.path}: could not place any fake")
    fakes = fakes.drop(columns=["cand_index"])
    by_snr, fit_snr = _curves(fakes, "snr_expected", "snr")
    by_mag, fit_mag = (None, None)
    if zero_point is not None:
        by_mag, fit_mag = _curves(fakes, "mag", "mag")
    stamps = (np.concatenate(stamp_parts) if stamp_parts
              else np.zeros((0, 3, settings.stamps.size_px, settings.stamps.size_px), np.float32))
    meta = pd.concat(meta_parts, ignore_index=True) if meta_parts else pd.DataFrame()
    quality = {k: v for k, v in (base.quality or {}).items() if np.isscalar(v)}
    quality.update({"psf_fwhm_px": fwhm_px, "n_galaxies": int(len(galaxies)),
                    "n_rounds": n_rounds, "n_fakes": int(len(fakes)),
                    "n_not_placed": int(len(pending)), "grid": grid,
                    "baseline_candidates": int(len(base_cands)),
                    "elapsed_s": time.perf_counter() - start_s})
    return FakeResult(fakes, by_snr, by_mag, fit_snr, fit_mag, settings.detect.threshold_sigma,
                      stamps, meta, quality)


def _place_round(rng, pending: pd.DataFrame, blank_pool: np.ndarray, galaxies: pd.DataFrame,
                 usable: np.ndarray, avoid_xy: np.ndarray, min_sep_px: float, fwhm_px: float,
                 shape: tuple[int, int]) -> list[tuple[int, float, float]]:
    """Positions for as many pending fakes as fit this round: (row index, x, y)."""
    ny, nx = shape
    taken_arr = np.asarray(avoid_xy, float).reshape(-1, 2)
    placed: list[tuple[int, float, float]] = []
    # A host type is full for this round after this many failed placements in a row.
    misses = {host: 0 for host in HOSTS}
    max_misses = 25

    def fits(x, y) -> bool:
        ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
        if not (0 <= ix < nx and 0 <= iy < ny) or not usable[iy, ix]:
            return False
        if len(taken_arr) and np.min(np.hypot(taken_arr[:, 0] - x, taken_arr[:, 1] - y)) < min_sep_px:
            return False
        return True

    for index, host in zip(pending.index, pending["host"], strict=True):
        if misses[host] >= max_misses:
            continue
        pos = None
        if host == "blank":
            for _ in range(20 if len(blank_pool) else 0):
                flat = blank_pool[rng.integers(len(blank_pool))]
                x = flat % nx + rng.uniform(-0.5, 0.5)
                y = flat // nx + rng.uniform(-0.5, 0.5)
                if fits(x, y):
                    pos = (x, y)
                    break
        else:
            # Galaxies in random order; a large one may take several fakes, min_sep_px apart.
            for g in rng.permutation(len(galaxies))[:50]:
                x, y = _host_position(rng, host, galaxies.iloc[g], fwhm_px)
                if fits(x, y):
                    pos = (x, y)
                    break
        if pos is None:
            misses[host] += 1
            if all(m >= max_misses for m in misses.values()):
                break
            continue
        misses[host] = 0
        placed.append((index, *pos))
        taken_arr = np.vstack([taken_arr, pos])
    return placed


def _check_round(n_round: int, n_fakes: int, base: dict, now: dict) -> None:
    """Warn when a round's fakes changed the pair's calibration (too many fakes for the
    image's stars): its completeness then measures the disturbance, not the detector."""
    def value(q, key):
        v = q.get(key)
        return float(v) if v is not None and np.isfinite(v) else np.nan

    ratio_change = abs(value(now, "flux_ratio") / value(base, "flux_ratio") - 1)
    matched_base, matched_now = value(base, "alignment_n_matched"), value(now, "alignment_n_matched")
    if ratio_change > 0.05 or matched_now < 0.5 * matched_base:
        warnings.warn(f"fake round {n_round}: {n_fakes} fakes changed the difference calibration "
                      f"(flux ratio {value(base, 'flux_ratio'):.3f} -> {value(now, 'flux_ratio'):.3f}, "
                      f"matched stars {matched_base:.0f} -> {matched_now:.0f}); raise "
                      "fakes.min_separation_px to inject fewer per round",
                      stacklevel=3)


def _reassign_hosts(rng, pending: pd.DataFrame, n_galaxies: int, rounds_left: int) -> pd.DataFrame:
    """Move galaxy-hosted fakes to blank sky when the galaxies cannot take them all in the
    rounds left (counting two fakes per galaxy per round); ``host_requested`` keeps the
    original choice."""
    hosted = np.flatnonzero(pending["host"].isin(("galaxy", "nuclear")).to_numpy())
    capacity = 2 * n_galaxies * max(rounds_left, 0)
    if len(hosted) <= capacity:
        return pending
    pending = pending.copy()
    hosts = pending["host"].to_numpy()
    for host in ("galaxy", "nuclear"):
        # Keep the requested mix between the two galaxy placements.
        rows = np.flatnonzero(hosts == host)
        keep = int(round(capacity * len(rows) / len(hosted)))
        if len(rows) > keep:
            move = rng.choice(rows, size=len(rows) - keep, replace=False)
            pending.iloc[move, pending.columns.get_loc("host")] = "blank"
    return pending


def _match(rows: pd.DataFrame, cands: pd.DataFrame, radius_px: float) -> None:
    """Mark each fake recovered by its nearest positive candidate within ``radius_px``."""
    from scipy.spatial import cKDTree

    rows["detected"] = False
    rows["snr_measured"] = np.nan
    rows["dist_px"] = np.nan
    rows["cand_index"] = -1
    if len(cands) == 0:
        return
    tree = cKDTree(cands[["x", "y"]].to_numpy(float))
    dist, index = tree.query(rows[["x", "y"]].to_numpy(float), distance_upper_bound=radius_px)
    hit = np.isfinite(dist)
    rows.loc[hit, "detected"] = True
    rows.loc[hit, "dist_px"] = dist[hit]
    rows.loc[hit, "cand_index"] = index[hit]
    rows.loc[hit, "snr_measured"] = cands["snr"].to_numpy(float)[index[hit]]


def _fake_meta(hit, cx, cy, edge, cands, result, science: Image, pair_id: str) -> pd.DataFrame:
    header = science.header
    ra = dec = np.full(len(cx), np.nan)
    if result.wcs is not None:
        ra, dec = result.wcs.all_pix2world(cx, cy, 0)
    return pd.DataFrame({
        "triplet_id": [f"{pair_id}/fake-r{r:03d}-{i:05d}" for r, i in zip(hit["round"], hit.index,
                                                                           strict=True)],
        "pair_id": pair_id, "field": str(header.get("FIELD", header.get("OBJECT", "")) or pair_id),
        "mission": science.meta.telescope or "", "filter": science.meta.filter or "",
        "mjd": science.meta.mjd if science.meta.mjd is not None else np.nan,
        "x": cx, "y": cy, "ra": ra, "dec": dec,
        "snr": cands["snr"].to_numpy(float)[hit["cand_index"].to_numpy(int)], "sign": 1,
        "label": 1, "label_source": "fake", "kind": "fake_" + hit["host"].to_numpy(object),
        "edge": edge, "fake_x": hit["x"].to_numpy(float), "fake_y": hit["y"].to_numpy(float),
        "fake_flux_adu": hit["flux_adu"].to_numpy(float),
        "fake_snr_expected": hit["snr_expected"].to_numpy(float),
    })


def _curves(fakes: pd.DataFrame, column: str, variable: str):
    values = fakes[column].to_numpy(float)
    finite = values[np.isfinite(values)]
    if variable == "snr":
        # Bins around the levels (geometric midpoints) so each level is its own bin.
        levels = np.unique(np.round(finite, 6))
        if len(levels) > 40:
            levels = np.geomspace(finite.min(), finite.max(), 20)
        mids = np.sqrt(levels[1:] * levels[:-1])
        edges = np.concatenate([[levels[0] / 1.5], mids, [levels[-1] * 1.5]])
    else:
        step = 0.5
        edges = np.arange(np.floor(finite.min() / step) * step - step / 2,
                          finite.max() + step, step)
    tables = []
    for host in ("all", *HOSTS):
        sel = np.ones(len(fakes), bool) if host == "all" else (fakes["host"] == host).to_numpy()
        if sel.any():
            t = completeness_table(values[sel], fakes["detected"].to_numpy(bool)[sel], edges)
            t.insert(0, "host", host)
            tables.append(t)
    table = pd.concat(tables, ignore_index=True)
    table = table.rename(columns={"value": variable})
    return table, fit_completeness(values, fakes["detected"].to_numpy(bool), variable)


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------

def plot_completeness(result: FakeResult, png: str | Path, title: str = "") -> Path:
    """PNG of completeness vs expected S/N (and vs magnitude), per host, with the fitted curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from astrid.provenance import atomic_path

    panels = [("snr", result.by_snr, result.fit_snr)]
    if result.by_mag is not None:
        panels.append(("mag", result.by_mag, result.fit_mag))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    colours = {"all": "black", "blank": "tab:blue", "galaxy": "tab:orange", "nuclear": "tab:red"}
    for ax, (variable, table, fit) in zip(axes[0], panels, strict=True):
        for host, part in table.groupby("host", sort=False):
            if host != "all" and part["n"].sum() < 5 * len(part):
                continue  # too few fakes on this host type for a readable curve
            ax.errorbar(part[variable], part["completeness"],
                        yerr=[(part["completeness"] - part["err_lo"]).clip(lower=0),
                              (part["err_hi"] - part["completeness"]).clip(lower=0)],
                        fmt="o" if host == "all" else ".", ms=5 if host == "all" else 3,
                        color=colours.get(host, "grey"), alpha=1 if host == "all" else 0.6,
                        label=f"{host} ({int(part['n'].sum())})", capsize=0, lw=1)
        grid = np.linspace(table[variable].min(), table[variable].max(), 300)
        if variable == "snr":
            grid = np.geomspace(max(table[variable].min(), 1e-2), table[variable].max(), 300)
            ax.set_xscale("log")
            ticks = [t for t in (1, 2, 3, 5, 8, 10, 20, 30, 50, 100)
                     if grid[0] <= t <= grid[-1] * 1.01]
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.axvline(result.threshold_sigma, color="grey", ls=":", lw=1,
                       label=f"threshold {result.threshold_sigma:g}σ")
            ax.set_xlabel("expected S/N in the difference")
        else:
            ax.set_xlabel("magnitude (AB, science zero point)")
        ax.plot(grid, fit.predict(grid), color="black", lw=1.2,
                label=f"fit: 50% at {fit.x50:.2f} ± {fit.x50_err:.2f}")
        ax.axhline(0.5, color="grey", lw=0.5)
        ax.set_ylim(-0.03, 1.05)
        ax.set_ylabel("completeness")
        ax.legend(fontsize=7, loc="lower right" if variable == "snr" else "lower left")
    fig.suptitle(title or f"fake injection: {len(result.fakes)} fakes, "
                 f"{result.quality.get('n_rounds', '?')} rounds", fontsize=10)
    fig.tight_layout()
    png = Path(png)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return png


def write_fakes_dir(out_dir: str | Path, result: FakeResult, provenance: dict) -> Path:
    """Write ``fakes.csv``, ``completeness.csv``, ``completeness.json``, ``completeness.png``
    and the recovered fakes' triplets as a dataset ``triplets/`` (all atomically)."""
    from astrid.ml.data import CHANNELS, DatasetWriter
    from astrid.provenance import write_json_atomic, write_table_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_table_atomic(out / "fakes.csv", result.fakes)
    tables = [result.by_snr.assign(variable="snr").rename(columns={"snr": "value"})]
    if result.by_mag is not None:
        tables.append(result.by_mag.assign(variable="mag").rename(columns={"mag": "value"}))
    write_table_atomic(out / "completeness.csv", pd.concat(tables, ignore_index=True))
    summary = {"threshold_sigma": result.threshold_sigma,
               "fit_snr": dataclasses.asdict(result.fit_snr),
               "fit_mag": dataclasses.asdict(result.fit_mag) if result.fit_mag else None,
               "completeness_snr_ge_8": float(result.fakes.loc[result.fakes["snr_expected"] >= 8,
                                                               "detected"].mean()),
               "quality": result.quality, "provenance": provenance}
    write_json_atomic(out / "completeness.json", summary)
    plot_completeness(result, out / "completeness.png")
    triplets = out / "triplets"
    if (triplets / "dataset.json").exists():
        import shutil

        shutil.rmtree(triplets)  # ours, from an earlier run into the same directory
    with DatasetWriter(triplets, result.stamps.shape[-1], CHANNELS,
                       provenance_record=provenance) as writer:
        if len(result.stamps):
            writer.append(result.stamps, result.meta)
    return out
