"""sep's entry points called directly: sep.extract's, sep.winpos's and sep.sum_circle's results,
with the GIL released."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import sep

from astrid.diff import sep_nogil
from astrid.diff.background import estimate_background
from astrid.diff.stars import _DETECT_KERNEL, sep_extract
from astrid.fitsio import read_image

pytestmark = pytest.mark.skipif(not sep_nogil.available(),
                                reason=f"sep {sep.__version__}: the binding mirrors sep 1.4")

# What the star finder asks for: mask, filter, deblending and cleaning.
DETECT = dict(minarea=3, filter_kernel=_DETECT_KERNEL, deblend_cont=0.005, clean=True)


def crowded_field(size=700, n=400, seed=1):
    """White noise with Gaussian stars, many of them blended pairs, and a masked column."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0.0, 1.0, (size, size))
    yy, xx = np.mgrid[0:size, 0:size]
    centres = rng.uniform(10, size - 10, (n, 2))
    centres[: n // 4] = centres[n // 4: n // 2] + rng.uniform(2.5, 4.0, (n // 4, 2))
    for (x, y), flux in zip(centres, rng.uniform(30, 3000, n), strict=True):
        sl = np.s_[max(int(y) - 12, 0):int(y) + 13, max(int(x) - 12, 0):int(x) + 13]
        image[sl] += flux / (2 * np.pi * 1.5**2) * np.exp(
            -((xx[sl] - x) ** 2 + (yy[sl] - y) ** 2) / (2 * 1.5**2))
    mask = np.zeros((size, size), np.uint8)
    mask[:, 300:303] = 1
    return image.astype(np.float32), mask


def assert_same_catalogue(ours, theirs):
    assert ours.dtype == theirs.dtype
    assert len(ours) == len(theirs) > 0
    for name in theirs.dtype.names:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def test_crowded_field_gives_sep_extracts_catalogue_field_by_field():
    image, mask = crowded_field()
    ours = sep_nogil.extract(image, 3.0, mask=mask, **DETECT)
    assert_same_catalogue(ours, sep.extract(image, 3.0, mask=mask, **DETECT))
    assert np.any(ours["flag"] & sep.OBJ_MERGED)  # the deblender ran


def test_real_decam_frame_gives_sep_extracts_catalogue(shared_data):
    image = read_image(shared_data("diffpairs", "decam", "input_data") / "DEC-OBS04a.mini.fits")
    bkg = estimate_background(image.data, image.mask)
    snr = np.ascontiguousarray((image.data - bkg.level) / bkg.rms, np.float32)
    mask = np.ascontiguousarray(image.mask, np.uint8)
    assert_same_catalogue(sep_nogil.extract(snr, 2.0, mask=mask, **DETECT),
                          sep.extract(snr, 2.0, mask=mask, **DETECT))


def test_two_threads_extract_two_images_as_one_thread_does():
    images = [crowded_field(seed=seed) for seed in (2, 3)]
    serial = [sep_nogil.extract(im, 3.0, mask=m, **DETECT) for im, m in images]
    with ThreadPoolExecutor(max_workers=2) as pool:
        threaded = list(pool.map(lambda im_m: sep_nogil.extract(im_m[0], 3.0, mask=im_m[1],
                                                                **DETECT), images * 2))
    for ours, reference in zip(threaded, serial * 2, strict=True):
        assert_same_catalogue(ours, reference)


def test_windowed_centroids_and_apertures_are_seps():
    image, mask = crowded_field()
    objects = sep.extract(image, 3.0, mask=mask, **DETECT)
    x, y = objects["x"] + 0.3, objects["y"] - 0.2  # off-centre starts: the windows iterate
    sig = np.linspace(0.2, 3.0, len(x))  # below sep's minimum too
    for ours, theirs in zip(sep_nogil.winpos(image, x, y, sig, mask=mask, subpix=5),
                            sep.winpos(image, x, y, sig, mask=mask, subpix=5), strict=True):
        np.testing.assert_array_equal(ours, theirs)
        assert ours.dtype == theirs.dtype
    for ours, theirs in zip(sep_nogil.winpos(image, x, y, 1.5, mask=mask, subpix=5),
                            sep.winpos(image, x, y, 1.5, mask=mask, subpix=5), strict=True):
        np.testing.assert_array_equal(ours, theirs)  # one sigma for all
    err = np.random.default_rng(5).uniform(0.8, 1.2, image.shape).astype(np.float32)
    for gain in (None, 2.0):
        kwargs = dict(err=err, mask=mask, gain=gain, subpix=5)
        for ours, theirs in zip(sep_nogil.sum_circle(image, x, y, 4.5, **kwargs),
                                sep.sum_circle(image, x, y, 4.5, **kwargs), strict=True):
            np.testing.assert_array_equal(ours, theirs)
            assert ours.dtype == theirs.dtype


def longest_pause_of_this_thread(job) -> tuple[float, float]:
    """(longest gap between two steps of a Python loop here, duration of ``job()`` running in
    another thread meanwhile): the gap spans the whole of a call that holds the GIL."""
    done = threading.Event()
    duration = []

    def timed_job():
        start = time.perf_counter()
        job()
        duration.append(time.perf_counter() - start)
        done.set()

    worker = threading.Thread(target=timed_job)
    last, longest = time.perf_counter(), 0.0
    worker.start()
    while not done.is_set():
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    worker.join()
    return longest, duration[0]


@pytest.mark.parametrize("call", ["extract", "winpos"])
def test_the_gil_is_free_while_sep_works(call):
    image = np.random.default_rng(4).normal(0.0, 1.0, (2000, 2000)).astype(np.float32)
    xy = np.random.default_rng(6).uniform(20, 1980, (2, 1500))

    def job(module):
        if call == "extract":
            return lambda: module.extract(image, 2.0)
        return lambda: module.winpos(image, xy[0], xy[1], np.full(xy.shape[1], 2.0))

    held, held_for = longest_pause_of_this_thread(job(sep))
    free, free_for = longest_pause_of_this_thread(job(sep_nogil))
    # sep holds the GIL through its C call, most of its run (0.7-0.9 of it here) ...
    assert held > 0.5 * held_for
    # ... ours never for long (0.01-0.1 of its run here): this thread ran on meanwhile.
    assert free < 0.25 * free_for


def test_errors_are_sep_s_errors():
    image = np.zeros((800, 800), np.float32)
    image[100:700, 100:700] = 100.0  # 360,000 pixels above threshold
    sep.set_extract_pixstack(300_000)
    with pytest.raises(Exception, match="pixel buffer full"):
        sep_nogil.extract(image, 1.0)
    # sep_extract grows the stack and retries, on this path as on sep's own.
    assert sep_extract(image, 1.0)["npix"][0] >= 600 * 600
    with pytest.raises(ValueError, match="mask"):
        sep_nogil.extract(image, 1.0, mask=np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="float32"):
        sep_nogil.winpos(image.astype(float), [400.0], [400.0], [2.0])


def test_other_sep_versions_fall_back_on_sep_itself(monkeypatch):
    image, mask = crowded_field(size=300, n=60)
    expected = sep.extract(image, 3.0, mask=mask, **DETECT)
    x, y = expected["x"], expected["y"]
    windowed = sep.winpos(image, x, y, np.full(len(x), 1.5), mask=mask)
    monkeypatch.setattr(sep_nogil, "_library", lambda: None)
    assert not sep_nogil.available()
    assert_same_catalogue(sep_extract(image, 3.0, mask=mask, **DETECT), expected)
    for ours, theirs in zip(sep_nogil.winpos(image, x, y, np.full(len(x), 1.5), mask=mask),
                            windowed, strict=True):
        np.testing.assert_array_equal(ours, theirs)
