"""What an answerer sees of an item: the crop or the whole photo, cut with the shared crop box."""

from __future__ import annotations

from dataclasses import dataclass
from typing import (
    Any,
    Mapping,
    Sequence,
)

from capret_utils.data.boxes import CROP_CONTEXT, crop_box


@dataclass
class ItemView:
    """What an answerer gets for one item: the key, the items-table row, and the image (crop) when needed."""

    key: str
    row: Mapping[str, Any]
    image: Any = None  # PIL.Image.Image | None


# ------------------------------------------------------------------------------------------ images / views


def load_views(rows: Sequence[Mapping[str, Any]], view: str = "crop", context: float = CROP_CONTEXT,
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
            image = image.crop(crop_box(r, context, *image.size))
        views.append(ItemView(str(r["key"]), r, image))
    return views


