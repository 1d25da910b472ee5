"""The SQLite state store: WAL mode, atomic saves, history kept across runs."""

import sqlite3

import pytest

from astrid.errors import AstridError
from astrid.pipeline.state import DONE, FAILED, Event, StageRecord, open_state


def test_state_store_is_wal_and_round_trips_records(tmp_path):
    with open_state(tmp_path) as state:
        run_id = state.begin_run("astrid run x.yaml", "abc", {"sim": {}}, {"astrid": "0"})
        ok = StageRecord("diff", "p1", "ok", "d1", {"pairs/p1/diff/diff.fits": "f" * 64},
                         elapsed_s=1.5)
        bad = StageRecord("diff", "p2", "failed", "d2", {}, "p2/ref.fits: truncated FITS file")
        state.save([ok, bad], [Event("diff", "p1", DONE), Event("diff", "p2", FAILED, bad.error)],
                   run_id)
        state.end_run(run_id, "failed")
    db = sqlite3.connect(tmp_path / "state.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    with open_state(tmp_path, create=False) as state:
        got = state.get("diff", "p1")
        assert got.ok and got.outputs == ok.outputs and got.run_id == run_id
        assert state.get("diff", "p2").error == "p2/ref.fits: truncated FITS file"
        assert [e.action for e in state.events()] == [DONE, FAILED]
        assert state.runs()[0]["status"] == "failed"


def test_a_failed_save_leaves_nothing(tmp_path):
    with open_state(tmp_path) as state:
        run_id = state.begin_run("x", "h", {}, {})
        good = StageRecord("diff", "p1", "ok", "d", {"a": "b"})
        with pytest.raises(TypeError):
            # The second record cannot be serialised: the whole save must roll back.
            state.save([good, StageRecord("diff", "p2", "ok", "d", {"a": object()})], [], run_id)
        assert state.get("diff", "p1") is None


def test_runs_are_appended_never_overwritten(tmp_path):
    with open_state(tmp_path) as state:
        first = state.begin_run("one", "h1", {}, {})
        second = state.begin_run("two", "h2", {}, {})
        assert second > first
        assert [r["command"] for r in state.runs()] == ["one", "two"]


def test_not_a_run_directory_is_a_one_line_error(tmp_path):
    with pytest.raises(AstridError, match="not a run directory"):
        open_state(tmp_path / "nothing", create=False)
    (tmp_path / "state.sqlite").write_text("this is not a database")
    with pytest.raises(AstridError, match="not a usable state store"):
        open_state(tmp_path)
