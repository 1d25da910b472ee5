import gzip

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from astrid.errors import InputFileError
from astrid.fitsio import read_image, write_image
from astrid.provenance import provenance


def _tan_wcs(shape=(64, 64)):
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [shape[1] / 2, shape[0] / 2]
    wcs.wcs.cdelt = [-1 / 3600, 1 / 3600]
    return wcs


def _image(shape=(64, 64), seed=0):
    return np.random.default_rng(seed).normal(100, 5, shape).astype(np.float32)


def test_real_decam_frame(shared_data):
    path = shared_data("diffpairs", "decam", "input_data", "DEC-OBS04a.mini.fits")
    image = read_image(path, require_wcs=True)
    assert image.data.shape == (256, 256) and image.data.dtype == np.float32
    assert image.wcs is not None and image.wcs.has_celestial
    assert image.meta.gain == pytest.approx(3.98, abs=0.01)
    assert image.meta.read_noise == pytest.approx(11.84, abs=0.01)  # RDNOISE card
    assert image.meta.saturation == pytest.approx(46536.1, abs=0.1)
    assert image.meta.filter == "i"
    assert image.meta.exptime_s == pytest.approx(330.0)
    assert 58000 < image.meta.mjd < 59000
    ra, dec = image.wcs.pixel_to_world_values(128, 128)
    assert np.isfinite(ra) and np.isfinite(dec)


def test_real_frame_without_wcs(shared_data):
    path = shared_data("diffpairs", "properimage", "aligned_eso085-030-004.fit")
    image = read_image(path)
    assert image.data.shape == (682, 1024)
    assert image.wcs is None
    assert image.meta.exptime_s == 60.0
    with pytest.raises(InputFileError, match="no celestial WCS"):
        read_image(path, require_wcs=True)


def test_nan_and_inf_become_masked(tmp_path):
    data = _image()
    data[3, 4] = np.nan
    data[5, 6] = np.inf
    path = tmp_path / "a.fits"
    fits.PrimaryHDU(data).writeto(path)
    image = read_image(path)
    assert image.mask[3, 4] and image.mask[5, 6] and image.mask.sum() == 2
    assert np.isnan(image.data[5, 6])


def test_saturated_pixels_are_masked(tmp_path):
    data = _image()
    data[10, 10] = 60000
    header = fits.Header({"SATURATE": 50000.0})
    path = tmp_path / "s.fits"
    fits.PrimaryHDU(data, header=header).writeto(path)
    image = read_image(path)
    assert image.meta.saturation == 50000.0
    assert image.mask[10, 10] and image.mask.sum() == 1


def test_gzip_and_tile_compressed(tmp_path):
    data = _image()
    plain = tmp_path / "a.fits"
    fits.PrimaryHDU(data, header=_tan_wcs().to_header()).writeto(plain)
    gz = tmp_path / "a.fits.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    fz = tmp_path / "a.fits.fz"
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, header=_tan_wcs().to_header(),
                                                         compression_type="GZIP_2")]).writeto(fz)
    # Tile compression of floats quantises (lossy, well below the noise of 5); gzip is exact.
    for path, atol in ((gz, 0.0), (fz, 0.5)):
        image = read_image(path, require_wcs=True)
        np.testing.assert_allclose(image.data, data, rtol=0, atol=atol)
        assert image.wcs.wcs.crval[0] == pytest.approx(150.0)


def test_scaled_integer_data(tmp_path):
    values = np.arange(64 * 64, dtype=np.float64).reshape(64, 64) * 2.0 + 1000.0
    hdu = fits.PrimaryHDU(values.copy())  # scale() converts in place
    hdu.scale("int16", bscale=2.0, bzero=33768.0)
    path = tmp_path / "int.fits"
    hdu.writeto(path)
    assert fits.getheader(path)["BITPIX"] == 16
    image = read_image(path)
    assert image.data.dtype == np.float32
    np.testing.assert_allclose(image.data, values)


def test_blank_in_unscaled_integers_is_masked(tmp_path):
    raw = np.full((32, 32), 7, dtype=np.int32)
    raw[1, 2] = -999
    path = tmp_path / "blank.fits"
    fits.PrimaryHDU(raw, header=fits.Header({"BLANK": -999})).writeto(path)
    image = read_image(path)
    assert image.mask[1, 2] and image.mask.sum() == 1
    assert image.data[0, 0] == 7


def test_hst_like_sci_extension_and_primary_metadata(tmp_path):
    primary = fits.PrimaryHDU(header=fits.Header({"INSTRUME": "ACS", "TELESCOP": "HST",
                                                  "FILTER1": "CLEAR1L", "FILTER2": "F814W",
                                                  "EXPSTART": 55000.25}))
    err = fits.ImageHDU(np.ones((16, 16), np.float32), name="ERR")
    sci = fits.ImageHDU(_image(), header=_tan_wcs().to_header(), name="SCI")
    path = tmp_path / "hst_flc.fits"
    fits.HDUList([primary, err, sci]).writeto(path)
    image = read_image(path)
    assert image.hdu_index == 2
    assert image.meta.filter == "F814W"
    assert image.meta.instrument == "ACS" and image.meta.telescope == "HST"
    assert image.meta.mjd == pytest.approx(55000.25)


def test_ztf_keywords(tmp_path):
    header = fits.Header({"FILTERID": 2, "MAGZP": 26.3, "OBSMJD": 58700.5, "GAIN": 6.2,
                          "SATURATE": 60000.0, "EXPTIME": 30.0, "TELESCOP": "P48"})
    path = tmp_path / "ztf.fits"
    fits.PrimaryHDU(_image(), header=header).writeto(path)
    meta = read_image(path).meta
    assert meta.filter == "r" and meta.zero_point == 26.3 and meta.mjd == 58700.5
    assert meta.gain == 6.2 and meta.exptime_s == 30.0 and meta.telescope == "P48"


def test_degenerate_third_axis_is_squeezed(tmp_path):
    path = tmp_path / "cube.fits"
    fits.PrimaryHDU(_image()[None]).writeto(path)
    assert read_image(path).data.shape == (64, 64)


@pytest.mark.parametrize("case", ["missing", "text", "truncated", "table_only", "bad_gzip", "dir"])
def test_unreadable_files_give_one_line_errors(tmp_path, case):
    path = tmp_path / "x.fits"
    if case == "text":
        path.write_text("this is not FITS\n" * 200)
    elif case == "truncated":
        fits.PrimaryHDU(_image((256, 256))).writeto(path)
        path.write_bytes(path.read_bytes()[: 2880 * 20])
    elif case == "table_only":
        table = fits.BinTableHDU.from_columns([fits.Column(name="a", format="E", array=[1.0])])
        fits.HDUList([fits.PrimaryHDU(), table]).writeto(path)
    elif case == "bad_gzip":
        path = tmp_path / "x.fits.gz"
        path.write_bytes(b"\x1f\x8b\x08\x00" + b"garbage" * 100)
    elif case == "dir":
        path.mkdir()
    with pytest.raises(InputFileError) as info:
        read_image(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message
    expected = {"missing": "not found", "text": "not a FITS file", "truncated": "truncated",
                "table_only": "no 2-D image", "bad_gzip": "", "dir": "directory"}[case]
    assert expected in message


def test_write_image_round_trip_with_provenance(tmp_path):
    data = _image()
    record = provenance({"k": 1}, inputs=["/data/ref.fits", "/data/sci.fits"], seed=5)
    path = write_image(tmp_path / "out" / "d.fits", data, wcs=_tan_wcs(), provenance=record)
    image = read_image(path, require_wcs=True)
    np.testing.assert_array_equal(image.data, data)
    assert image.header["CFGHASH"] == record["config_hash"]
    assert image.header["INPUT2"] == "sci.fits" and image.header["SEED"] == 5
    assert [p.name for p in path.parent.iterdir()] == ["d.fits"]  # no temp files left


def test_write_image_compressed(tmp_path):
    data = _image()
    for name in ("c.fits.fz", "c.fits.gz"):
        image = read_image(write_image(tmp_path / name, data))
        np.testing.assert_allclose(image.data, data, atol=0.5)
