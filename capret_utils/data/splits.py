"""Which items train, which select (checkpoints, early stopping, any tuning) and which test, reported once.

* A root with a ``test/`` split (the embedded synthetic benchmark): train = ``train``, select = ``validation``,
  test = ``test``.
* A real DeepFashion2 root (``train/`` + ``validation/``; the official test annotations are not public): a seeded,
  ``pair_id``-disjoint slice of train (``select_fraction`` of its pairs) selects, the official ``validation``
  split tests, and training sees the rest of train.

Nothing is ever tuned on the test split: notebooks 03 and 04 and the sweeps select on ``select`` and evaluate
``test`` once at the end (``metrics.json`` keeps them apart).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from capret_utils.data import df2
from capret_utils.data.index import load_index

SELECT_FRACTION = 0.05
"""Default share of the train pairs held out to select on when the root has no test split (real DeepFashion2)."""


class Splits(NamedTuple):
    """The three item tables and where each came from (``names``: role -> description)."""

    train: pd.DataFrame
    select: pd.DataFrame
    test: pd.DataFrame
    names: dict[str, str]


def _split_dir(root: Path, split: str) -> Path:
    path = root / split
    if not path.is_dir():
        raise FileNotFoundError(f"split folder {path} does not exist (split={split!r})")
    return path


def select_pairs(train: pd.DataFrame, fraction: float, seed: int = 0) -> np.ndarray:
    """Boolean mask of the train rows whose ``pair_id`` falls in a seeded ``fraction`` of the pairs (at least one
    pair when ``fraction`` > 0, never all of them)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"select_fraction is a share of the train pairs in [0, 1), got {fraction}")
    pairs = np.array(sorted(pd.unique(train["pair_id"])))
    if fraction == 0 or len(pairs) < 2:
        return np.zeros(len(train), dtype=bool)
    n = min(len(pairs) - 1, max(1, int(round(fraction * len(pairs)))))
    chosen = np.random.default_rng([seed, 5]).permutation(pairs)[:n]
    return train["pair_id"].isin(set(chosen.tolist())).to_numpy()


def subsample_identities(train: pd.DataFrame, max_items: int, seed: int = 0) -> pd.DataFrame:
    """A seeded subset of whole training identities holding about ``max_items`` items (0 = all)."""
    if not max_items or len(train) <= max_items:
        return train
    ident = [df2.identity_key(p, s) for p, s in zip(train["pair_id"], train["style"])]
    keys = sorted({i for i in ident if i is not None})
    rng = np.random.default_rng(seed)
    keep: set[str] = set()
    count = 0
    by_id = pd.Series(ident).value_counts()
    for k in rng.permutation(keys):
        if count >= max_items:
            break
        keep.add(k)
        count += int(by_id[k])
    return train[[i in keep for i in ident]].reset_index(drop=True)


def eval_subset(items: pd.DataFrame, max_items: int, seed: int = 0) -> pd.DataFrame:
    """A fixed, seeded subset of whole pairs (every item of a chosen ``pair_id``: its queries, positives and the
    shop items of the same pair) holding about ``max_items`` items — what training evaluates at ``eval_every``;
    0 or a table at most that large = the table itself."""
    if not max_items or len(items) <= max_items:
        return items
    pairs = np.array(sorted(pd.unique(items["pair_id"])))
    counts = items["pair_id"].value_counts()
    keep, total = [], 0
    for p in np.random.default_rng([seed, 7]).permutation(pairs):
        if total >= max_items:
            break
        keep.append(p)
        total += int(counts[p])
    return items[items["pair_id"].isin(set(keep))].reset_index(drop=True)


def load_splits(root: str | os.PathLike, select_fraction: float = SELECT_FRACTION, seed: int = 0,
                max_train_items: int = 0, errors: df2.ErrorMode = "raise") -> Splits:
    """The train / select / test items of a data root (see the module docstring); ``max_train_items`` > 0 keeps
    a seeded subset of whole training identities for quick runs. ``seed`` draws the select slice on real data.

    Tables come from the lean, cached index (:func:`~capret_utils.data.index.load_index`); ``errors="skip"``
    leaves bad annotation files out, listed in each table's ``attrs["skipped"]`` (see :func:`skipped_report`)."""
    root = Path(root)
    train = load_index(_split_dir(root, "train"), errors)
    if (root / "test").is_dir():
        select = load_index(_split_dir(root, "validation"), errors)
        test = load_index(_split_dir(root, "test"), errors)
        names = {"train": "train", "select": "validation", "test": "test"}
    else:
        mask = select_pairs(train, select_fraction, seed)
        if not mask.any():
            raise ValueError(f"{root} has no test/ split, so selection needs a slice of train: set "
                             f"select_fraction > 0 (got {select_fraction}) with at least 2 train pairs")
        select = train[mask].reset_index(drop=True)
        train = train[~mask].reset_index(drop=True)
        test = load_index(_split_dir(root, "validation"), errors)
        names = {"train": f"train without the select slice ({(~mask).sum()} items)",
                 "select": f"train pairs held out to select on ({select_fraction:.0%} of the pairs, seed {seed})",
                 "test": "validation (the official retrieval split, reported once)"}
    return Splits(subsample_identities(train, max_train_items, seed), select, test, names)


ROLES = ("test", "select")


def load_role(root: str | os.PathLike, role: str = "test", select_fraction: float = SELECT_FRACTION,
              seed: int = 0, errors: df2.ErrorMode = "raise") -> tuple[pd.DataFrame, str]:
    """The items of one role (``"test"`` or ``"select"``) and the split folder they come from, without loading
    more than needed: test is ``test/`` when the root has one, else ``validation/``; select is ``validation/`` on
    a root with ``test/``, else the held-out train slice of :func:`load_splits` (same ``select_fraction``, ``seed``)."""
    root = Path(root)
    if role not in ROLES:
        raise ValueError(f"split role must be one of {ROLES}, got {role!r}")
    has_test = (root / "test").is_dir()
    if role == "test":
        folder = "test" if has_test else "validation"
        return load_index(_split_dir(root, folder), errors), folder
    if has_test:
        return load_index(_split_dir(root, "validation"), errors), "validation"
    train = load_index(_split_dir(root, "train"), errors)
    return train[select_pairs(train, select_fraction, seed)].reset_index(drop=True), "train"


def skipped_report(*tables: pd.DataFrame) -> pd.DataFrame:
    """Every file or item the reader skipped (``errors="skip"``) in the given tables: one row each with
    ``split``, ``file``, ``field``, ``reason``, ``level`` and ``key`` (empty when nothing was skipped)."""
    rows = [{"split": t.attrs.get("split", ""), **s} for t in tables for s in t.attrs.get("skipped", [])]
    return pd.DataFrame(rows, columns=["split", "file", "field", "reason", "level", "key"])
