"""The review page in a real headless Chromium (Debian's package, driven by Playwright)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from astrid.config import Settings
from astrid.ml.score import score_triplets
from astrid.serve.app import create_app

CHROMIUM = os.environ.get("ASTRID_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
TOKEN = "page-token"


@pytest.fixture
def browser():
    if not shutil.which(CHROMIUM) and not os.path.exists(CHROMIUM):
        reason = f"{CHROMIUM} not installed (apt-get install chromium)"
        if os.environ.get("ASTRID_REQUIRE_SERVICES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def _wait_for_new(page, previous: str) -> str:
    page.wait_for_function(
        "prev => document.body.dataset.state === 'ready' && document.body.dataset.candidate "
        "&& document.body.dataset.candidate !== prev", arg=previous, timeout=30_000)
    return page.evaluate("document.body.dataset.candidate")


def test_label_three_with_keyboard_and_undo_one(tmp_path, tiny_model, ztf_triplets, browser,
                                                 live_server):
    stamps, candid, meta = ztf_triplets
    settings = Settings()
    settings.serve.db_url = f"sqlite:///{tmp_path / 'labels.db'}"
    settings.serve.token = TOKEN
    settings.serve.high_score_share = 0.0  # pure uncertainty sampling: a known order
    app = create_app(settings, model=tiny_model)
    store = app.state.store
    scores = score_triplets(stamps, tiny_model)
    store.add_candidates(stamps, meta.assign(triplet_id=candid), "ztf", scores=scores,
                         model="tiny")
    most_uncertain = f"ztf:{candid[np.argmin(np.abs(scores - 0.5))]}"

    with live_server(app) as server:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(f"{server.url}/review")
        page.fill("#reviewer", "alice")
        page.fill("#token", TOKEN)
        page.click("button[type=submit]")
        first = _wait_for_new(page, "")
        assert first == most_uncertain
        # The stamps are shown, at their native 63 px, scaled up on screen.
        sizes = page.evaluate("['sci','ref','diff'].map(c => "
                              "[document.getElementById('stamp-' + c).naturalWidth,"
                              " document.getElementById('stamp-' + c).clientWidth])")
        assert all(natural == 63 and shown >= 4 * 63 for natural, shown in sizes)
        assert page.inner_text("#score") == f"{scores[candid.tolist().index(int(first[4:]))]:.3f}"

        page.keyboard.press("r")
        second = _wait_for_new(page, first)
        page.keyboard.press("b")
        third = _wait_for_new(page, second)
        page.keyboard.press("r")
        fourth = _wait_for_new(page, third)
        page.keyboard.press("u")  # back to the third, now unlabelled again
        assert _wait_for_new(page, fourth) == third
        assert len({first, second, third, fourth}) == 4
        page.keyboard.press("s")  # pass on the third: the queue moves on, no label stored
        assert _wait_for_new(page, third) not in (first, second, third)
        assert not errors, errors

    assert store.current_labels() == {first: 1, second: 0}
    hist = store.history()
    assert [(h.candidate_id, h.action, h.label, h.reviewer) for h in hist] == [
        (first, "label", 1, "alice"), (second, "label", 0, "alice"),
        (third, "label", 1, "alice"), (third, "undo", None, "alice")]
    assert all(h.model == "tiny" for h in hist[:3])
    assert hist[0].score_shown == pytest.approx(store.get(first).score)
