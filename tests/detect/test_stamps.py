"""Triplet cutouts: centred at sub-pixel accuracy, edge stamps padded and flagged, never shifted."""

from __future__ import annotations

import numpy as np
import pytest

from astrid.detect.stamps import cut_triplets


def _gaussian_image(shape, sources, fwhm_px=2.5, noise=0.0, seed=0):
    sigma = fwhm_px / 2.3548
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    image = np.zeros(shape, np.float64)
    for x0, y0, flux in sources:
        image += flux / (2 * np.pi * sigma**2) * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * sigma**2))
    if noise:
        image += np.random.default_rng(seed).normal(0, noise, shape)
    return image.astype(np.float32)


def _peak_position(stamp):
    """Sub-pixel peak: parabola through the log of the brightest pixel and its neighbours
    (exact for a Gaussian), per axis."""
    j, i = np.unravel_index(np.nanargmax(stamp), stamp.shape)
    stamp = np.log(np.clip(stamp, 1e-3, None))

    def vertex(a, b, c):
        return 0.5 * (a - c) / (a - 2 * b + c)

    return (i + vertex(*stamp[j, i - 1:i + 2]), j + vertex(*stamp[j - 1:j + 2, i]))


def test_simulated_source_lands_at_stamp_centre():
    rng = np.random.default_rng(3)
    grid = [(x, y) for x in (40, 90, 140, 190) for y in (40, 100, 160, 210)]
    offsets = rng.uniform(-3, 3, (16, 2))
    positions = [(x + dx, y + dy) for (x, y), (dx, dy) in zip(grid, offsets, strict=True)]
    positions += [(215.5, 15.5), (15.49, 239.51)]  # exactly on the rounding boundaries
    sources = [(x, y, 5000.0) for x, y in positions]
    diff = _gaussian_image((256, 256), sources, noise=1.0)
    sci = diff + 100
    ref = np.full_like(sci, 100)
    xs, ys = np.array(positions).T
    stamps, edge, offsets = cut_triplets(sci, ref, diff, xs, ys, size=31, return_offsets=True)
    assert stamps.shape == (len(xs), 3, 31, 31) and stamps.dtype == np.float32
    assert not edge.any()
    assert (np.abs(offsets) <= 0.5).all()
    for k in range(len(xs)):
        px, py = _peak_position(stamps[k, 2])
        # the peak is within half a pixel of the central pixel, and the recorded offset says where
        assert abs(px - 15) <= 0.5 + 0.05 and abs(py - 15) <= 0.5 + 0.05
        assert abs(px - 15 - offsets[k, 0]) < 0.1 and abs(py - 15 - offsets[k, 1]) < 0.1
    # channels are sci, ref, diff in that order and carry raw pixels
    np.testing.assert_array_equal(stamps[:, 1], 100)
    np.testing.assert_allclose(stamps[:, 0] - 100, stamps[:, 2], atol=1e-4)


def test_default_size_is_63_and_scalar_positions_work():
    image = np.arange(200 * 300, dtype=np.float32).reshape(200, 300)
    stamps, edge = cut_triplets(image, image, image, 150.2, 99.7)
    assert stamps.shape == (1, 3, 63, 63) and not edge[0]
    assert stamps[0, 0, 31, 31] == image[100, 150]


@pytest.mark.parametrize("x, y", [(2.0, 100.0), (297.6, 100.0), (150.0, 0.0), (150.0, 199.4),
                                  (-0.4, -0.4)])
def test_edge_stamps_are_nan_padded_and_flagged_never_shifted(x, y):
    image = np.arange(200 * 300, dtype=np.float32).reshape(200, 300)
    stamps, edge = cut_triplets(image, image, image, [x, 150.0], [y, 100.0], size=21)
    assert edge.tolist() == [True, False]
    ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
    # the centre pixel is still the candidate's pixel (not shifted inwards)
    assert stamps[0, 0, 10, 10] == image[iy, ix]
    for c in range(3):
        s = stamps[0, c]
        for j in range(21):
            for i in range(21):
                r, q = iy + j - 10, ix + i - 10
                if 0 <= r < 200 and 0 <= q < 300:
                    assert s[j, i] == image[r, q]
                else:
                    assert np.isnan(s[j, i])
    assert np.isfinite(stamps[1]).all()


def test_bad_inputs():
    image = np.zeros((50, 50), np.float32)
    with pytest.raises(ValueError, match="one shape"):
        cut_triplets(image, np.zeros((50, 51)), image, [1.0], [1.0])
    with pytest.raises(ValueError, match="odd"):
        cut_triplets(image, image, image, [1.0], [1.0], size=20)
    with pytest.raises(ValueError, match="finite"):
        cut_triplets(image, image, image, [np.nan], [1.0])
    stamps, edge = cut_triplets(image, image, image, [], [])
    assert stamps.shape == (0, 3, 63, 63) and edge.shape == (0,)


def test_gallery_groups_real_first_and_writes_png_with_provenance(tmp_path):
    import pandas as pd
    from PIL import Image as PILImage

    from astrid.detect.gallery import group_examples, save_gallery

    rng = np.random.default_rng(0)
    stamps = rng.normal(size=(30, 3, 21, 21)).astype(np.float32)
    stamps[0, :, :4] = np.nan  # an edge stamp
    meta = pd.DataFrame({"label": [0] * 12 + [1] * 10 + [-1] * 8,
                         "kind": ["cosmic_ray"] * 5 + ["noise"] * 7 + ["sn"] * 10 + [""] * 8,
                         "snr": rng.uniform(5, 30, 30)})
    groups = group_examples(meta, per_group=4)
    titles = [t for t, _ in groups]
    assert titles[0].startswith("real · sn") and titles[-1].startswith("unlabelled")
    assert all(len(rows) <= 4 for _, rows in groups)
    assert all(set(meta.loc[rows, "kind"]) == {meta.loc[rows[0], "kind"]} for _, rows in groups)
    png = save_gallery(stamps, meta, tmp_path / "g.png", per_group=4, stretch="zscale")
    with PILImage.open(png) as im:
        assert im.width > 4 * 3 * 21 and im.height > 4 * 21
        assert "astrid_version" in im.info.get("Description", "")
    with pytest.raises(ValueError, match="stretch"):
        save_gallery(stamps, meta, tmp_path / "h.png", stretch="linear")
    assert not (tmp_path / "h.png").exists()
