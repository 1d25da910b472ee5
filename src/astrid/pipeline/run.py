"""Run a config end to end with resume: ``run_pipeline(settings, run_dir)``.

How resume works. Each stage of each item has an *input digest*: a hash of the stage's own
settings, the item's description (its input files' checksums for a local folder) and the
checksums of every output of the stages before it. A stage is skipped when its record in the
state store is ``ok``, its digest is unchanged and all its recorded outputs still have their
checksums; otherwise it and everything after it for that item are recomputed. So changing the
diff settings recomputes diff, stamps, score and the report, never the simulation; deleting or
corrupting one output recomputes exactly the stages that depend on it.

Outputs are written atomically by the stages; the state store is written only by this process,
one transaction per finished pair, so a run killed at any moment loses at most the pairs in
flight, and their temporary files are removed when the next run starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import shutil
import time
import traceback as tb
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from astrid.config import Settings
from astrid.errors import AstridError
from astrid.pipeline.plan import Chain, resolve_chain
from astrid.pipeline.stages import PAIR_STAGES, REPORT, StageContext
from astrid.pipeline.state import (
    BLOCKED,
    DONE,
    FAILED,
    SKIPPED,
    Event,
    StageRecord,
    StateStore,
    open_state,
)
from astrid.provenance import config_hash, file_sha256, versions

GLOBAL_ITEM = "*"


# --------------------------------------------------------------------------------------------
# Digests and verification
# --------------------------------------------------------------------------------------------

def _settings_value(settings: Settings, dotted: str):
    value = settings
    for part in dotted.split("."):
        value = getattr(value, part)
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def stage_settings_hash(settings: Settings, keys: tuple[str, ...], extra: dict | None = None) -> str:
    """The hash of the settings a stage depends on (plus e.g. the model files' checksums)."""
    payload = {key: _settings_value(settings, key) for key in keys}
    payload.update(extra or {})
    return config_hash(payload)


def input_digest(stage: str, settings_hash: str, base: dict, upstream: dict[str, dict]) -> str:
    """What a stage's result is a function of: its settings, the item and all upstream outputs."""
    blob = json.dumps({"stage": stage, "settings": settings_hash, "item": base,
                       "upstream": upstream}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def verify_outputs(run_dir: Path, record: StageRecord) -> bool:
    """True if every recorded output exists with its recorded checksum (or was dropped)."""
    if record.dropped:
        return True
    for rel, sha in record.outputs.items():
        path = run_dir / rel
        if not path.is_file() or file_sha256(path) != sha:
            return False
    return True


def _checksums(run_dir: Path, paths: list[Path]) -> dict[str, str]:
    out = {}
    for path in paths:
        path = Path(path)
        rel = path.relative_to(run_dir) if path.is_absolute() and path.is_relative_to(run_dir) \
            else path
        out[str(rel)] = file_sha256(run_dir / rel if not path.is_absolute() else path)
    return out


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, AstridError):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------------------------
# One item through its chain (runs in a worker for pairs)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChainTask:
    """Everything a worker needs to bring one item up to date (picklable)."""

    run_dir: str
    settings: Settings
    item: str
    data: dict
    stages: tuple[str, ...]
    selected: frozenset[str]
    hashes: dict[str, str]
    recorded: dict[str, StageRecord]
    upstream: dict[str, dict]  # outputs of whole-run stages the item depends on
    force: bool = False
    drop_raw: bool = False


@dataclass(frozen=True)
class ChainResult:
    item: str
    records: tuple[StageRecord, ...]
    events: tuple[Event, ...]


def run_chain(task: ChainTask, functions: dict | None = None) -> ChainResult:
    """Bring one item's stages up to date; never raises for a stage's own failure."""
    functions = functions or {name: stage.run for name, stage in PAIR_STAGES.items()}
    run_dir = Path(task.run_dir)
    ctx = StageContext(run_dir, task.settings, task.item, task.data)
    records: list[StageRecord] = []
    events: list[Event] = []

    first, upstream = first_invalid(task, run_dir)
    for name in task.stages[:first]:
        events.append(Event(name, task.item, SKIPPED))

    for name in task.stages[first:]:
        if name not in task.selected:
            events.append(_blocked(name, task.item))
            break
        digest = input_digest(name, task.hashes[name], task.data, upstream)
        start = time.perf_counter()
        try:
            with _no_inner_progress():
                paths = functions[name](ctx)
            outputs = _checksums(run_dir, paths)
        except Exception as exc:  # noqa: BLE001  (one item's failure must not stop the run)
            elapsed = time.perf_counter() - start
            reason = _one_line(exc)
            records.append(StageRecord(name, task.item, "failed", digest, {}, reason,
                                       tb.format_exc(), elapsed))
            events.append(Event(name, task.item, FAILED, reason, elapsed))
            break
        elapsed = time.perf_counter() - start
        records.append(StageRecord(name, task.item, "ok", digest, outputs, elapsed_s=elapsed))
        events.append(Event(name, task.item, DONE, None, elapsed))
        upstream[name] = outputs
    else:
        if task.drop_raw and "download" in task.stages and task.stages[-1] == "score":
            records = _drop_raw(run_dir, task, records)
    return ChainResult(task.item, tuple(records), tuple(events))


@contextlib.contextmanager
def _no_inner_progress() -> Iterator[None]:
    """Silence progress bars inside a stage (downloads, indexing): the run has its own bar."""
    from astrid.progress import is_quiet, set_quiet

    before = is_quiet()
    set_quiet(True)
    try:
        yield
    finally:
        set_quiet(before)


def first_invalid(task: ChainTask, run_dir: Path) -> tuple[int, dict[str, dict]]:
    """The index of the first stage to recompute (len(stages) if none), and the outputs above it.

    Walks the chain from the top: a stage stays valid while its record is ok, its input
    digest unchanged and its outputs verify. Outputs dropped on purpose (raw files) must come
    back when anything after them reruns, so the walk restarts at the first dropped stage.
    """
    upstream = dict(task.upstream)
    first = len(task.stages)
    for i, name in enumerate(task.stages):
        digest = input_digest(name, task.hashes[name], task.data, upstream)
        rec = task.recorded.get(name)
        forced = task.force and name in task.selected
        if (rec is None or not rec.ok or forced or rec.input_digest != digest
                or not verify_outputs(run_dir, rec)):
            first = i
            break
        upstream[name] = rec.outputs
    dropped = [i for i, name in enumerate(task.stages[:first])
               if task.recorded[name].dropped]
    if first < len(task.stages) and dropped:
        first = dropped[0]
        upstream = dict(task.upstream)
        for name in task.stages[:first]:
            upstream[name] = task.recorded[name].outputs
    return first, upstream


def _drop_raw(run_dir: Path, task: ChainTask, records: list[StageRecord]) -> list[StageRecord]:
    """Streaming mode: delete the downloaded images of a finished pair, keep their checksums."""
    fresh = {r.stage: r for r in records}
    rec = fresh.get("download") or task.recorded.get("download")
    if rec is None or rec.dropped:
        return records
    for rel in rec.outputs:
        (run_dir / rel).unlink(missing_ok=True)
    dropped = StageRecord(rec.stage, rec.item, rec.status, rec.input_digest, rec.outputs,
                          rec.error, rec.traceback, rec.elapsed_s, dropped=True)
    return [dropped if r.stage == "download" else r for r in records] + \
        ([] if "download" in fresh else [dropped])


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunSummary:
    """What one invocation did: counts per stage and action, the failures, the report path."""

    run_dir: Path
    run_id: int
    counts: dict[str, dict[str, int]]
    failures: tuple[Event, ...]
    elapsed_s: float
    report: Path | None = None
    items: tuple[str, ...] = field(default_factory=tuple)

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def done(self) -> int:
        return sum(c.get(DONE, 0) for c in self.counts.values())


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock (two runs writing one directory would corrupt it)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AstridError(f"{run_dir}: another run is using this run directory") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def remove_partial_files(run_dir: Path) -> int:
    """Delete the temporary files of writes a killed run left behind (``.*.part``)."""
    removed = 0
    for path in sorted(run_dir.rglob(".*.part"), reverse=True):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed += 1
    return removed


def stage_hashes(settings: Settings, chain: Chain) -> dict[str, str]:
    """The settings hash of every stage of the chain."""
    from astrid.pipeline.sources import SOURCE_STAGES

    hashes = {}
    for name in chain.stages:
        if name in PAIR_STAGES:
            keys = PAIR_STAGES[name].settings_keys
        elif name == "report":
            keys = REPORT.settings_keys
        else:
            keys = SOURCE_STAGES[name].settings_keys
        extra = {"model": model_digest(settings)} if name == "score" else None
        hashes[name] = stage_settings_hash(settings, keys, extra)
    return hashes


def model_digest(settings: Settings) -> str:
    """Checksums of the model files, so that a retrained model rescores everything."""
    from astrid.ml.score import default_model_dir

    model_dir = Path(settings.pipeline.model or default_model_dir())
    if not model_dir.is_dir():
        return "missing"
    # Only what scoring reads: the model's plots and reports may be rewritten freely.
    files = [model_dir / name for name in ("model.json", "model.onnx", "model.pt")]
    return config_hash({p.name: file_sha256(p) for p in files if p.is_file()})


def run_pipeline(settings: Settings, run_dir: Path, *, config_path: Path | None = None,
                 stage_spec: str | None = None, force: bool = False, limit: int | None = None,
                 command: str = "astrid run") -> RunSummary:
    """Execute (or resume) a run; see the module docstring for the resume rules.

    Parameters
    ----------
    settings : the settings (relative paths are taken from the current directory).
    run_dir : the run directory (created).
    stage_spec : ``--stage``: one stage name or a range ``A:B``; None for all.
    force : recompute the selected stages even where their outputs verify.
    limit : process only the first ``limit`` pairs (SNe for the archive source).

    Returns
    -------
    RunSummary
        Counts of done / skipped / failed / blocked per stage, and the failures.
    """
    from astrid.pipeline.executors import make_executor, preflight
    from astrid.pipeline.sources import discover_items, run_source_stages

    start = time.perf_counter()
    run_dir = Path(run_dir).resolve()
    chain = resolve_chain(settings.pipeline, stage_spec, config_path)
    preflight(settings.pipeline)
    with run_lock(run_dir):
        remove_partial_files(run_dir)
        with open_state(run_dir) as state:
            run_id = state.begin_run(command, config_hash(settings), settings.model_dump(mode="json"),
                                     versions())
            hashes = stage_hashes(settings, chain)
            status = "failed"
            try:
                events: list[Event] = []
                source_events, upstream = run_source_stages(state, run_id, run_dir, settings,
                                                            chain, hashes, force, limit)
                events += source_events
                items = discover_items(run_dir, settings, chain, limit)
                state.put_items(items)
                if items and chain.per_pair:
                    with contextlib.ExitStack() as stack:
                        executor = _LazyExecutor(stack, lambda: make_executor(settings.pipeline))
                        counted: frozenset[str] = frozenset()
                        for stages in _passes(settings, chain):
                            events += _run_pairs(executor, state, run_id, run_dir, settings,
                                                 chain, stages, hashes, items, upstream, force,
                                                 counted)
                            counted |= set(stages)
                report_path = None
                if chain.after:
                    report_events, report_path = _run_report(state, run_id, run_dir, settings,
                                                             chain, hashes, items, force)
                    events += report_events
                status = "failed" if any(e.action == FAILED for e in events) else "ok"
            finally:
                state.end_run(run_id, status)
    return _summarise(run_dir, run_id, chain, events, time.perf_counter() - start, report_path,
                      tuple(items))


def _passes(settings: Settings, chain: Chain) -> list[tuple[str, ...]]:
    """The per-pair stages in passes over all pairs.

    One pass normally: each task takes its pair through every stage. The archive source
    without ``streaming`` first downloads every pair (a pass of ``download`` alone), so that
    the archive is done with before the long computing starts.
    """
    full = chain.per_pair
    if settings.pipeline.source == "archive" and not settings.pipeline.streaming \
            and full[:1] == ("download",) and len(full) > 1:
        return [full[:1], full]
    return [full]


def _run_pairs(executor, state: StateStore, run_id: int, run_dir: Path, settings: Settings,
               chain: Chain, stages: tuple[str, ...], hashes: dict, items: dict, upstream: dict,
               force: bool, counted: frozenset[str] = frozenset()) -> list[Event]:
    """One pass of per-pair tasks; each finished pair is saved in one transaction."""
    from astrid.progress import track

    drop_raw = (settings.pipeline.source == "archive" and settings.pipeline.streaming
                and not settings.pipeline.keep_raw)
    tasks = []
    for item, data in items.items():
        recorded = {name: rec for name in stages if (rec := state.get(name, item))}
        tasks.append(ChainTask(str(run_dir), settings, item, data, stages, chain.selected,
                               hashes, recorded, upstream, force, drop_raw))
    events: list[Event] = []
    # Pairs with nothing to compute are settled here, so that a rerun with nothing to do
    # never starts a process pool or a Dask cluster.
    settled = [(task, _settled(task)) for task in tasks]
    todo = [task for task, result in settled if result is None]
    results = [(task, result) for task, result in settled if result is not None]
    if todo:
        results = itertools.chain(results, executor.get().map_unordered(run_chain, todo))
    for task, result in track(results, f"pairs ({', '.join(stages)})", total=len(tasks)):
        if isinstance(result, BaseException):
            result = _crashed(task, result)
        # A later pass sees the stages of an earlier one as verified: count them once.
        fresh = tuple(e for e in result.events if not (e.action == SKIPPED and e.stage in counted))
        state.save(result.records, fresh, run_id)
        events += fresh
    return events


def _blocked(stage: str, item: str) -> Event:
    return Event(stage, item, BLOCKED, f"stage '{stage}' is not done or out of date; run it first")


def _settled(task: ChainTask) -> ChainResult | None:
    """The result of a task that needs no worker (all verified, or blocked), else None."""
    first, _ = first_invalid(task, Path(task.run_dir))
    events = [Event(name, task.item, SKIPPED) for name in task.stages[:first]]
    if first == len(task.stages):
        return ChainResult(task.item, (), tuple(events))
    if task.stages[first] not in task.selected:
        name = task.stages[first]
        events.append(_blocked(name, task.item))
        return ChainResult(task.item, (), tuple(events))
    return None


class _LazyExecutor:
    """Start the executor on first use only (starting a Dask cluster takes seconds)."""

    def __init__(self, stack: contextlib.ExitStack, factory):
        self._stack, self._factory, self._executor = stack, factory, None

    def get(self):
        if self._executor is None:
            self._executor = self._stack.enter_context(self._factory())
        return self._executor


def _crashed(task: ChainTask, exc: BaseException) -> ChainResult:
    """A worker died under a task (killed, out of memory): a failure of the stage it was on.

    Which stage that was is not known; the first one that needed computing is blamed (its
    record was not valid anyway, so nothing verified is lost), and the pair is retried on the
    next run.
    """
    reason = f"worker lost while running this pair ({_one_line(exc)})"
    first, upstream = first_invalid(task, Path(task.run_dir))
    name = task.stages[min(first, len(task.stages) - 1)]
    digest = input_digest(name, task.hashes[name], task.data, upstream)
    record = StageRecord(name, task.item, "failed", digest, {}, reason)
    return ChainResult(task.item, (record,), (Event(name, task.item, FAILED, reason),))


def _run_report(state: StateStore, run_id: int, run_dir: Path, settings: Settings, chain: Chain,
                hashes: dict, items: dict, force: bool) -> tuple[list[Event], Path | None]:
    """The report depends on the last per-pair outputs of every item and their failures."""
    last = chain.per_pair[-1] if chain.per_pair else None
    inputs = {}
    for item in items:
        rec = state.get(last, item) if last else None
        inputs[item] = rec.outputs if rec and rec.ok else (rec.error if rec else None)
    task = ChainTask(str(run_dir), settings, GLOBAL_ITEM, {"pairs": inputs}, ("report",),
                     chain.selected, hashes, {"report": r} if (r := state.get("report",
                                                                              GLOBAL_ITEM)) else {},
                     {}, force)
    result = run_chain(task, {"report": REPORT.run})
    state.save(result.records, result.events, run_id)
    report = run_dir / "report.html"
    return list(result.events), (report if report.exists() else None)


def _summarise(run_dir: Path, run_id: int, chain: Chain, events: list[Event], elapsed_s: float,
               report: Path | None, items: tuple[str, ...]) -> RunSummary:
    counts: dict[str, dict[str, int]] = {name: {} for name in chain.stages}
    for e in events:
        counts.setdefault(e.stage, {})
        counts[e.stage][e.action] = counts[e.stage].get(e.action, 0) + 1
    failures = tuple(e for e in events if e.action == FAILED)
    return RunSummary(run_dir, run_id, counts, failures, elapsed_s, report, items)
