"""The one crop box: how much context around an item's box every stage uses, and the pixel box it cuts.

Training views, evaluation crops, predicted-box crops and the VQA answerer's crops all call :func:`crop_box` with
:data:`CROP_CONTEXT` unless a run sets another ``context``; one rounding rule (floor the top-left, ceil the
bottom-right) means every stage sees the same pixels of an item.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

CROP_CONTEXT = 0.05
"""Default context around an item's box on each side, as a fraction of the box width / height (5 %)."""


def crop_box(row: Mapping[str, Any], context: float, width: int, height: int) -> tuple[int, int, int, int]:
    """The item box (``x1 y1 x2 y2`` of ``row``) grown by ``context`` × its width / height on each side, clamped to
    the ``width`` × ``height`` image, as integer pixel corners (left, top, right, bottom); at least 1 × 1.

    Raises ``ValueError`` naming the item and the field when the box fields are missing, empty or outside the image.
    """
    try:
        x1, y1, x2, y2 = (float(row[k]) for k in ("x1", "y1", "x2", "y2"))
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"item {row.get('key', '?')}: box fields x1 y1 x2 y2 missing or not numbers "
                         f"in {row.get('path')}") from None
    bw, bh = x2 - x1, y2 - y1
    if not (bw > 0 and bh > 0):
        raise ValueError(f"item {row.get('key', '?')}: empty box [{x1}, {y1}, {x2}, {y2}] in {row.get('path')}")
    left = int(math.floor(max(0.0, x1 - context * bw)))
    top = int(math.floor(max(0.0, y1 - context * bh)))
    right = int(math.ceil(min(float(width), x2 + context * bw)))
    bottom = int(math.ceil(min(float(height), y2 + context * bh)))
    if right - left < 1 or bottom - top < 1:
        raise ValueError(f"item {row.get('key', '?')}: box [{x1}, {y1}, {x2}, {y2}] lies outside the "
                         f"{width}x{height} image {row.get('path')}")
    return left, top, right, bottom
