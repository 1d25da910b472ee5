"""A simulated survey with known truth: reference/science pairs, transients and artefacts.

``simulate_pair(settings, index)`` renders one pair in memory (a :class:`SimPair` of two
:class:`SimEpoch`, the truth and the static sky); ``write_pair(dir, pair, settings)`` writes
it; ``write_survey(out_dir, settings)`` writes a resumable survey::

    OUT/survey.json                  settings, seed, provenance, pair ids, per-pair summary
    OUT/<pair_id>/ref.fits, sci.fits float32 ADU with sky, TAN WCS (off by wcs_error_px), and
                                     GAIN RDNOISE SATURATE FILTER MJD-OBS EXPTIME TELESCOP
                                     INSTRUME MAGZP (+ FWHM, SEEING, SKYLEVEL, SKYSIG)
    OUT/<pair_id>/truth.csv          what changed: kind, x, y (science grid, 0-based), ra, dec,
                                     flux (science ADU), mag, snr (expected in the difference),
                                     is_real, sign (+1 brighter in the science image)
    OUT/<pair_id>/static.csv         stars and galaxies: kind, x, y, ra, dec, flux, mag,
                                     saturated, r_eff_px, sersic_n, axis_ratio
    OUT/<pair_id>/pair.json          the pair's drawn parameters (true WCSs, PSFs, zero points,
                                     noise, offsets); written last, it marks the pair complete

Truth conventions: a variable star's row gives the change (``flux`` = |Δflux|, ``sign``); its
quiescent flux is the star's ``flux`` in static.csv. Trails, bad columns and bleeds are
extended, so they are listed every ``trail_sample_px`` along their length with ``flux`` per
pixel of length and ``snr`` empty. For cosmic rays and hot pixels ``snr`` is the response of
the point-source filter to a one-pixel spike of that flux; for trailed asteroids it accounts
for the trail.
"""

from astrid.sim.psf import MoffatPsf
from astrid.sim.survey import (
                               SimEpoch,
                               SimPair,
                               pair_id_for,
                               simulate_pair,
                               write_pair,
                               write_survey,
)
from astrid.sim.transients import BOGUS_KINDS, REAL_KINDS

__all__ = ["BOGUS_KINDS", "REAL_KINDS", "MoffatPsf", "SimEpoch", "SimPair", "pair_id_for",
           "simulate_pair", "write_pair", "write_survey"]
