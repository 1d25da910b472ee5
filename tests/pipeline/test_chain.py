"""The resume rules of one item's chain, with small stage functions that write real files.

(The library stages are exercised end to end in test_run.py; here the rules themselves:
digests, verification, dropped raw files in streaming mode, blocked stages.)
"""

from __future__ import annotations

from pathlib import Path

from astrid.config import Settings
from astrid.pipeline.run import ChainTask, run_chain
from astrid.pipeline.state import BLOCKED, DONE, SKIPPED

STAGES = ("download", "diff", "stamps", "score")


def _writer(name: str, calls: list[str]):
    def stage(ctx) -> list[Path]:
        calls.append(name)
        path = ctx.pair_dir / f"{name}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        upstream = sorted(p.name for p in ctx.pair_dir.glob("*.txt"))
        path.write_text(f"{name} from {upstream}\n")
        return [path]
    return stage


def _task(run_dir: Path, recorded: dict, *, drop_raw=False, selected=STAGES, hashes=None):
    hashes = hashes or {name: "h" for name in STAGES}
    return ChainTask(str(run_dir), Settings(), "p1", {"sn": "SN1"}, STAGES, frozenset(selected),
                     hashes, recorded, {}, False, drop_raw)


def _run(run_dir, recorded, calls, **kw):
    functions = {name: _writer(name, calls) for name in STAGES}
    result = run_chain(_task(run_dir, recorded, **kw), functions)
    recorded = {**recorded, **{r.stage: r for r in result.records}}
    return result, recorded


def test_streaming_drops_raw_files_and_fetches_them_again_only_when_needed(tmp_path):
    calls: list[str] = []
    result, recorded = _run(tmp_path, {}, calls, drop_raw=True)
    assert calls == list(STAGES)
    assert not (tmp_path / "pairs" / "p1" / "download.txt").exists()
    assert recorded["download"].dropped and recorded["download"].outputs

    # Nothing changed: nothing runs, and the dropped file is not wanted back.
    calls.clear()
    result, recorded = _run(tmp_path, recorded, calls, drop_raw=True)
    assert calls == [] and {e.action for e in result.events} == {SKIPPED}

    # The stamps settings change: the raw images are fetched again, and the chain reruns from
    # there (the simple rule: everything after a re-fetched input), then they are dropped again.
    calls.clear()
    hashes = {name: "h" for name in STAGES} | {"stamps": "new"}
    result, recorded = _run(tmp_path, recorded, calls, drop_raw=True, hashes=hashes)
    assert calls == list(STAGES)
    assert recorded["download"].dropped
    assert not (tmp_path / "pairs" / "p1" / "download.txt").exists()


def test_a_stage_outside_the_selection_blocks_its_item(tmp_path):
    calls: list[str] = []
    result, _ = _run(tmp_path, {}, calls, selected=("download",))
    assert calls == ["download"]
    assert [(e.stage, e.action) for e in result.events] == [("download", DONE), ("diff", BLOCKED)]
