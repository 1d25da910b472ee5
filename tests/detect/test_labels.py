"""Labels from a simulation's truth table and from a catalogued SN position."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from astrid.detect.labels import label_from_truth, label_real_pair


def _truth():
    rows = [
        ("sn", 100.0, 100.0, 1, 1), ("sn_nuclear", 200.0, 50.0, 1, 1),
        ("sn_hostless", 300.0, 300.0, 1, 1), ("variable", 50.0, 400.0, 1, -1),
        ("asteroid", 420.0, 20.0, 1, 1),
        ("cosmic_ray", 150.0, 250.0, 0, 1), ("hot_pixel", 10.0, 10.0, 0, 1),
        ("bad_column", 480.0, 256.0, 0, 1), ("trail", 250.0, 450.0, 0, 1),
        ("bleed", 350.0, 150.0, 0, 1),
    ]
    truth = pd.DataFrame(rows, columns=["kind", "x", "y", "is_real", "sign"])
    # the simulator samples a bad column every 2 px along its length, one truth row per sample
    column = pd.DataFrame({"kind": "bad_column", "x": 480.0, "y": np.arange(0.0, 512.0, 2.0),
                           "is_real": 0, "sign": 1})
    truth = pd.concat([truth, column], ignore_index=True)
    truth["length_px"] = np.nan
    truth["angle_deg"] = np.nan
    truth.loc[truth.kind == "trail", ["length_px", "angle_deg"]] = (200.0, 0.0)  # horizontal
    truth.loc[truth.kind == "bleed", ["length_px", "angle_deg"]] = (40.0, 90.0)  # vertical
    return truth


def test_labels_from_truth_are_right_for_each_kind():
    truth = _truth()
    static = pd.DataFrame({"kind": ["star", "galaxy", "star"], "x": [400.0, 60.0, 250.0],
                           "y": [400.0, 200.0, 350.0], "saturated": [False, False, True]})
    cands = pd.DataFrame([
        (100.8, 100.9, "sn"),              # 1.2 px off a real SN: real
        (200.3, 49.6, "sn_nuclear"),
        (299.0, 300.2, "sn_hostless"),
        (50.0, 401.0, "variable"),
        (419.5, 20.5, "asteroid"),
        (150.7, 250.0, "cosmic_ray"),
        (152.0, 252.0, "cosmic_ray"),      # 2.8 px from the worm's centre: still on it
        (158.0, 250.0, "cosmic_ray"),      # 8 px along a long worm from its centre
        (10.0, 11.0, "hot_pixel"),
        (10.0, 18.0, "noise"),             # 8 px from a hot pixel: not caused by it
        (480.4, 31.0, "bad_column"),       # between two samples of the column
        (330.0, 450.8, "trail"),           # 80 px along a horizontal trail
        (350.5, 165.0, "bleed"),           # 15 px up a vertical bleed
        (401.0, 401.0, "star_residual"),   # 1.4 px from a star
        (401.5, 402.5, "noise"),           # 2.9 px from an unsaturated star: not its residual
        (256.0, 345.0, "star_residual"),   # 7.8 px from a saturated star
        (61.0, 200.0, "noise"),            # on a galaxy, not a star: nothing in the truth
        (102.0, 101.2, "noise"),           # 2.3 px from the SN: beyond 1.5 px, not real
        (250.0, 470.0, "noise"),           # 20 px off the trail
    ], columns=["x", "y", "expected"])
    labels = label_from_truth(cands, truth, static, match_radius_px=1.5)
    assert list(labels["kind"]) == list(cands["expected"])
    expected_label = [1] * 5 + [0] * 14
    assert list(labels["label"]) == expected_label
    assert (labels["label_source"] == "truth").all()
    # a matched row points back at its truth row
    assert truth.loc[labels["truth_index"].iloc[0], "kind"] == "sn"
    assert labels["truth_dist_px"].iloc[0] == pytest.approx(np.hypot(0.8, 0.9))
    assert (labels["truth_index"].iloc[-3:] == -1).all()


def test_real_transient_wins_over_nearby_artefact_and_empty_inputs():
    truth = pd.DataFrame({"kind": ["sn", "cosmic_ray"], "x": [10.0, 11.0], "y": [10.0, 10.0],
                          "is_real": [True, False]})
    labels = label_from_truth(pd.DataFrame({"x": [10.6], "y": [10.0]}), truth)
    assert labels["label"].iloc[0] == 1 and labels["kind"].iloc[0] == "sn"
    none = label_from_truth(pd.DataFrame({"x": [5.0], "y": [5.0]}), truth.iloc[:0])
    assert none["kind"].iloc[0] == "noise" and none["label"].iloc[0] == 0
    empty = label_from_truth(pd.DataFrame({"x": [], "y": []}), truth)
    assert len(empty) == 0


@pytest.mark.parametrize("others, other_label", [("bogus", 0), ("unlabelled", -1)])
def test_real_pair_labels_nearest_candidate_only(others, other_label):
    cands = pd.DataFrame({"x": [50.0, 101.0, 100.4, 300.0], "y": [50.0, 100.0, 100.6, 20.0]})
    labels = label_real_pair(cands, 100.0, 100.0, radius_px=2.0, others=others)
    assert list(labels["label"]) == [other_label, other_label, 1, other_label]
    assert labels["label_source"].iloc[2] == "catalog" and labels["kind"].iloc[2] == "sn"
    far = label_real_pair(cands, 200.0, 200.0, radius_px=2.0, others=others)
    assert (far["label"] == other_label).all()  # no candidate there: nothing is called real
