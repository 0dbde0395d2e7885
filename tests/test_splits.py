"""capret_utils.data.splits: select on one split, test on another, never both."""

from __future__ import annotations

import pytest

from capret_utils.data import df2, splits


@pytest.fixture()
def real_root(smoke_root, tmp_path):
    """A root laid out like real DeepFashion2: train/ and validation/ only (links into the smoke benchmark)."""
    root = tmp_path / "df2"
    root.mkdir()
    for name in ("train", "validation"):
        (root / name).symlink_to(smoke_root / name, target_is_directory=True)
    return root


def test_real_layout_holds_out_whole_train_pairs(real_root):
    s = splits.load_splits(real_root, select_fraction=0.3, seed=1)
    assert set(s.train["pair_id"]).isdisjoint(s.select["pair_id"])
    assert len(s.select) and len(s.train) and s.names["test"].startswith("validation")
    assert (s.test["key"].str.startswith("validation/")).all()
    again = splits.load_splits(real_root, select_fraction=0.3, seed=1)
    assert again.select["key"].tolist() == s.select["key"].tolist()
    other = splits.load_splits(real_root, select_fraction=0.3, seed=2)
    assert len(other.select) + len(other.train) == len(s.select) + len(s.train)


def test_select_pairs_fraction_bounds(real_root):
    train = splits.load_splits(real_root, select_fraction=0.05).train
    n_pairs = train["pair_id"].nunique()
    assert splits.select_pairs(train, 0.0).sum() == 0
    picked = train[splits.select_pairs(train, 0.01)]["pair_id"].nunique()
    assert picked == 1  # at least one pair
    assert train[splits.select_pairs(train, 0.99)]["pair_id"].nunique() == n_pairs - 1  # never all
    with pytest.raises(ValueError, match="select_fraction"):
        splits.select_pairs(train, 1.0)


def test_a_root_with_a_test_split_selects_on_validation(smoke_root):
    s = splits.load_splits(smoke_root)
    assert s.names == {"train": "train", "select": "validation", "test": "test"}
    assert len(s.train) == len(df2.load_items(smoke_root / "train"))  # nothing held out of train
    assert len(s.select) == len(df2.load_items(smoke_root / "validation"))
    assert len(s.test) == len(df2.load_items(smoke_root / "test"))
    assert (s.test["key"].str.startswith("test/")).all()

def test_no_select_slice_is_refused(real_root):
    with pytest.raises(ValueError, match="select_fraction > 0"):
        splits.load_splits(real_root, select_fraction=0.0)


def test_load_role_matches_load_splits(real_root, smoke_root):
    items, folder = splits.load_role(real_root, "test")
    assert folder == "validation" and len(items) == len(splits.load_splits(real_root).test)
    sel, folder = splits.load_role(real_root, "select", 0.3, 4)
    assert folder == "train" and sel["key"].tolist() == splits.load_splits(real_root, 0.3, 4).select["key"].tolist()
    with pytest.raises(ValueError, match="role"):
        splits.load_role(real_root, "validation")
    # the embedded benchmark holds test/: test is test, select is validation
    assert splits.load_role(smoke_root, "test")[1] == "test" and splits.load_role(smoke_root, "select")[1] == "validation"
