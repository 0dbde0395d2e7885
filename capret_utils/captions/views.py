"""What an answerer sees of an item: the crop or the whole photo, cut with the shared crop box.

:func:`load_views` decodes a batch's photos (each file once, errors naming the item, file and field, as the
training loader); :func:`prefetch_views` loads the views of the next batches in DataLoader worker processes
(:func:`capret_utils.data.loader.build_loader`) while the models answer the current one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import (
    Any,
    Iterator,
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
    from capret_utils.data.decode import open_image

    cache: dict[str, Any] = {}
    views = []
    for r in rows:
        path = str(r.get("path", ""))
        if path not in cache:
            cache[path] = open_image(path, str(r.get("key")), draft=False)[0]
        image = cache[path]
        if view == "crop":
            image = image.crop(crop_box(r, context, *image.size))
        views.append(ItemView(str(r["key"]), r, image))
    return views


class _BatchViews:
    """A map-style dataset whose item ``i`` is the list of views of batch ``i`` (for :func:`prefetch_views`)."""

    def __init__(self, batches: Sequence[Sequence[Mapping[str, Any]]], view: str, context: float) -> None:
        self.batches, self.view, self.context = batches, view, context

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> list[ItemView]:
        return load_views(self.batches[i], self.view, self.context)


def _first(x: Any) -> Any:
    return x


def prefetch_views(batches: Sequence[Sequence[Mapping[str, Any]]], view: str = "crop",
                   context: float = CROP_CONTEXT, num_workers: int = -1) -> Iterator[list[ItemView]]:
    """The views of each batch of rows, in order, decoded ahead in ``num_workers`` processes (-1 auto, 0 = here,
    one batch at a time)."""
    from capret_utils.data.loader import build_loader, resolve_workers

    if resolve_workers(num_workers) == 0 or len(batches) < 2:
        for rows in batches:
            yield load_views(rows, view, context)
        return
    loader = build_loader(_BatchViews(batches, view, context), _first, num_workers, batch_size=None,
                          persistent=False, prefetch_factor=2)
    yield from loader
