"""FiftyOne layer: the items table as a FiftyOne dataset, look-ups by items-table ``key``, per-query results,
saved views and a clean App launcher.

Shape of the dataset (one sample per image, ``build_dataset``):

* sample fields ``split``, ``image_id``, ``image_key`` (``"validation/000012"``, the prefix of the item keys),
  ``source`` (``user``/``shop``), ``pair_id``, ``n_items``, ``metadata`` (width/height from the items table);
  sample tags ``user``/``shop`` plus ``query`` (user image with >= 1 item of ``style > 0``) or ``gallery``
  (every shop image);
* ``items``: ``Detections``, relative ``[x, y, w, h]`` boxes, ``label`` = category name, attributes ``key``
  (the items-table key), ``item``, ``category_id``, ``style``, ``scale``, ``occlusion``, ``zoom_in``,
  ``viewpoint``, ``identity`` (``"<pair_id>:<style>"`` when ``style > 0``, else None, as
  ``df2.identity_key``), ``is_query``, ``is_gallery``;
* ``landmarks``: ``Keypoints`` (one per item that has landmarks; unlabelled points are NaN; attribute ``key``
  and ``visibility``); optionally ``segmentation`` as closed ``Polylines``.

Retrieval results are attached per query *item* on the detection attributes (``set_item_values`` /
``attach_results(level="item")``), so the saved patches view ``query-items`` shows one patch per query with its
results; per query *image* results go on sample fields (``level="image"``). Field names are
``<variant>_<name>`` (``result_field``) so several variants live side by side. Retrieval failure views
(``save_failure_views`` / ``save_comparison_view``, written by notebook 04 through ``viz.variant_views.write_fiftyone``):
``failures-top<k>-<variant>`` (no match in the top k), ``worst-ap-<variant>`` (lowest AP first) and
``top<k>-<a>-not-<b>`` (match in the top k of variant a but not of b).

Rebuilding is idempotent and atomic: the dataset is built under a temporary name and renamed when complete.

The App (in the sibling :mod:`capret_utils.viz.fo_session`): ``fo_session.launch`` works in a notebook (inline) and
in a script. An exit hook (and, in a script, a SIGTERM handler) stops the App server *before* the process and
FiftyOne's database service go, so no server or ``mongod`` outlives it (``docs/environment.md`` §4.5; why the
handler alone is not enough: ``_close_session``).
``python -m capret_utils.viz.fo_app serve`` serves a dataset from a terminal; ``capret_utils.viz.fo_app`` also holds the
subprocess server and headless-Chromium helpers used by the browser test.
"""

from __future__ import annotations

import fcntl
import math
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

from capret_utils.data.df2 import identity_key

if TYPE_CHECKING:  # fiftyone is imported lazily: importing it costs ~2 s
    import fiftyone as fo

_CONNECTED = False  # this process has connected to FiftyOne's database (see fiftyone_connected)


def fiftyone_connected() -> Any:
    """``import fiftyone`` with its database connected. A process's first connect holds an exclusive lock file in
    FiftyOne's database folder: two processes starting at once (a sweep beside a notebook) would otherwise both
    launch ``mongod`` on the same folder, and the second failed with "failed to bind to port"."""
    global _CONNECTED
    import fiftyone as fo

    if not _CONNECTED:
        folder = Path(fo.config.database_dir)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".capret-connect.lock", "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # the next process waits until this one's mongod serves
            try:
                fo.list_datasets()  # the first database call starts (or joins) the service
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        _CONNECTED = True
    return fo


LABEL_FIELD = "items"
KEYPOINTS_FIELD = "landmarks"
SEGMENTATION_FIELD = "segmentation"
QUERY_TAG = "query"
GALLERY_TAG = "gallery"
ITEM_ATTRIBUTES = ("key", "item", "category_id", "style", "scale", "occlusion", "zoom_in", "viewpoint")
REQUIRED_COLUMNS = ("key", "split", "image_id", "path", "width", "height", "source", "pair_id", "item",
                    "category_id", "category_name", "style", "x1", "y1", "x2", "y2", "scale", "occlusion",
                    "zoom_in", "viewpoint")
# Saved views created with every dataset: name -> description (the views themselves: ``standard_views``).
SAVED_VIEWS = {
    "pairs": "all images grouped by pair_id (user photos first)",
    "user-queries": "user images with at least one query item (style > 0)",
    "query-items": "one patch per query item (user, style > 0): where per-query results show",
    "heavy-occlusion": "images with heavily occluded items (occlusion = 3); only those boxes shown",
    "side-or-back": "images with items seen from the side or back (viewpoint = 3); only those boxes shown",
}


@dataclass(frozen=True)
class BuildConfig:
    """How ``build_dataset`` writes the dataset."""

    persistent: bool = True  # keep it after the process ends (users browse it later); False in tests
    overwrite: bool = True  # same name -> replaced, never duplicated
    keypoints: bool = True  # landmarks as a Keypoints field
    segmentation: bool = False  # polygons as a Polylines field (heavier; off by default)
    saved_views: bool = True  # create the SAVED_VIEWS


# --------------------------------------------------------------------------------------------- names & keys


def dataset_name(data_root: str | Path, split: str, override: str = "") -> str:
    """``override`` if given, else ``capret-<data root folder name>-<split>``, e.g. ``capret-synthetic-validation``."""
    if str(override or "").strip():
        return str(override).strip()
    root_name = Path(data_root).expanduser().resolve().name or "data"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", f"capret-{root_name}-{split}").strip("-")
    return slug


def image_key(split: str, image_id: int) -> str:
    """The image part of an items-table key: ``"validation/000012"``."""
    return f"{split}/{int(image_id):06d}"


def image_key_of(key: str) -> str:
    """``"validation/000012/item2"`` -> ``"validation/000012"`` (image keys are returned unchanged)."""
    parts = str(key).split("/")
    if len(parts) == 3:
        return "/".join(parts[:2])
    if len(parts) == 2:
        return str(key)
    raise ValueError(f"{key!r} is neither an item key 'split/NNNNNN/itemK' nor an image key 'split/NNNNNN'")


def result_field(variant: str, name: str) -> str:
    """Field / attribute name for one result of one variant.

    ``result_field("crop+caption", "ap")`` -> ``crop_caption_ap``; a leading digit gets an ``r_`` prefix.
    """
    clean_name = re.sub(r"[^A-Za-z0-9]+", "_", str(name or "")).strip("_")
    if not clean_name:
        raise ValueError(f"empty result field name (variant={variant!r}, name={name!r})")
    clean_variant = re.sub(r"[^A-Za-z0-9]+", "_", str(variant or "")).strip("_")
    field = f"{clean_variant}_{clean_name}" if clean_variant else clean_name
    if field[0].isdigit():
        field = "r_" + field
    return field


# --------------------------------------------------------------------------------------------- conversion


def relative_box(x1: float, y1: float, x2: float, y2: float, width: int, height: int) -> list[float]:
    """Pixel corners -> FiftyOne's relative ``[top-left x, top-left y, width, height]``, clipped to [0, 1]."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got width={width}, height={height}")
    bx1, bx2 = (min(max(v / width, 0.0), 1.0) for v in (x1, x2))
    by1, by2 = (min(max(v / height, 0.0), 1.0) for v in (y1, y2))
    return [bx1, by1, max(bx2 - bx1, 0.0), max(by2 - by1, 0.0)]


def relative_landmarks(flat: Sequence[float], width: int, height: int) -> tuple[list[tuple[float, float]], list[int]]:
    """Flat ``[x, y, v, ...]`` pixels -> relative points (NaN where ``v == 0``, i.e. not labelled) and ``v`` list."""
    if len(flat) % 3:
        raise ValueError(f"landmarks must be a flat [x, y, v, ...] list, got length {len(flat)}")
    points, vis = [], []
    for i in range(0, len(flat), 3):
        x, y, v = flat[i], flat[i + 1], int(flat[i + 2])
        points.append((x / width, y / height) if v > 0 else (math.nan, math.nan))
        vis.append(v)
    return points, vis


def _python(value: Any) -> Any:
    """numpy scalars / arrays -> plain Python (MongoDB cannot store numpy types); NaN floats -> None."""
    if isinstance(value, np.ndarray):
        return [_python(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_python(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _check_items(items: pd.DataFrame) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in items.columns]
    if missing:
        raise ValueError(f"items table lacks column(s) {missing}; expected the capret_utils.data.df2.load_items schema")
    if items.empty:
        raise ValueError("items table is empty: nothing to put in FiftyOne")
    dup = items["key"][items["key"].duplicated()]
    if len(dup):
        raise ValueError(f"items table has duplicate key(s), e.g. {dup.iloc[0]!r}")
    per_image = items.groupby(["split", "image_id"])[["source", "pair_id", "path", "width", "height"]].nunique()
    bad = per_image[(per_image > 1).any(axis=1)]
    if len(bad):
        col = bad.columns[(bad.iloc[0] > 1).to_numpy()][0]
        split, image_id = bad.index[0]
        raise ValueError(f"image {image_key(split, image_id)} has items that disagree on the image-level field "
                         f"{col!r}")


def _image_groups(items: pd.DataFrame) -> Iterator[list[dict[str, Any]]]:
    """The table's rows as plain dicts (numpy types converted), one list per image, images in (split, id) order."""
    ordered = items.sort_values(["split", "image_id"], kind="stable")  # keeps the item order within an image
    columns = [c for c in ordered.columns if c in set(REQUIRED_COLUMNS) | {"landmarks", "segmentation"}]
    records = ordered[columns].to_dict("records")
    group: list[dict[str, Any]] = []
    for record in records:
        if group and (record["split"], record["image_id"]) != (group[0]["split"], group[0]["image_id"]):
            yield group
            group = []
        group.append(record)
    if group:
        yield group


def _samples(items: pd.DataFrame, config: BuildConfig) -> Iterator["fo.Sample"]:
    import fiftyone as fo

    has_landmarks = "landmarks" in items.columns
    has_segmentation = "segmentation" in items.columns
    for rows in _image_groups(items):
        first = rows[0]
        width, height = int(first["width"]), int(first["height"])
        source, split, image_id = str(first["source"]), str(first["split"]), int(first["image_id"])
        detections, keypoints, polylines = [], [], []
        for row in rows:
            style = int(row["style"])
            name = str(row["category_name"])
            attrs = {attr: _python(row[attr]) for attr in ITEM_ATTRIBUTES}
            attrs["identity"] = identity_key(int(row["pair_id"]), style)
            attrs["is_query"] = source == "user" and style > 0
            attrs["is_gallery"] = source == "shop"
            box = relative_box(row["x1"], row["y1"], row["x2"], row["y2"], width, height)
            detections.append(fo.Detection(label=name, bounding_box=box, **attrs))
            landmarks = row.get("landmarks") if config.keypoints else None
            if landmarks is not None and len(landmarks):
                points, vis = relative_landmarks(list(landmarks), width, height)
                keypoints.append(fo.Keypoint(label=name, points=points, key=str(row["key"]), visibility=vis))
            polygons = row.get("segmentation") if config.segmentation else None
            if polygons is not None and len(polygons):
                polys = [[(poly[i] / width, poly[i + 1] / height) for i in range(0, len(poly) - 1, 2)]
                         for poly in polygons if len(poly) >= 6]
                if polys:
                    polylines.append(fo.Polyline(label=name, points=polys, closed=True, filled=True,
                                                 key=str(row["key"])))
        is_query = source == "user" and any(int(r["style"]) > 0 for r in rows)
        tags = [source] + ([QUERY_TAG] if is_query else []) + ([GALLERY_TAG] if source == "shop" else [])
        fields: dict[str, Any] = {
            "split": split,
            "image_id": image_id,
            "image_key": image_key(split, image_id),
            "source": source,
            "pair_id": int(first["pair_id"]),
            "n_items": len(rows),
            LABEL_FIELD: fo.Detections(detections=detections),
        }
        if config.keypoints and has_landmarks:
            fields[KEYPOINTS_FIELD] = fo.Keypoints(keypoints=keypoints)
        if config.segmentation and has_segmentation:
            fields[SEGMENTATION_FIELD] = fo.Polylines(polylines=polylines)
        yield fo.Sample(filepath=str(first["path"]), tags=tags,
                        metadata=fo.ImageMetadata(width=width, height=height), **fields)


# --------------------------------------------------------------------------------------------- build


def build_dataset(items: pd.DataFrame, name: str, config: BuildConfig = BuildConfig(),
                  info: Mapping[str, Any] | None = None) -> "fo.Dataset":
    """Build (or rebuild: same name -> overwritten) the FiftyOne dataset for an items table; returns it.

    One sample per image (see the module docstring for the fields). ``info`` (e.g. the data root) is stored in
    ``dataset.info``. The dataset is built under a temporary, non-persistent name and renamed at the end, so a
    killed build leaves the previous dataset intact (FiftyOne drops the half-built one). Raises ``ValueError``
    naming the column / field when the table does not fit the schema, and ``FileExistsError`` when the name
    exists and ``config.overwrite`` is False.
    """
    _check_items(items)
    fo = fiftyone_connected()

    if not config.overwrite and fo.dataset_exists(name):
        raise FileExistsError(f"FiftyOne dataset {name!r} exists (BuildConfig.overwrite=False)")
    dataset = fo.Dataset(f"{name}.building-{uuid.uuid4().hex[:8]}")
    try:
        n_images = int(len(items.drop_duplicates(["split", "image_id"])))
        dataset.add_samples(_samples(items, config), num_samples=n_images, validate=False)
        dataset.add_dynamic_sample_fields()  # detection attributes become filterable in the App
        for field in ("image_key", "pair_id"):
            dataset.create_index(field)
        categories = (items[["category_id", "category_name"]].drop_duplicates().sort_values("category_id"))
        dataset.default_classes = [str(c) for c in categories["category_name"]]
        # App defaults: boxes on (landmarks / polygons one click away), each category in its own colour
        dataset.app_config.active_fields = fo.ActiveFields(paths=[LABEL_FIELD])
        dataset.app_config.color_scheme = fo.ColorScheme(color_by="value")
        dataset.info = {
            "built_by": "capret_utils.viz.fo.build_dataset",
            "splits": sorted(str(s) for s in items["split"].unique()),
            "n_images": n_images,
            "n_items": int(len(items)),
            "n_queries": int(((items["source"] == "user") & (items["style"] > 0)).sum()),
            "n_gallery_items": int((items["source"] == "shop").sum()),
            **_python_dict(info or {}),
        }
        dataset.save()
        if config.saved_views:
            save_standard_views(dataset)
    except BaseException:
        dataset.delete()  # a failed build leaves nothing behind; the old dataset is untouched
        raise
    if fo.dataset_exists(name):
        fo.delete_dataset(name)
    dataset.name = name
    dataset.persistent = config.persistent
    return dataset


def _python_dict(d: Mapping[str, Any]) -> dict[str, Any]:
    return {str(k): str(v) if isinstance(v, Path) else _python(v) for k, v in d.items()}


def load_dataset(name: str) -> "fo.Dataset":
    """Load an existing dataset with a clear error that lists what exists."""
    fo = fiftyone_connected()

    if not fo.dataset_exists(name):
        raise ValueError(f"no FiftyOne dataset named {name!r}; existing: {sorted(fo.list_datasets())}")
    return fo.load_dataset(name)


def delete_dataset(name: str) -> bool:
    """Delete the dataset if it exists; returns whether it existed."""
    fo = fiftyone_connected()

    if fo.dataset_exists(name):
        fo.delete_dataset(name)
        return True
    return False


# --------------------------------------------------------------------------------------------- views


def standard_views(dataset: "fo.Dataset") -> dict[str, Any]:
    """The views behind ``SAVED_VIEWS`` (not saved): name -> view."""
    from fiftyone import ViewField as F

    queries = dataset.match_tags(QUERY_TAG)
    return {
        "pairs": dataset.group_by("pair_id", order_by="source", reverse=True),
        "user-queries": queries,
        "query-items": queries.filter_labels(LABEL_FIELD, F("is_query") == True).to_patches(LABEL_FIELD),  # noqa: E712
        "heavy-occlusion": dataset.filter_labels(LABEL_FIELD, F("occlusion") == 3),
        "side-or-back": dataset.filter_labels(LABEL_FIELD, F("viewpoint") == 3),
    }


def save_standard_views(dataset: "fo.Dataset") -> list[str]:
    """Save (or re-save) the ``SAVED_VIEWS`` on the dataset; returns their names."""
    for name, view in standard_views(dataset).items():
        dataset.save_view(name, view, description=SAVED_VIEWS[name], overwrite=True)
    return list(SAVED_VIEWS)


def refresh_saved_views(dataset: "fo.Dataset", skip: Collection[str] = ()) -> list[str]:
    """Regenerate the saved *generated* views (patches, e.g. ``query-items``) after labels changed; returns their names.

    FiftyOne keeps a saved patches view's patches in a backing dataset: without a refresh it keeps showing the
    attribute values from when it was saved (checked on fiftyone 1.22.1). ``attach_results`` calls this. ``skip``:
    views saved after the last label change (already current; a refresh would build their patches again).
    """
    refreshed = []
    for name in dataset.list_saved_views():
        if name in skip:
            continue
        view = dataset.load_saved_view(name)
        if getattr(view, "_is_generated", False):
            view.reload()
            refreshed.append(name)
    return refreshed


def resolve_view(dataset: "fo.Dataset", view: Any = None) -> Any:
    """``None`` -> the dataset; a string -> that saved view (clear error listing the saved ones); a view -> itself."""
    if view is None or (isinstance(view, str) and not view.strip()):
        return dataset
    if isinstance(view, str):
        if not dataset.has_saved_view(view):
            raise ValueError(f"dataset {dataset.name!r} has no saved view {view!r}; "
                             f"saved: {dataset.list_saved_views()}")
        return dataset.load_saved_view(view)
    return view


# --------------------------------------------------------------------------------------------- look-ups


def item_index(dataset: "fo.Dataset") -> pd.DataFrame:
    """One row per detection: ``key`` (index), ``sample_id``, ``label_id``, ``image_key``."""
    sample_ids, label_ids, keys = dataset.values(
        ["id", f"{LABEL_FIELD}.detections.id", f"{LABEL_FIELD}.detections.key"])
    image_keys = dataset.values("image_key")
    rows = [(k, sid, lid, ik)
            for sid, lids, ks, ik in zip(sample_ids, label_ids, keys, image_keys)
            for lid, k in zip(lids or [], ks or [])]
    table = pd.DataFrame(rows, columns=["key", "sample_id", "label_id", "image_key"])
    return table.set_index("key")


def find_samples(dataset: "fo.Dataset", keys: Iterable[str], ordered: bool = True) -> Any:
    """The samples (images) holding the given item keys or image keys, in the given order by default.

    Raises ``KeyError`` naming the keys that are not in the dataset.
    """
    wanted = list(dict.fromkeys(image_key_of(k) for k in keys))
    view = dataset.select_by("image_key", wanted, ordered=ordered)
    if len(view) != len(wanted):
        present = set(view.values("image_key"))
        missing = [k for k in wanted if k not in present]
        raise KeyError(f"{len(missing)} image key(s) not in dataset {dataset.name!r}, e.g. {missing[:3]}")
    return view


def find_items(dataset: "fo.Dataset", keys: Iterable[str], patches: bool = False) -> Any:
    """The detections with the given item keys: the images with only those boxes, or (``patches=True``) one patch
    per item. Raises ``KeyError`` naming unknown keys."""
    from fiftyone import ViewField as F

    wanted = list(dict.fromkeys(keys))
    view = find_samples(dataset, wanted).filter_labels(LABEL_FIELD, F("key").is_in(wanted))
    found = set(k for ks in view.values(f"{LABEL_FIELD}.detections.key") for k in (ks or []))
    missing = [k for k in wanted if k not in found]
    if missing:
        raise KeyError(f"{len(missing)} item key(s) not in dataset {dataset.name!r}, e.g. {missing[:3]}")
    return view.to_patches(LABEL_FIELD) if patches else view


def label_ids(dataset: "fo.Dataset", keys: Iterable[str]) -> list[str]:
    """Detection ids for item keys, in order (for ``select_labels`` or ``set_label_values``)."""
    index = item_index(dataset)
    keys = list(keys)
    missing = [k for k in keys if k not in index.index]
    if missing:
        raise KeyError(f"{len(missing)} item key(s) not in dataset {dataset.name!r}, e.g. {missing[:3]}")
    return index.loc[keys, "label_id"].tolist()


# --------------------------------------------------------------------------------------------- results


def set_item_values(dataset: "fo.Dataset", field: str, values: Mapping[str, Any],
                    index: pd.DataFrame | None = None) -> int:
    """Set detection attribute ``field`` for the items whose key is in ``values`` (key -> value); returns the count.

    Values may be scalars or lists (e.g. top-k gallery keys); numpy types are converted. Unknown keys raise
    ``KeyError``. Pass ``index`` (``item_index(dataset)``) when calling repeatedly, and call
    ``refresh_saved_views`` afterwards so saved patches views show the new values. For several attributes, one
    :func:`set_item_table` call writes and declares them together.
    """
    set_item_table(dataset, pd.DataFrame({"key": [str(k) for k in values], field: list(values.values())}),
                   index=index)
    return len(values)


def set_item_table(dataset: "fo.Dataset", table: pd.DataFrame, key_column: str = "key",
                   index: pd.DataFrame | None = None, declare: bool = True) -> list[str]:
    """Set one detection attribute per column of ``table`` (one row per item key) in a single bulk write.

    Numpy types are converted, NaN -> None, unknown keys raise ``KeyError``. Each item gets all its attributes in
    one update, and the new attributes are declared together (:func:`declare_item_fields`; ``declare=False`` leaves
    that to the caller) with the types ``set_label_values(dynamic=True)`` declares one reload at a time (342 took
    ~60 s on 700 images). Writes through ``Dataset._bulk_write``, as ``set_label_values`` does (fiftyone 1.22.1).
    Returns the attribute names written.
    """
    from bson import ObjectId
    from pymongo import UpdateOne

    index = item_index(dataset) if index is None else index
    keys = table[key_column].astype(str).tolist()
    missing = [k for k in keys if k not in index.index]
    if missing:
        raise KeyError(f"{len(missing)} item key(s) not in dataset {dataset.name!r}, e.g. {missing[:3]}")
    fields = [c for c in table.columns if c != key_column]
    if not keys or not fields:
        return fields
    rows = index.loc[keys]
    columns = {f: [_python(v) for v in table[f].tolist()] for f in fields}
    now = datetime.now(timezone.utc).replace(tzinfo=None)  # FiftyOne stores naive UTC times
    prefix = f"{LABEL_FIELD}.detections.$[label]."
    ops, ids = [], []
    for i, (sample_id, label_id) in enumerate(zip(rows["sample_id"], rows["label_id"])):
        update = {prefix + f: columns[f][i] for f in fields}
        update["last_modified_at"] = now
        ops.append(UpdateOne({"_id": ObjectId(sample_id)}, {"$set": update},
                             array_filters=[{"label._id": ObjectId(label_id)}]))
        ids.append(sample_id)
    dataset._bulk_write(ops, ids=ids)
    if declare:
        declare_item_fields(dataset, {f: next((v for v in columns[f] if v is not None), None) for f in fields})
    return fields


def declare_item_fields(dataset: "fo.Dataset", examples: Mapping[str, Any] | None = None) -> list[str]:
    """Declare detection attributes in one schema merge, so the App can filter on them; returns the names declared.

    ``examples`` maps attribute name -> one non-None value; each attribute gets the type FiftyOne implies from it
    (float, int, bool, string, list of strings / floats ...). Without ``examples``, every undeclared attribute
    found on the detections is declared (one scan of the dataset). Already declared attributes are left alone.
    """
    from fiftyone.core.odm.utils import create_implied_field

    if examples is None:
        schema = dataset.get_dynamic_field_schema(fields=f"{LABEL_FIELD}.detections")
    else:
        declared = dataset.get_field_schema(flat=True)
        schema = {}
        for name, value in examples.items():
            path = f"{LABEL_FIELD}.detections.{name}"
            if path not in declared and value is not None:
                schema[path] = create_implied_field(path, _python(value), dynamic=True)
    if schema:
        dataset.add_dynamic_sample_fields(fields=schema)  # one schema merge and one reload for all of them
    return [path.rsplit(".", 1)[1] for path in schema]


def set_image_values(dataset: "fo.Dataset", field: str, values: Mapping[str, Any]) -> int:
    """Set sample field ``field`` for the images whose image key (or item key) is in ``values``; returns the count."""
    by_image = {image_key_of(k): _python(v) for k, v in values.items()}
    find_samples(dataset, by_image, ordered=False)  # raises on unknown keys
    if by_image:
        dataset.set_values(field, by_image, key_field="image_key")
    return len(by_image)


def attach_results(dataset: "fo.Dataset", results: pd.DataFrame, variant: str, level: str = "item",
                   key_column: str = "key", refresh: bool = True, declare: bool = True,
                   index: pd.DataFrame | None = None) -> list[str]:
    """Write a per-query results table into the dataset; returns the field names written.

    ``results`` has one row per query, ``key_column`` holding item keys (``level="item"``: written as detection
    attributes, visible in the ``query-items`` patches view) or image keys (``level="image"``: sample fields).
    Every other column ``c`` becomes ``result_field(variant, c)``, e.g. ``topk_keys`` (list), ``topk_scores``,
    ``first_hit_rank``, ``hit_at_10``, ``ap``. ``refresh=False`` leaves the saved patches views stale (call
    :func:`refresh_saved_views` once after writing several variants: refreshing per variant costs variants x views).
    ``declare=False`` leaves item-level attributes undeclared, ``index`` passes an :func:`item_index` (call
    :func:`declare_item_fields` and the index once for several variants: 1 schema reload, 0.75 s at 57 k items).
    """
    if level not in ("item", "image"):
        raise ValueError(f"level must be 'item' or 'image', got {level!r}")
    if key_column not in results.columns:
        raise ValueError(f"results table has no {key_column!r} column; columns: {list(results.columns)}")
    keys = results[key_column].astype(str).tolist()
    if len(set(keys)) != len(keys):
        raise ValueError(f"results table has duplicate {key_column!r} values")
    renamed = {c: result_field(variant, c) for c in results.columns if c != key_column}
    if level == "item":
        table = results.rename(columns=renamed).assign(**{key_column: keys})
        fields = set_item_table(dataset, table, key_column=key_column, index=index, declare=declare)
    else:
        fields = []
        for column, field in renamed.items():
            set_image_values(dataset, field, dict(zip(keys, results[column].tolist())))
            fields.append(field)
    if refresh:
        refresh_saved_views(dataset)
    return fields


# --------------------------------------------------------------------------------------------- retrieval failures


def view_slug(text: str) -> str:
    """A saved-view-friendly slug: ``"fine-tuned/crop+itm"`` -> ``"fine-tuned-crop-itm"``."""
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")


def failure_view_name(variant: str, k: int = 10) -> str:
    """Name of the saved "no match in the top-k" view of a variant, e.g. ``failures-top10-fine-tuned-crop``."""
    return f"failures-top{int(k)}-{view_slug(variant)}"


def worst_ap_view_name(variant: str) -> str:
    return f"worst-ap-{view_slug(variant)}"


def comparison_view_name(a: str, b: str, k: int = 10) -> str:
    """``top10-<a>-not-<b>``: queries whose match is in the top-k of ``a`` but not of ``b``."""
    return f"top{int(k)}-{view_slug(a)}-not-{view_slug(b)}"


def _query_patches(dataset: "fo.Dataset", expr: Any) -> Any:
    from fiftyone import ViewField as F

    return (dataset.match_tags(QUERY_TAG)
            .filter_labels(LABEL_FIELD, (F("is_query") == True) & expr)  # noqa: E712
            .to_patches(LABEL_FIELD))


def failure_views(dataset: "fo.Dataset", variant: str, level: str = "item", k: int = 10,
                  worst: int = 50) -> dict[str, Any]:
    """The (unsaved) failure views of one variant's attached results (``attach_results``):

    * ``failures-top<k>-<variant>``: queries without a relevant gallery item in the top k (item level: one patch
      per query item; image level: the query images);
    * ``worst-ap-<variant>``: the ``worst`` queries with the lowest AP, worst first.
    """
    from fiftyone import ViewField as F

    hit, ap = result_field(variant, f"hit_at_{int(k)}"), result_field(variant, "ap")
    if level == "item":
        fails = _query_patches(dataset, F(hit) == False)  # noqa: E712
        worst_view = _query_patches(dataset, F(ap) != None).sort_by(F(f"{LABEL_FIELD}.{ap}")).limit(worst)  # noqa: E711
    elif level == "image":
        queries = dataset.match_tags(QUERY_TAG)
        fails = queries.match(F(hit) == False)  # noqa: E712
        worst_view = queries.match(F(ap) != None).sort_by(ap).limit(worst)  # noqa: E711
    else:
        raise ValueError(f"level must be 'item' or 'image', got {level!r}")
    return {failure_view_name(variant, k): fails, worst_ap_view_name(variant): worst_view}


def save_failure_views(dataset: "fo.Dataset", variant: str, level: str = "item", k: int = 10,
                       worst: int = 50) -> dict[str, int]:
    """Save :func:`failure_views` on the dataset (overwriting); returns ``{name: number of patches/samples}``."""
    out = {}
    for name, view in failure_views(dataset, variant, level, k, worst).items():
        dataset.save_view(name, view, overwrite=True,
                          description=f"{variant}: " + ("no match in the top %d" % k if name.startswith("failures")
                                                        else f"the {worst} queries with the lowest AP"))
        out[name] = len(view)
    return out


def save_comparison_view(dataset: "fo.Dataset", a: str, b: str, level: str = "item", k: int = 10) -> dict[str, int]:
    """Save the view of queries whose match is in the top k of variant ``a`` but not of variant ``b``."""
    from fiftyone import ViewField as F

    ha, hb = result_field(a, f"hit_at_{int(k)}"), result_field(b, f"hit_at_{int(k)}")
    expr = (F(ha) == True) & (F(hb) == False)  # noqa: E712
    if level == "item":
        view = _query_patches(dataset, expr)
    elif level == "image":
        view = dataset.match_tags(QUERY_TAG).match(expr)
    else:
        raise ValueError(f"level must be 'item' or 'image', got {level!r}")
    name = comparison_view_name(a, b, k)
    dataset.save_view(name, view, overwrite=True, description=f"match in the top {k} of {a} but not of {b}")
    return {name: len(view)}
