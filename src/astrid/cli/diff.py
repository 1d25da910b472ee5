"""``astrid diff REF SCI -o DIR``: difference two images and list the candidates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from astrid.cli.app import ConfigOption, QuietOption, app, apply_quiet


@app.command("diff")
def diff_command(
    reference: Annotated[Path, typer.Argument(help="Reference image (FITS).")],
    science: Annotated[Path, typer.Argument(help="Science image (FITS); the output grid.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (diff.fits, "
                                      "scorr.fits, mask.fits, sci.fits, ref.fits, "
                                      "candidates.csv, quality.json).")],
    method: Annotated[str | None, typer.Option("--method", help="zogy or gaussian "
                                               "[diff.method].")] = None,
    threshold: Annotated[float | None, typer.Option("--threshold", help="Detection threshold "
                                                    "on |S_corr| in sigma "
                                                    "[detect.threshold_sigma].")] = None,
    allow_filter_mismatch: Annotated[bool, typer.Option(
        "--allow-filter-mismatch", help="Difference images taken through different filters "
                                        "(a warning instead of an error).")] = False,
    config: ConfigOption = None,
    quiet: QuietOption = False,
) -> None:
    """Difference REF and SCI (ZOGY with S_corr by default) and detect candidates at 5 sigma."""
    import warnings

    from pydantic import ValidationError

    from astrid.config import DetectSettings, DiffSettings, describe_validation_error, load_settings
    from astrid.diff import difference, write_diff_dir
    from astrid.errors import AstridError
    from astrid.fitsio import read_image
    from astrid.provenance import provenance

    apply_quiet(quiet)
    settings = load_settings(config)
    diff_over = {"method": method} if method is not None else {}
    if allow_filter_mismatch:
        diff_over["allow_filter_mismatch"] = True
    detect_over = {"threshold_sigma": threshold} if threshold is not None else {}
    try:
        diff_settings = DiffSettings.model_validate({**settings.diff.model_dump(), **diff_over})
        detect_settings = DetectSettings.model_validate({**settings.detect.model_dump(),
                                                         **detect_over})
    except ValidationError as exc:
        flag = {"method": "--method", "threshold_sigma": "--threshold"}.get(
            str(exc.errors()[0]["loc"][0]), "option")
        raise AstridError(f"{flag}: {describe_validation_error(exc).split(': ', 1)[-1]}") from None
    settings = settings.model_copy(update={"diff": diff_settings, "detect": detect_settings})

    ref_img = read_image(reference)
    sci_img = read_image(science)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result, candidates = difference(ref_img, sci_img, diff_settings=diff_settings,
                                        detect_settings=detect_settings)
    for w in caught:
        if issubclass(w.category, UserWarning):
            typer.echo(f"warning: {w.message}", err=True)
    record = provenance({"diff": diff_settings.model_dump(mode="json"),
                         "detect": detect_settings.model_dump(mode="json")},
                        inputs=[reference, science])
    write_diff_dir(out, result, candidates, record)
    q = result.quality
    n_pos = int((candidates["sign"] > 0).sum()) if len(candidates) else 0
    typer.echo(f"{out}/: {len(candidates)} candidates ({n_pos} positive, "
               f"{len(candidates) - n_pos} negative) at {detect_settings.threshold_sigma:g} "
               f"sigma; noise ratio {q['noise_ratio']:.3f}; flux ratio {q['flux_ratio']:.4g}; "
               f"FWHM ref/sci {q['fwhm_ref']:.2f}/{q['fwhm_sci']:.2f} px; "
               f"elapsed {q['elapsed_s']:.2f} s ({q['method']})")
