"""Template captions: the original study's one-sentence format, built from an item's DeepFashion2 annotations."""

from __future__ import annotations

import warnings
from typing import (
    Any,
    Iterable,
    Mapping,
)

import pandas as pd

from capret_utils.data.df2 import CAPTION_MODES

# ------------------------------------------------------------------------------------------ template captions

VIEWPOINT_WORDS: dict[int, str] = {1: "not worn", 2: "frontal", 3: "side or back"}
OCCLUSION_WORDS: dict[int, str] = {1: "slight", 2: "medium", 3: "heavy"}
SCALE_WORDS: dict[int, str] = {1: "small", 2: "moderate", 3: "large"}
ZOOM_WORDS: dict[int, str] = {1: "no", 2: "medium", 3: "large"}
_TEMPLATE_FIELDS: dict[str, dict[int, str]] = {
    "viewpoint": VIEWPOINT_WORDS, "occlusion": OCCLUSION_WORDS, "scale": SCALE_WORDS, "zoom_in": ZOOM_WORDS,
}
TEMPLATE = "An image of a {category_name} with viewpoint {viewpoint}, occlusion level {occlusion}, scale {scale}, " \
           "and zoom in {zoom_in}"
"""The original study's caption format. "a" is kept literally: no DeepFashion2 category name starts with a vowel."""


def _code(row: Mapping[str, Any], name: str) -> int:
    value = row.get(name)
    try:
        code = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        code = None
    if code is None or code not in _TEMPLATE_FIELDS[name] or code != value:
        raise ValueError(f"item {row.get('key', '?')}: field {name!r} = {value!r} is not one of "
                         f"{sorted(_TEMPLATE_FIELDS[name])}")
    return code


def template_caption(row: Mapping[str, Any]) -> str:
    """The original study's template caption for one items-table row.

    ``"An image of a {category_name} with viewpoint {…}, occlusion level {…}, scale {…}, and zoom in {…}"`` with
    viewpoint 1/2/3 → not worn / frontal / side or back, occlusion → slight / medium / heavy, scale → small /
    moderate / large, zoom_in → no / medium / large. The article is literally "a" as in the study (every
    DeepFashion2 category name starts with a consonant). A code outside 1..3 raises ``ValueError`` naming the
    item key and the field.
    """
    name = row.get("category_name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"item {row.get('key', '?')}: field 'category_name' = {name!r} is not a non-empty string")
    words = {f: _TEMPLATE_FIELDS[f][_code(row, f)] for f in _TEMPLATE_FIELDS}
    return TEMPLATE.format(category_name=name.strip(), **words)


def template_captions(items: pd.DataFrame) -> dict[str, str]:
    """``{key: template caption}`` for every row of an items table."""
    _require_columns(items, ("key", "category_name", *_TEMPLATE_FIELDS), "template captions")
    return {row["key"]: template_caption(row) for row in items.to_dict("records")}


def _require_columns(items: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in items.columns]
    if missing:
        raise ValueError(f"items table lacks column(s) {missing} needed for {what}")


def item_texts(items: pd.DataFrame, use_captions: str, captions: Mapping[str, str] | None = None) -> list[str]:
    """The text of each row: category name, template caption, or the stored caption (``use_captions``).

    ``"dialogue"`` needs ``captions`` (``{key: caption}``, e.g. :func:`capret_utils.captions.load_captions`);
    keys without a caption raise a ``KeyError`` that counts them and names the first few.
    """
    if use_captions not in CAPTION_MODES:
        raise ValueError(f"use_captions must be one of {CAPTION_MODES}, got {use_captions!r}")
    if use_captions == "none":
        return [str(c) for c in items["category_name"]]
    if use_captions == "template":
        table = template_captions(items)
        return [table[k] for k in items["key"]]
    if captions is None:
        raise ValueError("use_captions='dialogue' needs the caption store (captions_path from notebook 02)")
    missing = [k for k in items["key"] if k not in captions]
    if missing:
        raise KeyError(f"{len(missing)} of {len(items)} items have no caption in the caption store, e.g. "
                       f"{missing[:3]}; caption every split you train on (notebook 02 with split='all')")
    from capret_utils.x2vlm.processing import clean_or_empty

    texts = [str(captions[k]) for k in items["key"]]
    empty = [i for i, t in enumerate(texts) if not clean_or_empty(t)]
    if empty:  # e.g. a summary of punctuation only: the text side would get nothing; counted, never silent
        names = items["category_name"].astype(str).tolist()
        for i in empty:
            texts[i] = names[i]
        warnings.warn(f"{len(empty)} of {len(texts)} stored captions are empty after X2-VLM's caption cleaning; those "
                      f"items use their category name instead (first: {items['key'].iloc[empty[0]]!r})", stacklevel=2)
    return texts

