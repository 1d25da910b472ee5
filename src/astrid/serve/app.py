"""The AstrID HTTP service: scoring, differencing, candidates, labels and the review page.

``create_app(settings, model=..., db_url=...)`` builds the FastAPI application; ``astrid serve``
runs it with uvicorn. Everything is under ``/v1`` except ``/healthz``, ``/metrics`` (Prometheus
text format), ``/review`` (the review page) and the OpenAPI pages (``/docs``, ``/openapi.json``).

Authorisation: endpoints that change state (labels, skips, undo, differencing, which stores its
candidates) need ``Authorization: Bearer TOKEN``, the token being ``serve.token`` in the config
or ``ASTRID_TOKEN`` in the environment. No header -> 401, wrong token -> 403. Reads (scoring,
listing, stamps, the queue) are open when ``serve.open_reads`` is true, else need the token too.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

import astrid
from astrid.config import Settings
from astrid.errors import AstridError
from astrid.ml.retrain import is_models_root, model_version, pointer_path, resolve_model_dir
from astrid.ml.score import default_model_dir
from astrid.serve import queue as review_queue
from astrid.serve.payload import FITS_SUFFIXES, PayloadTooLarge, read_upload
from astrid.serve.render import CHANNELS, stamp_png
from astrid.serve.store import Candidate, LabelConflict, LabelStore, open_store

HERE = Path(__file__).resolve().parent
_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


# --------------------------------------------------------------------------------------------
# The model in use
# --------------------------------------------------------------------------------------------

class ModelHolder:
    """The model the service scores with; follows a models root's ``current`` pointer.

    With a models root, the pointer's mtime is checked at most every ``check_every_s`` seconds
    (on the request path; a stat is microseconds), and a changed pointer switches the model
    for the next request without a restart. ``on_change`` is called with the new holder state
    (the service uses it to rescore the review queue).
    """

    def __init__(self, path: str | Path | None, *, check_every_s: float = 1.0, on_change=None):
        self.path = Path(path) if path is not None else default_model_dir()
        self.check_every_s = check_every_s
        self.on_change = on_change
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._checked = 0.0
        self.model_dir: Path | None = None
        self.version: str | None = None
        self.error: str | None = None
        self.refresh(force=True)

    def _pointer_stamp(self) -> tuple | None:
        if not is_models_root(self.path):
            return None
        st = pointer_path(self.path).stat()
        return st.st_mtime_ns, st.st_size, st.st_ino

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < self.check_every_s:
            return
        with self._lock:
            if not force and now - self._checked < self.check_every_s:
                return
            self._checked = now
            try:
                stamp = self._pointer_stamp()
                if not force and stamp == self._stamp:
                    return
                model_dir = resolve_model_dir(self.path)
                version = model_version(model_dir)
            except (AstridError, OSError) as exc:
                # Keep serving the last good model; report the problem in /healthz.
                self.error = str(exc)
                return
            changed = version != self.version
            self._stamp, self.model_dir, self.version, self.error = stamp, model_dir, version, None
        if changed and not force and self.on_change is not None:
            self.on_change(self)

    def current(self) -> tuple[Path, str]:
        self.refresh()
        if self.model_dir is None:
            raise HTTPException(503, f"no model loaded: {self.error}")
        return self.model_dir, self.version

    def score(self, stamps: np.ndarray) -> tuple[np.ndarray, str]:
        """Scores (N,) in [0, 1] for raw triplets, and the model version that gave them."""
        from astrid.ml.score import score_triplets

        model_dir, version = self.current()
        return np.asarray(score_triplets(stamps, model_dir=model_dir), dtype=float), version


# --------------------------------------------------------------------------------------------
# Metrics (Prometheus text exposition format)
# --------------------------------------------------------------------------------------------

class Metrics:
    """Request counts, latency histograms and scores served, thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter = Counter()
        self.latency_counts: dict[tuple, list[int]] = defaultdict(
            lambda: [0] * (len(_LATENCY_BUCKETS_S) + 1))
        self.latency_sum: Counter = Counter()
        self.scores_served = 0
        self.labels_written = 0

    def observe(self, method: str, route: str, status: int, elapsed_s: float) -> None:
        with self._lock:
            self.requests[(method, route, status)] += 1
            counts = self.latency_counts[(method, route)]
            counts[np.searchsorted(_LATENCY_BUCKETS_S, elapsed_s)] += 1
            self.latency_sum[(method, route)] += elapsed_s

    def add(self, scores: int = 0, labels: int = 0) -> None:
        with self._lock:
            self.scores_served += scores
            self.labels_written += labels

    def render(self, model_version: str | None) -> str:
        out = ["# HELP astrid_requests_total HTTP requests by method, route and status.",
               "# TYPE astrid_requests_total counter"]
        with self._lock:
            for (method, route, status), n in sorted(self.requests.items()):
                out.append(f'astrid_requests_total{{method="{method}",route="{route}",'
                           f'status="{status}"}} {n}')
            out += ["# HELP astrid_request_seconds Request latency.",
                    "# TYPE astrid_request_seconds histogram"]
            for (method, route), counts in sorted(self.latency_counts.items()):
                labels = f'method="{method}",route="{route}"'
                cumulative = np.cumsum(counts)
                for le, c in zip(_LATENCY_BUCKETS_S, cumulative, strict=False):
                    out.append(f'astrid_request_seconds_bucket{{{labels},le="{le}"}} {c}')
                out.append(f'astrid_request_seconds_bucket{{{labels},le="+Inf"}} {cumulative[-1]}')
                out.append(f"astrid_request_seconds_sum{{{labels}}} "
                           f"{self.latency_sum[(method, route)]:.6f}")
                out.append(f"astrid_request_seconds_count{{{labels}}} {cumulative[-1]}")
            out += ["# HELP astrid_scores_served_total Triplets scored.",
                    "# TYPE astrid_scores_served_total counter",
                    f"astrid_scores_served_total {self.scores_served}",
                    "# HELP astrid_labels_written_total Labels and undos stored.",
                    "# TYPE astrid_labels_written_total counter",
                    f"astrid_labels_written_total {self.labels_written}"]
        out += ["# HELP astrid_model_info The model in use.", "# TYPE astrid_model_info gauge",
                f'astrid_model_info{{version="{model_version or ""}"}} 1']
        return "\n".join(out) + "\n"


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413, whether its
    ``Content-Length`` says so up front or a chunked upload streams past the limit (so an
    oversized upload is never spooled to disk in full)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _message(self, size: str) -> str:
        return (f"request body {size}exceeds the {self.max_bytes / 2**20:g} MiB limit "
                "(serve.max_upload_mb)")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse(
                {"detail": self._message(f"of {int(declared) / 2**20:.1f} MiB ")}, status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # FastAPI re-raises an HTTPException met while reading the body.
                    raise HTTPException(413, self._message(""))
            return message

        await self.app(scope, limited_receive, send)


# --------------------------------------------------------------------------------------------
# Difference jobs
# --------------------------------------------------------------------------------------------

@dataclass
class Job:
    """A differencing request run in the background (big images)."""

    id: str
    run: str
    status: Literal["queued", "running", "done", "failed"] = "queued"
    created_s: float = field(default_factory=time.time)
    finished_s: float | None = None
    error: str | None = None
    internal: bool = False  # failed by a bug, not by the user's input
    result: dict | None = None

    def to_dict(self) -> dict:
        return {"job_id": self.id, "run": self.run, "status": self.status, "error": self.error,
                "created_s": self.created_s, "finished_s": self.finished_s,
                "result": self.result}


def difference_and_score(ref_path: Path, sci_path: Path, settings: Settings,
                         holder: ModelHolder, store: LabelStore, run: str) -> dict:
    """Difference (ZOGY by default) -> candidates -> triplets -> scores, stored for review.

    Returns the JSON answer: ``run``, ``model``, ``quality`` and ``candidates`` (one dict per
    detection with its id in the store and its score).
    """
    from astrid.detect.stamps import cut_triplets
    from astrid.diff import difference

    result, cands = difference(ref_path, sci_path, diff_settings=settings.diff,
                               detect_settings=settings.detect)
    size = settings.stamps.size_px
    if len(cands):
        stamps, edge = cut_triplets(result.sci, result.ref, result.diff,
                                    cands["x"].to_numpy(), cands["y"].to_numpy(), size=size)
        scores, version = holder.score(stamps)
    else:
        stamps, edge = np.zeros((0, 3, size, size), np.float32), np.zeros(0, bool)
        scores, version = np.zeros(0), holder.current()[1]
    cands = cands.reset_index(drop=True).assign(edge=edge, triplet_id=np.arange(len(cands)))
    ids = store.add_candidates(stamps, cands, run, scores=scores, model=version)
    rows = cands.assign(id=ids, score=scores).to_dict(orient="records")
    return {"run": run, "model": version, "quality": _jsonable(result.quality),
            "n_candidates": len(rows), "candidates": _jsonable(rows)}


def _jsonable(obj: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python, recursively (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


# --------------------------------------------------------------------------------------------
# Request bodies
# --------------------------------------------------------------------------------------------

class LabelIn(BaseModel):
    label: Literal["real", "bogus", 1, 0] = Field(description="'real' (1) or 'bogus' (0)")
    reviewer: str = Field(min_length=1, max_length=100)
    model: str | None = Field(None, description="model version shown (default: the stored one)")
    score_shown: float | None = Field(None, description="score shown (default: the stored one)")


class ReviewerIn(BaseModel):
    reviewer: str = Field(min_length=1, max_length=100)


# --------------------------------------------------------------------------------------------
# The application
# --------------------------------------------------------------------------------------------

def create_app(settings: Settings | None = None, *, model: str | Path | None = None,
               db_url: str | None = None, token: str | None = None) -> FastAPI:
    """Build the service.

    Parameters
    ----------
    settings : all settings (``serve`` for the service, ``diff``/``detect``/``stamps`` for
        ``/v1/difference``).
    model : a model directory or a models root (followed as it changes); default the
        ``serve.model`` setting, else the packaged default model.
    db_url : the label store (default ``serve.db_url``).
    token : the write token (default ``serve.token``, else ``ASTRID_TOKEN``). With no token at
        all, every write is refused (403).
    """
    settings = settings or Settings()
    cfg = settings.serve
    token = token or cfg.token or os.environ.get("ASTRID_TOKEN") or None
    store = open_store(db_url or cfg.db_url)
    metrics = Metrics()
    jobs: dict[str, Job] = {}
    jobs_lock = threading.Lock()
    workers = ThreadPoolExecutor(max_workers=1, thread_name_prefix="astrid-job")

    def rescore_queue(holder: ModelHolder) -> None:
        if cfg.rescore_on_model_change:
            workers.submit(review_queue.rescore, store, lambda s: holder.score(s)[0],
                           holder.version)

    holder = ModelHolder(model if model is not None else cfg.model,
                         check_every_s=cfg.model_check_s, on_change=rescore_queue)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        workers.shutdown(wait=True, cancel_futures=True)
        store.close()

    app = FastAPI(
        lifespan=lifespan, title="AstrID", version=astrid.__version__,
        description="Real/bogus scoring, ZOGY differencing, candidate review and labels. "
                    "Write endpoints need `Authorization: Bearer TOKEN`.",
        openapi_tags=[{"name": "scoring"}, {"name": "candidates"}, {"name": "labels"},
                      {"name": "review"}, {"name": "service"}])
    app.state.store, app.state.holder, app.state.metrics = store, holder, metrics

    # -- auth ---------------------------------------------------------------------------

    def _check_token(request: Request) -> None:
        header = request.headers.get("authorization", "")
        if not header:
            raise HTTPException(401, "missing Authorization: Bearer TOKEN header",
                                headers={"WWW-Authenticate": "Bearer"})
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise HTTPException(401, "Authorization header must be 'Bearer TOKEN'",
                                headers={"WWW-Authenticate": "Bearer"})
        if token is None:
            raise HTTPException(403, "writes are disabled: the server has no token configured "
                                     "(set serve.token or ASTRID_TOKEN)")
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(403, "invalid token")

    def require_write(request: Request) -> None:
        _check_token(request)

    def require_read(request: Request) -> None:
        if not cfg.open_reads:
            _check_token(request)

    Write = Depends(require_write)
    Read = Depends(require_read)

    # -- errors, limits, metrics --------------------------------------------------------

    @app.exception_handler(PayloadTooLarge)
    async def _too_large(request: Request, exc: PayloadTooLarge):
        return JSONResponse({"detail": str(exc)}, status_code=413)

    @app.exception_handler(LabelConflict)
    async def _conflict(request: Request, exc: LabelConflict):
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(AstridError)
    async def _user_error(request: Request, exc: AstridError):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    max_bytes = int(cfg.max_upload_mb * 2**20)
    app.add_middleware(BodyLimit, max_bytes=max_bytes)

    @app.middleware("http")
    async def _observe(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", None) or "unmatched"
        metrics.observe(request.method, path, response.status_code, time.perf_counter() - start)
        return response

    def _read_file(upload: UploadFile) -> bytes:
        # BodyLimit already bounds the whole request; this names the file at fault.
        data = upload.file.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise PayloadTooLarge(f"{upload.filename}: upload exceeds the {cfg.max_upload_mb:g} "
                                  "MiB limit (serve.max_upload_mb)")
        return data

    # -- service ------------------------------------------------------------------------

    @app.get("/healthz", tags=["service"], summary="Liveness, model and store")
    def healthz() -> dict:
        holder.refresh()
        return {"status": "ok" if holder.model_dir is not None else "degraded",
                "version": astrid.__version__, "model": holder.version,
                "model_error": holder.error, "store": store.engine, **store.counts()}

    @app.get("/metrics", tags=["service"], response_class=PlainTextResponse,
             summary="Prometheus metrics: requests, latency, scores served")
    def metrics_endpoint() -> str:
        return metrics.render(holder.version)

    @app.get("/v1/model", tags=["service"], dependencies=[Read], summary="The model in use")
    def model_info() -> dict:
        import json

        model_dir, version = holder.current()
        info = json.loads((model_dir / "model.json").read_text())
        return {"version": version, "path": str(model_dir), "info": _jsonable(info)}

    # -- scoring ------------------------------------------------------------------------

    @app.post("/v1/score", tags=["scoring"], dependencies=[Read],
              summary="Score uploaded triplets (.npz sci/ref/diff, FITS stamps, alert packets)")
    def score(file: Annotated[UploadFile, File(description=".npz, .fits or alert packets")]) -> dict:
        trip = read_upload(file.filename or "", _read_file(file), max_batch=cfg.max_batch)
        scores, version = holder.score(trip.stamps)
        metrics.add(scores=len(scores))
        return {"model": version, "n": len(scores), "ids": _jsonable(trip.ids),
                "scores": _jsonable(scores.tolist()),
                "problems": _jsonable(trip.problems.to_dict(orient="records"))}

    @app.post("/v1/difference", tags=["scoring"], dependencies=[Write],
              summary="Difference a reference and a science FITS image, detect and score")
    def difference(reference: Annotated[UploadFile, File(description="reference FITS")],
                   science: Annotated[UploadFile, File(description="science FITS")],
                   run: Annotated[str | None, Form(description="run name in the store")] = None,
                   background: Annotated[bool, Form(
                       description="run as a background job even for a small image")] = False,
                   ) -> JSONResponse:
        from astrid.fitsio import read_image

        job_id = uuid.uuid4().hex[:12]
        run_name = review_queue.safe_run_name(run or f"upload-{job_id}")
        tmp = Path(tempfile.mkdtemp(prefix=f"astrid-diff-{job_id}-"))
        paths: dict[str, Path] = {}
        names: dict[str, str] = {}  # temporary path -> the client's file name, for messages

        def user_message(exc: BaseException) -> str:
            text = str(exc)
            for path, name in names.items():
                text = text.replace(path, name)
            return text

        try:
            for role, upload in (("reference", reference), ("science", science)):
                name = (upload.filename or "").lower()
                suffix = next((s for s in (*FITS_SUFFIXES, ".fz") if name.endswith(s)), None)
                if suffix is None:
                    raise AstridError(f"{upload.filename}: the {role} must be a FITS file "
                                      "(.fits, .fits.gz, .fz)")
                paths[role] = tmp / f"{role}{suffix}"
                names[str(paths[role])] = upload.filename or role
                paths[role].write_bytes(_read_file(upload))
            n_pixels = max(read_image(p).data.size for p in paths.values())
        except AstridError as exc:
            _remove(tmp)
            raise AstridError(user_message(exc)) from None
        except BaseException:
            _remove(tmp)
            raise
        job = Job(job_id, run_name)

        def work() -> None:
            job.status = "running"
            try:
                job.result = difference_and_score(paths["reference"], paths["science"],
                                                  settings, holder, store, run_name)
                job.status = "done"
                metrics.add(scores=job.result["n_candidates"])
            except AstridError as exc:
                job.status, job.error = "failed", user_message(exc)
            except Exception as exc:  # a job must report, never vanish
                job.status, job.internal = "failed", True
                job.error = f"internal error: {type(exc).__name__}: {user_message(exc)}"
            finally:
                job.finished_s = time.time()
                _remove(tmp)

        if n_pixels <= cfg.difference_sync_max_px and not background:
            work()
            if job.status == "failed":
                raise HTTPException(500, job.error) if job.internal else AstridError(job.error)
            return JSONResponse({"job_id": job_id, **job.result})
        with jobs_lock:
            # Finished jobs are kept an hour for polling, then forgotten.
            for old_id in [k for k, j in jobs.items()
                           if j.finished_s is not None and j.finished_s < time.time() - 3600]:
                del jobs[old_id]
            jobs[job_id] = job
        workers.submit(work)
        return JSONResponse({**job.to_dict(), "status_url": f"/v1/jobs/{job_id}"}, status_code=202)

    @app.get("/v1/jobs/{job_id}", tags=["scoring"], dependencies=[Read],
             summary="Status and result of a background differencing job")
    def job_status(job_id: str) -> dict:
        job = jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return job.to_dict()

    # -- candidates -----------------------------------------------------------------------

    def _candidate_json(cand: Candidate) -> dict:
        base = f"/v1/candidates/{_quote(cand.id)}"
        return {**_jsonable(cand.to_dict()),
                "stamps": {ch: f"{base}/stamp/{ch}.png" for ch in CHANNELS}}

    def _get(candidate_id: str) -> Candidate:
        cand = store.get(candidate_id)
        if cand is None:
            raise HTTPException(404, f"no candidate {candidate_id!r}")
        return cand

    @app.get("/v1/candidates", tags=["candidates"], dependencies=[Read],
             summary="List candidates with filters")
    def list_candidates(
            run: str | None = None,
            score_min: Annotated[float | None, Query(ge=0, le=1)] = None,
            score_max: Annotated[float | None, Query(ge=0, le=1)] = None,
            label: Literal["any", "unlabelled", "labelled", "real", "bogus"] = "any",
            sort: Literal["id", "score", "-score", "uncertainty", "snr", "-snr", "created"] = "id",
            limit: Annotated[int, Query(ge=1, le=1000)] = 100,
            offset: Annotated[int, Query(ge=0)] = 0) -> dict:
        cands, total = store.query(run=run, score_min=score_min, score_max=score_max,
                                   label=label, sort=sort, limit=limit, offset=offset)
        return {"total": total, "offset": offset, "candidates": [_candidate_json(c) for c in cands]}

    @app.get("/v1/runs", tags=["candidates"], dependencies=[Read],
             summary="Runs in the store with candidate and label counts")
    def runs() -> dict:
        return {"runs": store.runs()}

    @app.get("/v1/candidates/{candidate_id}", tags=["candidates"], dependencies=[Read],
             summary="One candidate: numbers, score, label, history and stamp URLs")
    def get_candidate(candidate_id: str) -> dict:
        cand = _get(candidate_id)
        return {**_candidate_json(cand),
                "history": [r.to_dict() for r in store.history(candidate_id)]}

    @app.get("/v1/candidates/{candidate_id}/stamp/{channel}.png", tags=["candidates"],
             dependencies=[Read], response_class=Response,
             summary="A stamp as PNG (asinh; science and reference share one colour range)")
    def get_stamp(candidate_id: str, channel: Literal["sci", "ref", "diff"]) -> Response:
        _get(candidate_id)
        png = stamp_png(store.stamps([candidate_id])[0], channel)
        return Response(png, media_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600"})

    # -- labels and the review queue ----------------------------------------------------

    @app.post("/v1/candidates/{candidate_id}/label", tags=["labels"], dependencies=[Write],
              summary="Label a candidate real or bogus")
    def label(candidate_id: str, body: LabelIn) -> dict:
        cand = _get(candidate_id)
        record = store.label(candidate_id, body.label, body.reviewer,
                             model=body.model if body.model is not None else cand.model,
                             score_shown=body.score_shown if body.score_shown is not None
                             else cand.score)
        metrics.add(labels=1)
        return {"label": record.to_dict()}

    @app.post("/v1/candidates/{candidate_id}/skip", tags=["labels"], dependencies=[Write],
              summary="Pass on a candidate (it is not offered to this reviewer again)")
    def skip(candidate_id: str, body: ReviewerIn) -> dict:
        _get(candidate_id)
        store.skip(candidate_id, body.reviewer)
        return {"skipped": candidate_id}

    @app.post("/v1/labels/undo", tags=["labels"], dependencies=[Write],
              summary="Undo the reviewer's latest label; the candidate is leased back to them")
    def undo(body: ReviewerIn) -> dict:
        record = store.undo(body.reviewer, lease_s=cfg.lease_s)
        if record is None:
            raise HTTPException(404, f"nothing to undo for reviewer {body.reviewer!r}")
        metrics.add(labels=1)
        return {"undone": record.to_dict(),
                "candidate": _candidate_json(_get(record.candidate_id))}

    @app.get("/v1/labels", tags=["labels"], dependencies=[Read],
             summary="The label history (append-only), optionally for one candidate")
    def labels(candidate_id: str | None = None) -> dict:
        return {"labels": [r.to_dict() for r in store.history(candidate_id)]}

    @app.get("/v1/queue/next", tags=["review"], dependencies=[Read],
             summary="Lease the next candidate to review (most uncertain first)")
    def queue_next(reviewer: Annotated[str, Query(min_length=1, max_length=100)],
                   run: Annotated[str | None, Query(description="only this run")] = None
                   ) -> dict:
        cand = review_queue.next_candidate(store, reviewer, run=run, lease_s=cfg.lease_s,
                                           high_score_share=cfg.high_score_share)
        counts = store.counts()
        return {"candidate": None if cand is None else _candidate_json(cand),
                "lease_s": cfg.lease_s, "remaining": counts["candidates"] - counts["labelled"]}

    # -- review page ----------------------------------------------------------------------

    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.get("/review", tags=["review"], response_class=FileResponse,
             summary="The review page (r = real, b = bogus, s = skip, u = undo)")
    def review_page() -> FileResponse:
        return FileResponse(HERE / "templates" / "review.html", media_type="text/html")

    @app.get("/", include_in_schema=False)
    def root() -> Response:
        return Response(status_code=307, headers={"Location": "/review"})

    return app


def _quote(candidate_id: str) -> str:
    from urllib.parse import quote

    return quote(candidate_id, safe="")


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
