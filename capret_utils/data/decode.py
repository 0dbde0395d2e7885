"""Pixels from disk: decode only what a view needs, a RAM-bounded cache, and compact per-item columns for workers.

:class:`ImageStore` turns an item row into its view — the item crop (:func:`~capret_utils.data.boxes.crop_box`,
cut in the photo's original pixel coordinates) or the whole photo — shrunk to at most ``side`` pixels on its longest
side, before the model's processor resizes it. A JPEG whose view will be shrunk by 2× or more is decoded at reduced
size through libjpeg's DCT scaling (PIL ``Image.draft``: 1/2, 1/4 or 1/8, always at least as large as needed), so a
384-px crop of an 800-px photo does not pay a full-size decode; the box is scaled onto the reduced image.

The optional cache keeps shrunk views up to ``cache_mb`` megabytes (least recently used out first); 0 = no cache.
A store used by DataLoader workers lives in each worker, so a loader splits the budget across them
(:meth:`ImageStore.split_budget`).

Bad files: with ``on_error="raise"`` a missing, truncated or corrupt image raises an error naming the item, the
file and the field; with ``"skip"`` the view is ``None`` and the file is listed in :attr:`ImageStore.skipped`
(callers count and report it).

:class:`StringColumn` holds many strings (paths, keys, captions) in one byte buffer plus offsets: no Python object
per string, so forked DataLoader workers do not copy the pages by touching reference counts.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from capret_utils.data.boxes import crop_box

ON_ERROR = ("raise", "skip")


class StringColumn:
    """An immutable sequence of strings stored as UTF-8 bytes in one numpy buffer plus int64 offsets."""

    def __init__(self, values: Sequence[str]) -> None:
        encoded = [str(v).encode("utf-8") for v in values]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        i = int(i)
        if i < 0:
            i += len(self)
        return self._buffer[self._offsets[i]:self._offsets[i + 1]].tobytes().decode("utf-8")

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def nbytes(self) -> int:
        return int(self._buffer.nbytes + self._offsets.nbytes)


class ItemColumns:
    """The fields a view needs (``key``, ``path``, box ``x1 y1 x2 y2``, ``width``, ``height``) of an items table in
    compact columns; ``row(i)`` gives the mapping :class:`ImageStore` and :func:`crop_box` read."""

    def __init__(self, items: Any, boxes: np.ndarray | None = None) -> None:
        self.keys = StringColumn([str(k) for k in items["key"]])
        self.paths = StringColumn([str(p) for p in items["path"]])
        if boxes is not None:
            box = np.asarray(boxes, dtype=np.float64)
        elif {"x1", "y1", "x2", "y2"} <= set(items.columns):
            box = items[["x1", "y1", "x2", "y2"]].to_numpy(dtype=np.float64)
        else:  # an image table (whole photos only)
            box = np.zeros((len(self.keys), 4), dtype=np.float64)
        if box.shape != (len(self.keys), 4):
            raise ValueError(f"boxes must be ({len(self.keys)}, 4), got {box.shape}")
        self.boxes = box
        n = len(self.keys)
        self.size = (items[["width", "height"]].to_numpy(dtype=np.int64) if {"width", "height"} <= set(items.columns)
                     else np.zeros((n, 2), dtype=np.int64))

    def __len__(self) -> int:
        return len(self.keys)

    def row(self, i: int) -> dict[str, Any]:
        x1, y1, x2, y2 = (float(v) for v in self.boxes[i])
        return {"key": self.keys[i], "path": self.paths[i], "x1": x1, "y1": y1, "x2": x2, "y2": y2,
                "width": int(self.size[i, 0]), "height": int(self.size[i, 1])}


def open_image(path: str, key: str, request: tuple[int, int] | None = None, draft: bool = True
               ) -> tuple[Image.Image, tuple[int, int]]:
    """Decode ``path`` as RGB: ``(image, original (width, height))``. With ``request`` (and ``draft``), a JPEG is
    decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps it at least ``request`` in both sides.

    Raises ``FileNotFoundError`` / ``ValueError`` naming the item, the file and the field (``path``)."""
    try:
        with Image.open(path) as im:
            size = im.size
            if draft and request is not None and im.format == "JPEG":
                im.draft("RGB", request)
            out = im.convert("RGB")
            out.load()
            return out, size
    except FileNotFoundError:
        raise FileNotFoundError(f"item {key}: image file {path} (field 'path') not found") from None
    except OSError as exc:  # truncated, corrupt or not an image (PIL.UnidentifiedImageError is an OSError)
        raise ValueError(f"item {key}: cannot read image {path} (field 'path'): {exc}") from None


def _shrink(image: Image.Image, side: int) -> Image.Image:
    if max(image.size) > side:
        image = image.copy()
        image.thumbnail((side, side), Image.Resampling.BICUBIC)
    return image


def _request(width: int, height: int, region_long: float, side: int) -> tuple[int, int] | None:
    """The decode size that keeps a region whose long side is ``region_long`` original pixels >= ``side``."""
    if region_long <= 2 * side:  # DCT scaling could not halve it: decode at full size
        return None
    f = side / region_long
    return max(1, math.ceil(width * f)), max(1, math.ceil(height * f))


class ImageStore:
    """Item crops and whole photos decoded at the size needed, shrunk to ``side`` pixels (longest side).

    ``crop(row, context)`` and ``image(row)`` return PIL images (``image`` also the factor mapping original pixel
    coordinates onto the returned image), or ``None`` for an unreadable file with ``on_error="skip"``. The same
    pixels come out with and without the cache.
    """

    def __init__(self, side: int, cache_mb: float = 0.0, draft: bool = True, on_error: str = "raise") -> None:
        if side < 8:
            raise ValueError(f"ImageStore side must be >= 8 pixels, got {side}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if cache_mb < 0:
            raise ValueError(f"cache_mb is a RAM budget in MB (0 = no cache), got {cache_mb}")
        self.side = int(side)
        self.draft = bool(draft)
        self.on_error = on_error
        self.budget_total = int(cache_mb * 2**20)
        self.budget = self.budget_total
        self._cache: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self.skipped: list[dict[str, str]] = []  # {"key", "path", "reason"} of every unreadable file met here
        self.decodes = 0  # files decoded (cache misses)

    def split_budget(self, workers: int) -> None:
        """Divide the cache budget over ``workers`` processes (each worker holds its own copy of the store)."""
        self.budget = self.budget_total // max(1, workers)

    # -------------------------------------------------------------------------------- cache
    def _get(self, key: tuple) -> Any:
        hit = self._cache.get(key)
        if hit is None:
            return None
        self._cache.move_to_end(key)
        return hit[0]

    def _put(self, key: tuple, value: Any, image: Image.Image) -> None:
        size = image.width * image.height * len(image.getbands())
        if self.budget <= 0 or size > self.budget:
            return
        self._cache[key] = (value, size)
        self._bytes += size
        while self._bytes > self.budget:
            _, (_, freed) = self._cache.popitem(last=False)
            self._bytes -= freed

    @property
    def cached_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._cache)

    # -------------------------------------------------------------------------------- views
    def _decode(self, row: Mapping[str, Any], request: tuple[int, int] | None
                ) -> tuple[Image.Image, tuple[int, int]] | None:
        """:func:`open_image` of the row's file, counted; an unreadable file raises (``on_error="raise"``) or is
        listed in :attr:`skipped` and gives ``None``."""
        try:
            decoded = open_image(str(row["path"]), str(row.get("key", "?")), request, self.draft)
        except (FileNotFoundError, ValueError) as exc:
            if self.on_error == "raise":
                raise
            self.skipped.append({"key": str(row.get("key", "?")), "path": str(row.get("path")), "reason": str(exc)})
            return None
        self.decodes += 1
        return decoded

    def crop(self, row: Mapping[str, Any], context: float) -> Image.Image | None:
        box = tuple(float(row[k]) for k in ("x1", "y1", "x2", "y2"))
        key = ("crop", str(row["path"]), float(context), *box)
        hit = self._get(key)
        if hit is not None:
            return hit
        decoded = self._decode(row, self._crop_request(row, context))
        if decoded is None:
            return None
        out = self._cut(decoded, row, context)
        self._put(key, out, out)
        return out

    def _crop_request(self, row: Mapping[str, Any], context: float) -> tuple[int, int] | None:
        """The reduced-decode request for the crop of ``row``'s box + ``context`` (None: decode in full)."""
        width, height = int(row.get("width") or 0), int(row.get("height") or 0)
        if not (self.draft and width > 0 and height > 0):
            return None
        left, top, right, bottom = crop_box(row, context, width, height)
        return _request(width, height, max(right - left, bottom - top), self.side)

    def _cut(self, decoded: tuple[Image.Image, tuple[int, int]], row: Mapping[str, Any], context: float
             ) -> Image.Image:
        """The crop of ``row``'s box (+ ``context``) from a decode of its photo, shrunk to ``side``."""
        full, (w0, h0) = decoded
        left, top, right, bottom = crop_box(row, context, w0, h0)
        if full.size != (w0, h0):  # reduced decode: cut the same region, scaled
            sx, sy = full.width / w0, full.height / h0
            left, top = int(math.floor(left * sx)), int(math.floor(top * sy))
            right = max(left + 1, min(full.width, int(math.ceil(right * sx))))
            bottom = max(top + 1, min(full.height, int(math.ceil(bottom * sy))))
        return _shrink(full.crop((left, top, right, bottom)), self.side)

    def crop_contexts(self, row: Mapping[str, Any], contexts: Sequence[float]) -> list[Image.Image] | None:
        """The crops of ``row``'s box at several ``contexts`` from **one** decode (test-time augmentation), decoded at
        the scale :meth:`crop` uses for the first context, so the first crop equals :meth:`crop`'s (the others equal
        theirs without draft decoding). Not cached. ``None`` for an unreadable file (``on_error="skip"``)."""
        contexts = [float(c) for c in contexts]
        if len(contexts) == 1:
            one = self.crop(row, contexts[0])
            return None if one is None else [one]
        decoded = self._decode(row, self._crop_request(row, contexts[0]))
        if decoded is None:
            return None
        return [self._cut(decoded, row, c) for c in contexts]

    def crops(self, row: Mapping[str, Any], boxes: np.ndarray, context: float) -> list[Image.Image] | None:
        """The crops of several boxes (``boxes`` (n, 4) pixel corners) of one photo from **one** decode (not
        cached): the decode is as small as the smallest region allows (each region keeps >= ``side`` pixels), so
        every crop equals :meth:`crop`'s when their draft scales agree. ``None`` for an unreadable file
        (``on_error="skip"``)."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        rows = [{**row, "x1": b[0], "y1": b[1], "x2": b[2], "y2": b[3]} for b in boxes]
        width, height = int(row.get("width") or 0), int(row.get("height") or 0)
        request = None
        if self.draft and width > 0 and height > 0 and len(rows):
            regions = [crop_box(r, context, width, height) for r in rows]
            longest = min(max(r - l, b - t) for l, t, r, b in regions)
            request = _request(width, height, longest, self.side)
        decoded = self._decode(row, request)
        if decoded is None:
            return None
        return [self._cut(decoded, r, context) for r in rows]

    def image(self, row: Mapping[str, Any]) -> tuple[Image.Image, float] | None:
        path = str(row["path"])
        key = ("image", path)
        hit = self._get(key)
        if hit is not None:
            return hit
        width, height = int(row.get("width") or 0), int(row.get("height") or 0)
        request = (_request(width, height, max(width, height), self.side)
                   if self.draft and width > 0 and height > 0 else None)
        decoded = self._decode(row, request)
        if decoded is None:
            return None
        full, (w0, _) = decoded
        out = _shrink(full, self.side)
        result = (out, out.width / w0)
        self._put(key, result, out)
        return result

    def view(self, row: Mapping[str, Any], view: str, context: float) -> Image.Image | None:
        if view == "crop":
            return self.crop(row, context)
        got = self.image(row)
        return None if got is None else got[0]
