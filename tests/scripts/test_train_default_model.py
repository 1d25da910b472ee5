"""The recipe script: its guards against testing on pairs a model trained on, and its choice."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from astrid.errors import AstridError

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_default_model.py"


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("train_default_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _meta(pairs):
    """Three triplets per pair, ids starting with their pair as the dataset writes them."""
    return pd.DataFrame({"pair_id": np.repeat(pairs, 3),
                         "triplet_id": [f"{p}/{k}.00,1.00/+1" for p in pairs for k in range(3)]})


def _member(tmp_path, meta, split_of_pair):
    d = tmp_path / "member"
    d.mkdir(exist_ok=True)
    pd.DataFrame({"triplet_id": meta["triplet_id"],
                  "split": meta["pair_id"].map(split_of_pair)}).to_parquet(d / "split.parquet")
    return d


def _rows(meta, split_of_pair):
    split = meta["pair_id"].map(split_of_pair).to_numpy()
    return {name: np.flatnonzero(split == name) for name in ("train", "val", "test")}


def test_held_out_pairs_of_the_members_pass_and_leaked_ones_are_named(recipe, tmp_path):
    meta = _meta(["a", "b", "c", "d"])
    trained_with = {"a": "train", "b": "train", "c": "val", "d": "test"}
    member = _member(tmp_path, meta, trained_with)
    recipe.check_held_out(meta, _rows(meta, trained_with), [member], "pair_id")
    resplit = {"a": "train", "b": "test", "c": "val", "d": "train"}  # b was trained on
    with pytest.raises(AstridError, match=r"trained on \['b'\]"):
        recipe.check_held_out(meta, _rows(meta, resplit), [member], "pair_id")


def test_pairs_a_member_never_saw_cannot_be_checked(recipe, tmp_path):
    meta = _meta(["a", "b", "c"])
    member = _member(tmp_path, meta.iloc[:6], {"a": "train", "b": "val"})
    with pytest.raises(AstridError, match=r"unknown to it \['c'\]"):
        recipe.check_held_out(meta, _rows(meta, {"a": "train", "b": "val", "c": "test"}),
                              [member], "pair_id")
    with pytest.raises(AstridError, match="no split.parquet"):
        recipe.check_held_out(meta, _rows(meta, {"a": "train", "b": "val", "c": "test"}),
                              [tmp_path], "pair_id")


def test_the_choice_is_the_lowest_validation_fnr_and_a_tie_goes_to_fewer_members(recipe):
    assert recipe.choose({"a": 0.011, "a+b": 0.009, "b": 0.010}) == "a+b"
    assert recipe.choose({"a+b": 0.009, "a+b+c": 0.009, "c": 0.012}) == "a+b"
    assert recipe.choose({"a+b": 0.0095, "b": 0.0095}) == "b"


def test_a_holdout_pair_a_member_trained_with_is_refused(recipe, tmp_path):
    training_survey = _meta(["s1-a", "s1-b", "s1-c"])
    member = _member(tmp_path, training_survey, {"s1-a": "train", "s1-b": "val", "s1-c": "test"})
    recipe.check_never_trained_on(_meta(["s2-a", "s2-b"]), [member])
    # a pair of the first survey's validation split counts too: it chose the member's epoch
    with pytest.raises(AstridError, match=r"holdout pairs \['s1-b'\]"):
        recipe.check_never_trained_on(_meta(["s2-a", "s1-b"]), [member])
