"""What an answerer sees of an item: the crop or the whole photo, cut with the shared crop box."""

from __future__ import annotations

from dataclasses import dataclass
from typing import (
    Any,
    Mapping,
    Sequence,
)

try:  # POSIX advisory lock: one writer per store
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]



@dataclass
class ItemView:
    """What an answerer gets for one item: the key, the items-table row, and the image (crop) when needed."""

    key: str
    row: Mapping[str, Any]
    image: Any = None  # PIL.Image.Image | None


# ------------------------------------------------------------------------------------------ images / views


def item_crop_box(row: Mapping[str, Any], margin: float, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The item's GT box grown by ``margin`` × its width/height on each side, clamped to the image (pixels)."""
    w_img, h_img = size
    try:
        x1, y1, x2, y2 = (float(row[k]) for k in ("x1", "y1", "x2", "y2"))
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"item {row.get('key', '?')}: box fields x1 y1 x2 y2 missing or not numbers") from None
    bw, bh = x2 - x1, y2 - y1
    if not (bw > 0 and bh > 0):
        raise ValueError(f"item {row.get('key', '?')}: empty box [{x1}, {y1}, {x2}, {y2}] in {row.get('path')}")
    box = (max(0, int(x1 - margin * bw)), max(0, int(y1 - margin * bh)),
           min(w_img, int(round(x2 + margin * bw))), min(h_img, int(round(y2 + margin * bh))))
    if box[2] - box[0] < 1 or box[3] - box[1] < 1:
        raise ValueError(f"item {row.get('key', '?')}: box [{x1}, {y1}, {x2}, {y2}] lies outside the "
                         f"{w_img}x{h_img} image {row.get('path')}")
    return box


def load_views(rows: Sequence[Mapping[str, Any]], view: str = "crop", margin: float = 0.1,
               with_images: bool = True) -> list[ItemView]:
    """Item views for a batch: each image file is opened once; ``view`` is ``"crop"`` (GT box + margin) or
    ``"image"`` (the whole photo)."""
    if view not in ("crop", "image"):
        raise ValueError(f"view must be 'crop' or 'image', got {view!r}")
    if not with_images:
        return [ItemView(str(r["key"]), r) for r in rows]
    from PIL import Image

    cache: dict[str, Any] = {}
    views = []
    for r in rows:
        path = str(r.get("path", ""))
        if path not in cache:
            try:
                with Image.open(path) as im:
                    cache[path] = im.convert("RGB")
            except FileNotFoundError:
                raise FileNotFoundError(f"item {r.get('key')}: image file {path} (field 'path') not found") from None
            except OSError as exc:
                raise ValueError(f"item {r.get('key')}: cannot read image {path}: {exc}") from None
        image = cache[path]
        if view == "crop":
            image = image.crop(item_crop_box(r, margin, image.size))
        views.append(ItemView(str(r["key"]), r, image))
    return views


