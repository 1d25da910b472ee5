"""Real transients and the S/N they are expected to reach in an optimal difference image.

The expected S/N is that of the proper-image-subtraction (ZOGY) point-source statistic for
locally constant noise (Zackay, Ofek & Gal-Yam 2016, eqs. 13-14 and 41)::

    SNR^2 = dF^2 / N * sum_k |P_n|^2 |P_r|^2 / (V_n |P_r|^2 + V_r' |P_n|^2)

with ``P_n, P_r`` the Fourier transforms of the two PSFs (unit sum), ``V_n`` the science
per-pixel variance and ``V_r'`` the reference per-pixel variance in science units, both at the
source position: sky and read noise, the host galaxy's (or the variable star's) light, and the
transient's own shot noise. When the PSFs are equal this is the familiar
``dF / sqrt(NEA (V_n + V_r'))``; when they differ it is smaller, as ZOGY's S_corr will be.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

REAL_KINDS = ("sn", "sn_nuclear", "sn_hostless", "variable", "asteroid")
BOGUS_KINDS = ("cosmic_ray", "hot_pixel", "bad_column", "trail", "bleed")


@dataclass(frozen=True)
class EpochNoise:
    """What sets the noise of one epoch at one position.

    ``psf`` (S, S) unit-sum stamp, ``background_var_adu2`` per-pixel variance of sky + read
    noise + static light (ADU^2 of this epoch), ``gain`` e-/ADU, ``source`` (S, S) unit-sum
    profile of the changing source in this epoch when it is not the PSF (a trailed asteroid),
    centred like ``psf``.
    """

    psf: np.ndarray
    background_var_adu2: float
    gain: float
    source: np.ndarray | None = None  # the changing source's own profile if not the PSF (trailed)

    @cached_property
    def power(self) -> np.ndarray:
        """|FFT(P)|^2 of the unit-sum PSF."""
        return np.abs(np.fft.fft2(self.psf / self.psf.sum())) ** 2

    @cached_property
    def shot_weight(self) -> float:
        """PSF-weighted mean of the unit-sum PSF, sum P^3 / sum P^2: the per-pixel variance
        that a source of unit flux adds, as seen by a matched filter."""
        p = self.psf / self.psf.sum()
        return float(np.sum(p ** 3) / np.sum(p ** 2))


def difference_snr(delta_flux_adu: float, flux_sci_adu: float, flux_ref_adu: float,
                   sci: EpochNoise, ref: EpochNoise, flux_ratio: float,
                   in_science: bool = True) -> float:
    """Expected S/N in the difference of a change ``delta_flux_adu`` (science ADU).

    ``flux_sci_adu`` is the variable part's flux in the science image (science ADU),
    ``flux_ref_adu`` in the reference (reference ADU); they add shot noise. ``flux_ratio`` is
    science ADU per reference ADU for the same source. ``in_science`` says which epoch holds
    the change; if that epoch's ``source`` profile is not its PSF, the point-source filter
    of the difference only partly matches it::

        SNR = dF sum_k Re(S_e P_e*) |P_o|^2 / D  /  sqrt(N sum_k |P_n|^2 |P_r|^2 / D)
    """
    if delta_flux_adu == 0:
        return 0.0
    var_n = sci.background_var_adu2 + max(flux_sci_adu, 0) * sci.shot_weight / sci.gain
    var_r = (ref.background_var_adu2 + max(flux_ref_adu, 0) * ref.shot_weight / ref.gain) \
        * flux_ratio ** 2
    pn, pr = sci.power, ref.power
    denom = var_n * pr + var_r * pn
    ok = denom > 0
    info = np.sum(pn[ok] * pr[ok] / denom[ok]) / pn.size
    here, other = (sci, pr) if in_science else (ref, pn)
    if here.source is None:
        return float(abs(delta_flux_adu) * np.sqrt(info))
    cross = np.real(np.fft.fft2(here.source / here.source.sum())
                    * np.conj(np.fft.fft2(here.psf / here.psf.sum())))
    match = np.sum(cross[ok] * other[ok] / denom[ok]) / pn.size
    return float(abs(delta_flux_adu) * match / np.sqrt(info))


def flux_for_snr(target_snr: float, sci: EpochNoise, ref: EpochNoise, flux_ratio: float,
                 base_sci_adu: float, base_ref_adu: float, sign: int,
                 in_science: bool) -> float:
    """The change ``dF`` (science ADU) whose expected difference S/N is ``target_snr``.

    The source's state in each epoch is a base (a variable star's quiescent flux, 0 for a new
    source) plus, in the epoch where it appears (``in_science`` or not), ``sign * dF``
    for variables or ``dF`` for new sources. Shot noise makes S/N(dF) mildly non-linear, so
    solve by fixed-point iteration (converges in a few steps: S/N grows monotonically in dF).
    """
    delta = 0.0
    for _ in range(6):
        f_sci, f_ref = epoch_fluxes(delta, base_sci_adu, base_ref_adu, sign, in_science,
                                    flux_ratio)
        unit = difference_snr(1.0, f_sci, f_ref, sci, ref, flux_ratio, in_science)
        delta = target_snr / unit
    return delta


def epoch_fluxes(delta_adu: float, base_sci_adu: float, base_ref_adu: float, sign: int,
                 in_science: bool, flux_ratio: float) -> tuple[float, float]:
    """Flux of the changing source in the science (science ADU) and reference (reference ADU)."""
    if in_science:
        return base_sci_adu + sign * delta_adu, base_ref_adu
    return base_sci_adu, base_ref_adu + delta_adu / flux_ratio
