"""The HTTP API through real HTTP on loopback: uvicorn serving the app, httpx as the client."""

from __future__ import annotations

import io
import time

import httpx
import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from astrid.config import Settings
from astrid.ml.retrain import add_version, model_version
from astrid.ml.score import score_triplets
from astrid.serve.app import create_app

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _settings(tmp_path, **serve) -> Settings:
    settings = Settings()
    settings.serve.db_url = f"sqlite:///{tmp_path / 'labels.db'}"
    settings.serve.token = TOKEN
    settings.serve.max_batch = 64
    settings.serve.max_upload_mb = 3.0
    for key, value in serve.items():
        setattr(settings.serve, key, value)
    return settings


def _npz(stamps: np.ndarray, **extra) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, sci=stamps[:, 0], ref=stamps[:, 1], diff=stamps[:, 2], **extra)
    return buf.getvalue()


@pytest.fixture
def live(tmp_path, tiny_model, ztf_triplets, live_server):
    """The service with the tiny model and the 49 real ZTF triplets in the review store."""
    stamps, candid, meta = ztf_triplets
    app = create_app(_settings(tmp_path), model=tiny_model)
    version = model_version(tiny_model)
    app.state.store.add_candidates(stamps, meta.assign(triplet_id=candid), "ztf",
                                   scores=score_triplets(stamps, tiny_model), model=version)
    with live_server(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        yield client, app.state.store


def test_score_npz_fits_and_alerts(live, tiny_model, ztf_triplets, shared_data):
    client, _ = live
    stamps, candid, _ = ztf_triplets
    expect = score_triplets(stamps, tiny_model)
    out = client.post("/v1/score", files={"file": ("batch.npz", _npz(stamps, candid=candid))})
    assert out.status_code == 200, out.text
    body = out.json()
    assert body["model"] == model_version(tiny_model)
    assert body["ids"] == candid.tolist()
    np.testing.assert_allclose(body["scores"], expect, atol=1e-6)
    # Input order is kept: reversed input, reversed scores.
    rev = client.post("/v1/score", files={"file": ("r.npz", _npz(stamps[::-1].copy()))}).json()
    np.testing.assert_allclose(rev["scores"], expect[::-1], atol=1e-6)
    # FITS stamps: image HDUs named SCI, REF, DIFF.
    hdus = fits.HDUList([fits.PrimaryHDU()] + [fits.ImageHDU(stamps[:5, i], name=n)
                                               for i, n in enumerate(("SCI", "REF", "DIFF"))])
    buf = io.BytesIO()
    hdus.writeto(buf)
    got = client.post("/v1/score", files={"file": ("s.fits", buf.getvalue())}).json()
    np.testing.assert_allclose(got["scores"], expect[:5], atol=1e-6)
    # A real ZTF alert packet: scored by its own cutouts, identified by candid.
    avro = shared_data("ztf-alerts", "fink-client", "raw", "ZTF19acihgng.avro")
    got = client.post("/v1/score", files={"file": (avro.name, avro.read_bytes())}).json()
    row = candid.tolist().index(got["ids"][0])
    assert got["scores"][0] == pytest.approx(expect[row], abs=1e-6)


def test_bad_uploads_are_4xx(live, ztf_triplets):
    client, _ = live
    stamps, _, _ = ztf_triplets

    def post(name, data):
        return client.post("/v1/score", files={"file": (name, data)})

    cases = [
        (post("junk.npz", b"not a zip file"), 400, "junk.npz: not a readable .npz"),
        (post("two.npz", _npz_missing(stamps)), 400, "missing array(s) diff"),
        (post("x.txt", b"hello"), 400, "unknown format"),
        (post("bad.fits", b"SIMPLE  = T" + b" " * 100), 400, "bad.fits: not a readable FITS"),
        (post("bad.avro", b"\x00\x01garbage"), 400, "bad.avro"),
        (post("empty.npz", b""), 400, "empty upload"),
        (post("many.npz", _npz(np.repeat(stamps, 2, axis=0)[:65])), 413, "more than the 64"),
        (post("big.npz", b"0" * (3 * 2**20 + 1)), 413, "exceeds the 3 MiB limit"),
        (client.post("/v1/score", data={"nofile": "1"}), 422, "file"),
        (_chunked(client, 3 * 2**20 + 1), 413, "exceeds the 3 MiB limit"),
        (post("shape.npz", _npz(stamps[:, :, :10, :20].copy())), 400, "square"),
    ]
    for resp, status, text in cases:
        assert resp.status_code == status, (text, resp.status_code, resp.text)
        assert text in resp.text, (text, resp.text)


def _chunked(client, n_bytes: int):
    """A multipart upload streamed without Content-Length (chunked transfer encoding)."""
    boundary = "astridbound"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"big.npz\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()

    def body():
        yield head
        for _ in range(n_bytes // 65536 + 1):
            yield b"0" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    return client.post("/v1/score", content=body(),
                       headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})


def _npz_missing(stamps):
    buf = io.BytesIO()
    np.savez(buf, sci=stamps[:, 0], ref=stamps[:, 1])
    return buf.getvalue()


def test_auth(live, tmp_path, tiny_model, live_server):
    client, store = live
    cid = store.query(limit=1)[0][0].id
    url = f"/v1/candidates/{cid}/label"
    body = {"label": "real", "reviewer": "alice"}
    no = client.post(url, json=body)
    assert no.status_code == 401 and no.headers["www-authenticate"] == "Bearer"
    assert client.post(url, json=body, headers={"Authorization": "Basic abc"}).status_code == 401
    assert client.post(url, json=body, headers={"Authorization": "Bearer nope"}).status_code == 403
    assert client.post("/v1/labels/undo", json={"reviewer": "a"}).status_code == 401
    assert client.post("/v1/difference").status_code == 401
    assert store.current_labels() == {}
    assert client.post(url, json=body, headers=AUTH).status_code == 200
    assert store.current_labels() == {cid: 1}
    # Closed reads: listing needs the token too.
    app = create_app(_settings(tmp_path / "closed", open_reads=False), model=tiny_model)
    with live_server(app) as server:
        assert httpx.get(f"{server.url}/v1/candidates").status_code == 401
        assert httpx.get(f"{server.url}/v1/candidates", headers=AUTH).status_code == 200
        assert httpx.get(f"{server.url}/healthz").status_code == 200  # probes stay open
    # No token configured at all: writes are refused, not open.
    app = create_app(_settings(tmp_path / "none", token=None), model=tiny_model, token=None)
    with live_server(app) as server:
        resp = httpx.post(f"{server.url}/v1/labels/undo", json={"reviewer": "a"}, headers=AUTH)
        assert resp.status_code == 403 and "no token configured" in resp.text


def test_candidates_labels_and_stamps(live):
    client, store = live
    listing = client.get("/v1/candidates", params={"run": "ztf", "score_min": 0.0,
                                                   "sort": "-score", "limit": 10}).json()
    assert listing["total"] == 49 and len(listing["candidates"]) == 10
    scores = [c["score"] for c in listing["candidates"]]
    assert scores == sorted(scores, reverse=True)
    mid = np.median([c.score for c in store.query(limit=100)[0]])
    upper = client.get("/v1/candidates", params={"score_min": mid, "limit": 100}).json()
    assert all(c["score"] >= mid for c in upper["candidates"]) and 0 < upper["total"] < 49

    cid = listing["candidates"][0]["id"]
    detail = client.get(f"/v1/candidates/{cid}").json()
    assert detail["meta"]["objectId"].startswith("ZTF") and detail["label"] is None
    for channel, url in detail["stamps"].items():
        png = client.get(url)
        assert png.status_code == 200 and png.headers["content-type"] == "image/png", channel
        import matplotlib.image as mpimg

        assert mpimg.imread(io.BytesIO(png.content)).shape[:2] == (63, 63)
    assert client.get(f"/v1/candidates/{cid}/stamp/xyz.png").status_code == 422
    assert client.get("/v1/candidates/nope").status_code == 404

    shown = detail["score"]
    r = client.post(f"/v1/candidates/{cid}/label", json={"label": "bogus", "reviewer": "ann"},
                    headers=AUTH)
    assert r.status_code == 200 and r.json()["label"]["score_shown"] == pytest.approx(shown)
    r = client.post(f"/v1/candidates/{cid}/label", json={"label": "real", "reviewer": "bo"},
                    headers=AUTH)
    assert r.json()["label"]["previous_label"] == 0
    bad = client.post(f"/v1/candidates/{cid}/label", json={"label": "maybe", "reviewer": "bo"},
                      headers=AUTH)
    assert bad.status_code == 422
    assert client.post("/v1/candidates/nope/label", json={"label": "real", "reviewer": "bo"},
                       headers=AUTH).status_code == 404
    hist = client.get("/v1/labels", params={"candidate_id": cid}).json()["labels"]
    assert [(h["reviewer"], h["label_name"]) for h in hist] == [("ann", "bogus"), ("bo", "real")]
    assert all(h["model"] == detail["model"] for h in hist)
    undo = client.post("/v1/labels/undo", json={"reviewer": "bo"}, headers=AUTH).json()
    assert undo["candidate"]["id"] == cid and undo["candidate"]["label_name"] == "bogus"
    assert client.get("/v1/candidates", params={"label": "bogus"}).json()["total"] == 1
    assert client.get("/v1/candidates", params={"label": "unlabelled"}).json()["total"] == 48
    assert client.get("/v1/candidates", params={"score_min": 2}).status_code == 422
    assert client.get("/v1/runs").json()["runs"] == [
        {"run": "ztf", "candidates": 49, "labelled": 1}]


def test_queue_hands_each_reviewer_its_own(live):
    client, store = live
    a = client.get("/v1/queue/next", params={"reviewer": "a"}).json()["candidate"]
    b = client.get("/v1/queue/next", params={"reviewer": "b"}).json()["candidate"]
    assert a["id"] != b["id"]
    assert client.get("/v1/queue/next", params={"reviewer": "a"}).json()["candidate"]["id"] == a["id"]
    client.post(f"/v1/candidates/{a['id']}/skip", json={"reviewer": "a"}, headers=AUTH)
    a2 = client.get("/v1/queue/next", params={"reviewer": "a"}).json()["candidate"]
    assert a2["id"] not in (a["id"], b["id"])
    assert client.get("/v1/queue/next").status_code == 422  # reviewer is required


def test_health_metrics_openapi(live, tiny_model, ztf_triplets):
    client, _ = live
    stamps, _, _ = ztf_triplets
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["model"] == model_version(tiny_model)
    assert health["store"] == "sqlite" and health["candidates"] == 49
    model = client.get("/v1/model").json()
    assert model["version"] == health["model"] and model["info"]["stamp_size"] == 21
    for _ in range(3):
        client.post("/v1/score", files={"file": ("b.npz", _npz(stamps[:7]))})
    client.post("/v1/score", files={"file": ("b.txt", b"x")})
    text = client.get("/metrics").text
    assert 'astrid_requests_total{method="POST",route="/v1/score",status="200"} 3' in text
    assert 'astrid_requests_total{method="POST",route="/v1/score",status="400"} 1' in text
    assert "astrid_scores_served_total 21" in text
    assert 'astrid_request_seconds_count{method="POST",route="/v1/score"} 4' in text
    spec = client.get("/openapi.json").json()
    assert {"/v1/score", "/v1/difference", "/v1/candidates", "/v1/queue/next",
            "/v1/candidates/{candidate_id}/label"} <= set(spec["paths"])


def test_promoted_model_is_picked_up_without_restart(tmp_path, ztf_triplets, live_server,
                                                    model_factory):
    stamps, candid, meta = ztf_triplets
    root = tmp_path / "models"
    add_version(root, model_factory(tmp_path / "a", seed=1), promote=True)
    app = create_app(_settings(tmp_path, model_check_s=0.0), model=root)
    store = app.state.store
    store.add_candidates(stamps[:10], meta.iloc[:10].assign(triplet_id=candid[:10]), "ztf",
                         scores=np.full(10, 0.5), model="old")
    with live_server(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        first = client.post("/v1/score", files={"file": ("b.npz", _npz(stamps))}).json()
        new_dir = model_factory(tmp_path / "b", seed=2)
        version = add_version(root, new_dir, promote=True)
        second = client.post("/v1/score", files={"file": ("b.npz", _npz(stamps))}).json()
        assert second["model"] != first["model"] and second["model"].startswith(version)
        np.testing.assert_allclose(second["scores"], score_triplets(stamps, new_dir), atol=1e-6)
        assert not np.allclose(first["scores"], second["scores"])
        # The review queue follows the new model: unlabelled candidates are rescored.
        deadline = time.monotonic() + 30
        while {c.model for c in store.query(limit=100)[0]} != {second["model"]}:
            assert time.monotonic() < deadline, "queue not rescored after promotion"
            time.sleep(0.05)
        got = pd.Series({c.id: c.score for c in store.query(limit=100)[0]})
        np.testing.assert_allclose(got[[f"ztf:{c}" for c in candid[:10]]],
                                   score_triplets(stamps[:10], new_dir), atol=1e-6)
        # A broken pointer keeps the last good model serving and says so in /healthz.
        (root / "current").write_text("v9999\n")
        third = client.post("/v1/score", files={"file": ("b.npz", _npz(stamps[:3]))}).json()
        assert third["model"] == second["model"]
        assert "v9999" in client.get("/healthz").json()["model_error"]


def test_difference_sync_and_background_job(live, shared_data):
    """A real DECam pair: differenced, detected, cut, scored and stored for review."""
    client, store = live
    folder = shared_data("diffpairs", "decam", "input_data")
    files = {"reference": ("ref.fits", (folder / "DEC-OBS18a.mini.fits").read_bytes()),
             "science": ("sci.fits", (folder / "DEC-OBS04a.mini.fits").read_bytes())}
    out = client.post("/v1/difference", files=files, data={"run": "decam"}, headers=AUTH)
    assert out.status_code == 200, out.text
    body = out.json()
    assert body["run"] == "decam" and body["n_candidates"] == len(body["candidates"]) >= 1
    assert 0.8 < body["quality"]["noise_ratio"] < 1.25
    for cand in body["candidates"]:
        assert 0 <= cand["score"] <= 1 and {"x", "y", "ra", "dec", "snr", "sign"} <= set(cand)
        stored = store.get(cand["id"])
        assert stored.run == "decam" and stored.score == pytest.approx(cand["score"])
    listed = client.get("/v1/candidates", params={"run": "decam"}).json()
    assert listed["total"] == body["n_candidates"]
    assert client.get(listed["candidates"][0]["stamps"]["diff"]).status_code == 200

    job = client.post("/v1/difference", files=files, data={"background": "true"}, headers=AUTH)
    assert job.status_code == 202, job.text
    deadline = time.monotonic() + 120
    while (state := client.get(job.json()["status_url"]).json())["status"] not in ("done", "failed"):
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    assert state["status"] == "done", state
    assert [c["score"] for c in state["result"]["candidates"]] == \
        pytest.approx([c["score"] for c in body["candidates"]])
    assert client.get("/v1/jobs/unknown").status_code == 404

    bad = client.post("/v1/difference", headers=AUTH,
                      files={"reference": ("ref.txt", b"x"), "science": files["science"]})
    assert bad.status_code == 400 and "ref.txt: the reference must be a FITS file" in bad.text
    corrupt = client.post("/v1/difference", headers=AUTH,
                          files={"reference": ("broken.fits", b"SIMPLE  = T" + b" " * 50),
                                 "science": files["science"]})
    assert corrupt.status_code == 400 and corrupt.json()["detail"].startswith("broken.fits")


def test_concurrent_reviewers_over_http(store_url, tmp_path, tiny_model, ztf_triplets,
                                        live_server):
    """Four clients label the queue at once (SQLite and PostgreSQL): each candidate is handed
    out once and every label arrives."""
    import threading

    stamps, candid, meta = ztf_triplets
    settings = _settings(tmp_path, db_url=store_url)
    app = create_app(settings, model=tiny_model)
    app.state.store.add_candidates(stamps, meta.assign(triplet_id=candid), "ztf",
                                   scores=score_triplets(stamps, tiny_model), model="tiny")
    handed, errors, lock = [], [], threading.Lock()

    def reviewer(name: str, url: str) -> None:
        try:
            with httpx.Client(base_url=url, timeout=60) as client:
                for _ in range(len(candid)):  # bounded
                    cand = client.get("/v1/queue/next", params={"reviewer": name}).json()
                    if cand["candidate"] is None:
                        return
                    cid = cand["candidate"]["id"]
                    with lock:
                        handed.append(cid)
                    r = client.post(f"/v1/candidates/{cid}/label", headers=AUTH,
                                    json={"label": "bogus", "reviewer": name})
                    assert r.status_code == 200, r.text
        except Exception as exc:  # surfaced below
            errors.append(exc)

    with live_server(app) as server:
        threads = [threading.Thread(target=reviewer, args=(f"r{i}", server.url))
                   for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert not errors, errors
    assert sorted(handed) == sorted(f"ztf:{c}" for c in candid)  # each exactly once
    store = app.state.store
    assert len(store.current_labels()) == len(candid) == len(store.history())
