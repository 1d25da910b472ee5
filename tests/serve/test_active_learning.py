"""End to end active learning on a simulated survey: review the queue, retrain, do better.

A simulated pair goes through the real chain (simulate -> ZOGY difference -> candidates ->
63x63 triplets -> labels from the truth table). Its candidates are split into an unlabelled
pool, which goes into the label store, and a held-out test set. Starting from an untrained
(weak) model, each round an "oracle" reviewer labels what the queue hands out, answering from
the truth table, and `retrain` fine-tunes, compares with the current model on held-out labels
and promotes into a models root. The AUCPR on the separate test set must rise.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from astrid.config import SimSettings, TrainSettings
from astrid.ml.metrics import average_precision
from astrid.ml.retrain import add_version, list_versions, model_version, resolve_model_dir, retrain
from astrid.ml.score import score_triplets
from astrid.serve.queue import next_candidate, rescore
from astrid.serve.store import open_store


@pytest.fixture(scope="module")
def sim_candidates():
    """Triplets and truth labels of the candidates of one small simulated pair."""
    from astropy.io import fits

    from astrid.detect.labels import label_from_truth
    from astrid.detect.stamps import cut_triplets
    from astrid.diff import difference
    from astrid.sim import simulate_pair

    # Dense in transients and artefacts so that one 384² pair gives a usable pool.
    settings = SimSettings(size_px=384, n_transients=2500, n_cosmic_rays=3000, n_hot_pixels=600,
                           n_stars=6000, seed=3)
    pair = simulate_pair(settings, 1)
    result, cands = difference(fits.PrimaryHDU(pair.ref.data, pair.ref.header),
                               fits.PrimaryHDU(pair.sci.data, pair.sci.header))
    stamps, _ = cut_triplets(result.sci, result.ref, result.diff, cands["x"].to_numpy(),
                             cands["y"].to_numpy(), size=63)
    labels = label_from_truth(cands, pair.truth, pair.static)
    keep = labels["label"].isin((0, 1)).to_numpy()
    meta = pd.concat([cands.reset_index(drop=True), labels.reset_index(drop=True)], axis=1)
    return stamps[keep], meta[keep].reset_index(drop=True)


def test_labelling_the_queue_raises_heldout_aucpr(tmp_path, sim_candidates, model_factory):
    from astrid.ml.data import DatasetWriter

    stamps, meta = sim_candidates
    truth = meta["label"].to_numpy().astype(int)
    rng = np.random.default_rng(0)
    reals = rng.permutation(np.flatnonzero(truth == 1))
    boguses = rng.permutation(np.flatnonzero(truth == 0))
    assert len(reals) >= 30, f"simulation gave only {len(reals)} real candidates"
    # A small "original training set" (replayed by retrain so nothing is forgotten), then a
    # balanced-enough rest (three boguses per real) split into a test set and the review pool.
    original = np.concatenate([reals[:8], boguses[:24]])
    rest = np.concatenate([reals[8:], boguses[24:24 + 3 * (len(reals) - 8)]])
    rest = rng.permutation(rest)
    test_rows, pool_rows = rest[: len(rest) // 3], rest[len(rest) // 3:]
    x_test, y_test = stamps[test_rows], truth[test_rows]
    split = np.where(np.isin(original, np.concatenate([reals[:2], boguses[:6]])), "val", "train")
    with DatasetWriter(tmp_path / "original", 63) as writer:
        writer.append(stamps[original], meta.iloc[original].assign(
            triplet_id=[f"o{i}" for i in original], split=split, label_source="truth"))

    root = tmp_path / "models"
    add_version(root, model_factory(tmp_path / "weak", seed=5), promote=True)
    store = open_store(f"sqlite:///{tmp_path / 'labels.db'}")
    pool_meta = meta.iloc[pool_rows].reset_index(drop=True).assign(
        triplet_id=[f"c{i}" for i in pool_rows])
    model_dir = resolve_model_dir(root)
    store.add_candidates(stamps[pool_rows], pool_meta, "sim",
                         scores=score_triplets(stamps[pool_rows], model_dir),
                         model=model_version(model_dir))
    oracle = dict(zip([f"sim:c{i}" for i in pool_rows], truth[pool_rows], strict=True))

    settings = TrainSettings(lr=3e-3, batch_size=64, epochs=8, seed=0, threads=1,
                             augment_noise=0.02)
    aucpr = [average_precision(y_test, score_triplets(x_test, model_dir))]
    promoted = []
    per_round = min(60, len(pool_rows) // 2)
    for round_no in range(2):
        for _ in range(per_round):  # the oracle reviews what the queue hands out
            cand = next_candidate(store, "oracle", high_score_share=0.2)
            store.label(cand.id, int(oracle[cand.id]), "oracle", model=cand.model,
                        score_shown=cand.score)
        result = retrain(store, root, tmp_path / f"round{round_no}", settings=settings,
                         train_data=[tmp_path / "original"], holdout_fraction=0.3,
                         lr_factor=1.0)
        assert result.n_replay == 24
        promoted.append(result.promoted)
        model_dir = resolve_model_dir(root)
        rescore(store, lambda s, m=model_dir: score_triplets(s, m), model_version(model_dir))
        aucpr.append(average_precision(y_test, score_triplets(x_test, model_dir)))

    prevalence = y_test.mean()
    assert aucpr[-1] > aucpr[0] + 0.1, (aucpr, prevalence)
    assert aucpr[-1] > prevalence + 0.15, (aucpr, prevalence)
    assert any(promoted), promoted
    # Every round is recorded; only promoted ones moved the pointer.
    versions = list_versions(root)
    assert len(versions) == 3 and [v["promoted"] for v in versions[1:]] == promoted
    assert (root / "current").read_text().strip() == \
        [v["version"] for v in versions if v["promoted"]][-1]
    assert len(store.current_labels()) == 2 * per_round
    info = json.loads((tmp_path / "round1" / "model.json").read_text())
    assert info["calibration"].startswith("temperature and threshold refit")
    assert info["retrain"]["replay_sources"] == [str(tmp_path / "original")]
    store.close()
