"""The label store and the review queue, on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from astrid.errors import AstridError
from astrid.serve.queue import next_candidate
from astrid.serve.store import LabelConflict, open_store


def _pool(store, n=40, run="r1", seed=0):
    """n candidates with random stamps and scores spread over [0, 1]."""
    rng = np.random.default_rng(seed)
    stamps = rng.normal(size=(n, 3, 63, 63)).astype(np.float32)
    stamps[0, 0, :3, :3] = np.nan  # NaN must survive the round trip
    scores = rng.uniform(0, 1, n)
    meta = pd.DataFrame({"triplet_id": [f"t{i}" for i in range(n)], "x": rng.uniform(0, 2048, n),
                         "y": rng.uniform(0, 2048, n), "snr": rng.uniform(5, 50, n),
                         "sign": rng.choice([-1, 1], n)})
    ids = store.add_candidates(stamps, meta, run, scores=scores, model="m@1")
    return ids, stamps, scores


def test_roundtrip_filters_and_sort(store_url):
    with open_store(store_url) as store:
        ids, stamps, scores = _pool(store, 30)
        again = store.add_candidates(stamps[:2], pd.DataFrame({"triplet_id": ["t0", "t1"]}), "r1")
        assert again == ids[:2] and store.counts()["candidates"] == 30  # re-import is a no-op
        np.testing.assert_array_equal(store.stamps([ids[5], ids[0]]),
                                      np.stack([stamps[5], stamps[0]]))
        got, total = store.query(score_min=0.25, score_max=0.75, sort="-score", limit=1000)
        expect = sorted((s for s in scores if 0.25 <= s <= 0.75), reverse=True)
        assert total == len(expect)
        np.testing.assert_allclose([c.score for c in got], expect)
        unc, _ = store.query(sort="uncertainty", limit=3)
        np.testing.assert_allclose([abs(c.score - 0.5) for c in unc],
                                   np.sort(np.abs(scores - 0.5))[:3])
        assert store.runs() == [{"run": "r1", "candidates": 30, "labelled": 0}]


def test_history_relabel_and_undo(store_url):
    with open_store(store_url) as store:
        ids, _, scores = _pool(store, 5)
        store.label(ids[0], "real", "alice", model="m@1", score_shown=scores[0])
        store.label(ids[0], "bogus", "bob", model="m@1", score_shown=scores[0])
        store.label(ids[1], 0, "bob")
        assert store.current_labels() == {ids[0]: 0, ids[1]: 0}
        undone = store.undo("bob")  # bob's latest: ids[1] -> back to unlabelled
        assert (undone.candidate_id, undone.label, undone.previous_label) == (ids[1], None, 0)
        undone = store.undo("bob")  # then ids[0] -> back to alice's "real"
        assert (undone.candidate_id, undone.label) == (ids[0], 1)
        assert store.undo("bob") is None
        assert store.current_labels() == {ids[0]: 1}
        hist = store.history(ids[0])
        assert [(h.action, h.label, h.previous_label, h.reviewer) for h in hist] == [
            ("label", 1, None, "alice"), ("label", 0, 1, "bob"), ("undo", 1, 0, "bob")]
        assert hist[0].model == "m@1" and hist[0].score_shown == pytest.approx(scores[0])
        assert hist[2].undoes == hist[1].id
        # The undone candidate is leased back to its reviewer, so the page shows it next.
        assert store.held_lease("bob").id == ids[0] or store.get(ids[0]).label == 1
        # Undo never overwrites a later label by someone else.
        store.label(ids[3], "real", "carol")
        store.label(ids[3], "bogus", "dave")
        with pytest.raises(LabelConflict, match="labelled again by dave"):
            store.undo("carol")
        assert store.current_labels()[ids[3]] == 0
        with pytest.raises(AstridError, match="real.*bogus"):
            store.label(ids[2], "maybe", "alice")
        with pytest.raises(KeyError):
            store.label("nope", "real", "alice")


def test_queue_uncertainty_first_and_mix(store_url):
    with open_store(store_url) as store:
        ids, _, scores = _pool(store, 40)
        first = next_candidate(store, "alice", high_score_share=0.0)
        assert first.id == ids[int(np.argmin(np.abs(scores - 0.5)))]
        assert next_candidate(store, "alice", high_score_share=0.0).id == first.id  # held lease
        store.label(first.id, "real", "alice")
        top = next_candidate(store, "alice", high_score_share=1.0)
        assert top.id == ids[int(np.argmax(scores))]
        store.skip(top.id, "alice")
        again = next_candidate(store, "alice", high_score_share=1.0)
        assert again.id != top.id  # a skipped candidate is not offered to the same reviewer
        assert next_candidate(store, "bob", high_score_share=1.0).id == top.id  # but to others
        # A seeded mix gives about the requested share of top-score hand-outs.
        rng = random.Random(3)
        kinds = Counter()
        for _ in range(20):
            c = next_candidate(store, "carol", high_score_share=0.3, rng=rng)
            free = [s for i, s in zip(ids, scores, strict=True) if store.get(i).label is None]
            kinds["high" if c.score >= np.quantile(free, 0.8) else "other"] += 1
            store.label(c.id, "bogus", "carol")
        assert 2 <= kinds["high"] <= 14


def test_queue_for_one_run(store_url):
    with open_store(store_url) as store:
        _pool(store, 5, run="a")
        ids_b, _, _ = _pool(store, 5, run="b", seed=1)
        got = {next_candidate(store, f"r{i}", run="b").id for i in range(5)}
        assert got == set(ids_b)
        assert next_candidate(store, "r9", run="b") is None
        assert next_candidate(store, "r9").run == "a"


def test_lease_expires(store_url):
    with open_store(store_url) as store:
        _pool(store, 3)
        a = next_candidate(store, "alice", lease_s=0.3, high_score_share=0)
        b = next_candidate(store, "bob", lease_s=0.3, high_score_share=0)
        assert a.id != b.id
        time.sleep(0.4)
        assert next_candidate(store, "bob", lease_s=60, high_score_share=0).id in (a.id, b.id)


def test_concurrent_reviewers_lose_nothing(store_url):
    """Six reviewers label a pool of 60 at once: every candidate is handed out exactly once
    and every label is stored."""
    n, reviewers = 60, [f"rev{i}" for i in range(6)]
    with open_store(store_url) as store:
        ids, _, _ = _pool(store, n)
    handed: list[tuple[str, str]] = []
    lock, errors = threading.Lock(), []

    def work(name: str) -> None:
        try:
            with open_store(store_url) as own:  # each reviewer its own connections
                for _ in range(n):  # bounded loop
                    cand = next_candidate(own, name, high_score_share=0.2)
                    if cand is None:
                        return
                    with lock:
                        handed.append((cand.id, name))
                    own.label(cand.id, "real" if cand.score > 0.5 else "bogus", name,
                              score_shown=cand.score, model=cand.model)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(r,)) for r in reviewers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    got = Counter(cid for cid, _ in handed)
    assert sorted(got) == sorted(ids) and max(got.values()) == 1
    with open_store(store_url) as store:
        assert len(store.current_labels()) == n
        hist = store.history()
        assert len(hist) == n
        assert {(h.candidate_id, h.reviewer) for h in hist} == set(handed)
        assert len({h.reviewer for h in hist}) > 1


def test_killed_writer_leaves_a_consistent_store(tmp_path):
    """A labelling process killed with SIGKILL mid-stream: every committed label is there,
    the history and the current view agree, and the file passes SQLite's integrity check."""
    url = f"sqlite:///{tmp_path / 'labels.db'}"
    with open_store(url) as store:
        ids, _, _ = _pool(store, 200)
    script = textwrap.dedent(f"""
        import sys
        from astrid.serve.store import LabelConflict, open_store
        store = open_store({url!r})
        for i, cid in enumerate({ids!r}):
            store.label(cid, i % 2, "writer")
            print(i, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    confirmed = -1
    for line in proc.stdout:  # kill once a few labels are confirmed committed
        confirmed = int(line)
        if confirmed >= 20:
            proc.kill()
            break
    proc.wait(timeout=30)
    proc.stdout.close()
    with open_store(url) as store:
        current = store.current_labels()
        hist = store.history()
        assert len(current) >= confirmed + 1
        assert len(hist) == len(current)
        assert all(current[h.candidate_id] == h.label for h in hist)
    import sqlite3

    with sqlite3.connect(tmp_path / "labels.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_bad_urls():
    with pytest.raises(AstridError, match="sqlite:///FILE or postgresql"):
        open_store("mysql://x")
    with pytest.raises(AstridError, match="in-memory"):
        open_store("sqlite:///:memory:")
    with pytest.raises(AstridError, match="cannot connect to PostgreSQL"):
        open_store("postgresql://nobody:secret@127.0.0.1:1/none")


def test_import_dataset_and_run_directory(tmp_path):
    """A triplet dataset, or every pair's dataset of a run directory, becomes review
    candidates; importing again changes nothing."""
    from astrid.ml.data import DatasetWriter
    from astrid.serve.queue import import_candidates

    rng = np.random.default_rng(2)
    run = tmp_path / "night1"
    for pair in ("p1", "p2"):
        with DatasetWriter(run / "pairs" / pair / "triplets", 63) as writer:
            writer.append(rng.normal(size=(4, 3, 63, 63)).astype(np.float32),
                          pd.DataFrame({"triplet_id": [f"{pair}-{i}" for i in range(4)],
                                        "x": rng.uniform(0, 100, 4), "kind": "sn"}))
    with open_store(f"sqlite:///{tmp_path / 'l.db'}") as store:
        n = import_candidates(store, run, score=lambda s: np.nanmax(s, axis=(1, 2, 3)) / 10,
                              model="toy")
        assert n == 8 and import_candidates(store, run) == 8
        cands, total = store.query(limit=100)
        assert total == 8 and cands[0].id == "night1:p1:p1-0" and cands[0].model == "toy"
        assert store.runs() == [{"run": "night1", "candidates": 8, "labelled": 0}]
        n = import_candidates(store, run / "pairs" / "p2" / "triplets", run="p2 only")
        assert n == 4 and store.runs()[1] == {"run": "p2_only", "candidates": 4, "labelled": 0}
        with pytest.raises(AstridError, match="neither a triplet dataset"):
            import_candidates(store, tmp_path)
