"""The active-learning review queue: which candidate a reviewer should label next.

Uncertainty sampling (Settles 2009, "Active Learning Literature Survey", §3.1): a label is worth
most where the model is least sure, so the queue hands out the candidates whose score is
closest to 0.5 first. A share of hand-outs instead goes to the highest scores, so reviewers
also see (and confirm) the likely discoveries, as on survey scanning pages.

Every hand-out is a lease in the store: a candidate leased to one reviewer is never handed to
another until the lease expires or the candidate is labelled or skipped.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from astrid.errors import AstridError
from astrid.serve.store import Candidate, LabelStore

#: How many of the best-ranked free candidates to try before giving up in one call; several
#: reviewers asking at the same instant race for the first ones, the losers take the next.
_TRY_TOP = 32


def next_candidate(store: LabelStore, reviewer: str, *, run: str | None = None,
                   lease_s: float = 600.0, high_score_share: float = 0.2,
                   rng: random.Random | None = None) -> Candidate | None:
    """Lease the next candidate to ``reviewer`` (``None`` when nothing is left).

    A reviewer who already holds a lease on an unlabelled candidate gets that one again, so
    reloading the review page does not skip anything.

    Parameters
    ----------
    store : the label store.
    reviewer : who asks.
    run : only candidates of this run (default: any).
    lease_s : how long the candidate stays reserved for them, seconds.
    high_score_share : fraction of hand-outs taken from the top scores instead of the most
        uncertain ones (0 = pure uncertainty sampling).
    rng : random source for the mix (seed it for reproducible queues).
    """
    held = store.held_lease(reviewer, run)
    if held is not None:
        return held
    rng = rng or random.Random()
    order = "-score" if rng.random() < high_score_share else "uncertainty"
    for _ in range(4):
        free = store.unclaimed(reviewer, order, _TRY_TOP, run)
        if not free:
            return None
        for cand in free:
            if store.try_lease(cand.id, reviewer, lease_s):
                return store.get(cand.id)
    return None


def rescore(store: LabelStore, score: Callable[[np.ndarray], np.ndarray], model: str, *,
            batch: int = 1024) -> int:
    """Score every unlabelled candidate again with a new model, so the queue follows it.

    Parameters
    ----------
    score : maps raw triplets (N, 3, S, S) to scores (N,).
    model : the version recorded with the scores.

    Returns
    -------
    The number of candidates rescored.
    """
    done = offset = 0
    while True:
        cands, _ = store.query(label="unlabelled", sort="id", limit=batch, offset=offset)
        if not cands:
            return done
        ids = [c.id for c in cands]
        store.set_scores(ids, np.asarray(score(store.stamps(ids)), dtype=float), model)
        done += len(ids)
        offset += len(ids)


def import_candidates(store: LabelStore, path: str | Path, *, run: str | None = None,
                      score: Callable[[np.ndarray], np.ndarray] | None = None,
                      model: str | None = None, chunk: int = 2048) -> int:
    """Put the triplets of a dataset, or of every pair of a run directory, into the store.

    Parameters
    ----------
    path : a triplet dataset (``dataset.json``) or a run directory (``pairs/*/triplets``).
    run : the run name the candidates get (default: the directory's name).
    score, model : score the triplets with this function, recorded as ``model``, so the queue
        can order them (the pipeline's own scores are not trusted to match the served model).

    Returns
    -------
    The number of candidates read (ones already in the store are left unchanged).
    """
    from astrid.ml.data import load_dataset

    path = Path(path)
    if (path / "dataset.json").is_file():
        datasets = [(path, "")]
    elif (path / "pairs").is_dir():
        datasets = [(p / "triplets", f"{p.name}:") for p in sorted((path / "pairs").iterdir())
                    if (p / "triplets" / "dataset.json").is_file()]
        if not datasets:
            raise AstridError(f"{path}: run directory has no triplet datasets (pairs/*/triplets)")
    else:
        raise AstridError(f"{path}: neither a triplet dataset (dataset.json) nor a run "
                          "directory (pairs/*/triplets)")
    run = safe_run_name(run or path.resolve().name)
    n = 0
    for dataset, prefix in datasets:
        stamps, meta = load_dataset(dataset)
        tid = meta["triplet_id"].astype(str)
        if (tid == "").any() or tid.duplicated().any():
            tid = pd.Series([f"{i}" for i in range(len(meta))])
        for start in range(0, len(meta), chunk):
            part = np.asarray(stamps[start:start + chunk], dtype=np.float32)
            rows = meta.iloc[start:start + chunk]
            ids = [f"{run}:{prefix}{t}" for t in tid.iloc[start:start + chunk]]
            scores = None if score is None else score(part)
            store.add_candidates(part, rows, run, scores=scores, model=model, ids=ids)
            n += len(rows)
    return n


def safe_run_name(run: str) -> str:
    """Run names become part of candidate ids and URLs: keep them to a plain character set."""
    clean = "".join(ch if ch.isalnum() or ch in "-_.:" else "_" for ch in str(run).strip())[:100]
    if not clean:
        raise AstridError("run name is empty")
    return clean
