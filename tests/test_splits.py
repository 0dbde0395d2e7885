"""capret_utils.data.splits: select on one split, test on another, never both."""

from __future__ import annotations

import pytest

from capret_utils.data import df2, splits


def test_real_layout_holds_out_whole_train_pairs(smoke_root):
    s = splits.load_splits(smoke_root, select_fraction=0.3, seed=1)
    assert set(s.train["pair_id"]).isdisjoint(s.select["pair_id"])
    assert len(s.select) and len(s.train) and s.names["test"].startswith("validation")
    assert (s.test["key"].str.startswith("validation/")).all()
    again = splits.load_splits(smoke_root, select_fraction=0.3, seed=1)
    assert again.select["key"].tolist() == s.select["key"].tolist()
    other = splits.load_splits(smoke_root, select_fraction=0.3, seed=2)
    assert len(other.select) + len(other.train) == len(s.select) + len(s.train)


def test_select_pairs_fraction_bounds(smoke_root):
    train = splits.load_splits(smoke_root, select_fraction=0.05).train
    n_pairs = train["pair_id"].nunique()
    assert splits.select_pairs(train, 0.0).sum() == 0
    picked = train[splits.select_pairs(train, 0.01)]["pair_id"].nunique()
    assert picked == 1  # at least one pair
    assert train[splits.select_pairs(train, 0.99)]["pair_id"].nunique() == n_pairs - 1  # never all
    with pytest.raises(ValueError, match="select_fraction"):
        splits.select_pairs(train, 1.0)


def test_a_root_with_a_test_split_selects_on_validation(smoke_root, tmp_path):
    for name, target in (("train", "train"), ("validation", "validation"), ("test", "validation")):
        (tmp_path / name).symlink_to(smoke_root / target, target_is_directory=True)
    s = splits.load_splits(tmp_path)
    assert s.names == {"train": "train", "select": "validation", "test": "test"}
    assert len(s.train) == len(df2.load_items(smoke_root / "train"))  # nothing held out of train
    assert len(s.select) == len(s.test) == len(df2.load_items(smoke_root / "validation"))


def test_no_select_slice_is_refused(smoke_root):
    with pytest.raises(ValueError, match="select_fraction > 0"):
        splits.load_splits(smoke_root, select_fraction=0.0)
