"""A small, hand-checkable items table (the df2.load_items schema) with real JPEGs, for the fo / plots tests.

Kept independent of ``capret_utils.data.synth`` / ``df2`` so these tests check the FiftyOne and plotting layers on
their own. Layout (deterministic): ``n_pairs`` pairs; pair p has 2 user images and 2 shop images; every image
holds a style-1 item of category ``CATS[p % 3]`` and user image 0 / shop image 1 also hold a style-0 item;
attributes cycle through 1..3 so every code appears.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw

CATS = ((1, "short sleeve top"), (8, "trousers"), (9, "skirt"))
N_LANDMARKS = {1: 25, 8: 14, 9: 8}
COLUMNS = ["key", "split", "image_id", "path", "width", "height", "source", "pair_id", "item", "category_id",
           "category_name", "style", "x1", "y1", "x2", "y2", "scale", "occlusion", "zoom_in", "viewpoint",
           "landmarks", "segmentation"]


def _landmarks(cat: int, x1: float, y1: float, x2: float, y2: float, n: int) -> list[float]:
    """Points spread over the box; every 4th point unlabelled (v=0, x=y=0), the others v=1/2."""
    flat: list[float] = []
    for i in range(N_LANDMARKS[cat]):
        if i % 4 == 3:
            flat += [0, 0, 0]
        else:
            t = (i + 1) / (N_LANDMARKS[cat] + 1)
            flat += [round(x1 + t * (x2 - x1)), round(y1 + (1 - t) * (y2 - y1)), 1 + (i + n) % 2]
    return flat


def make_items(root: Path, n_pairs: int = 3, split: str = "validation") -> pd.DataFrame:
    """Write ``root/<split>/image/NNNNNN.jpg`` and return the items table for them."""
    image_dir = Path(root) / split / "image"
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    image_id = 0
    counter = 0
    for pair in range(1, n_pairs + 1):
        cat_id, cat_name = CATS[(pair - 1) % len(CATS)]
        for source in ("user", "shop"):
            for j in range(2):
                image_id += 1
                width, height = (200, 160) if (image_id % 2) else (160, 220)
                path = image_dir / f"{image_id:06d}.jpg"
                img = Image.new("RGB", (width, height), (235, 235, 235))
                draw = ImageDraw.Draw(img)
                boxes = [(1, cat_id, cat_name, (10.0, 12.0, width * 0.6, height * 0.8))]
                if j == (0 if source == "user" else 1):
                    boxes.append((0, 9 if cat_id != 9 else 7, "skirt" if cat_id != 9 else "shorts",
                                  (width * 0.5, height * 0.5, width - 5.0, height - 4.0)))
                for n, (style, cid, cname, (x1, y1, x2, y2)) in enumerate(boxes, start=1):
                    draw.rectangle([x1, y1, x2, y2], fill=(40 * pair % 255, 90, 160 + 30 * style))
                    counter += 1
                    code = 1 + counter % 3
                    rows.append({
                        "key": f"{split}/{image_id:06d}/item{n}", "split": split, "image_id": image_id,
                        "path": str(path.resolve()), "width": width, "height": height, "source": source,
                        "pair_id": pair, "item": f"item{n}", "category_id": cid, "category_name": cname,
                        "style": style, "x1": x1, "y1": y1, "x2": x2, "y2": y2, "scale": code,
                        "occlusion": 1 + (counter + 1) % 3, "zoom_in": 1 + (counter + 2) % 3,
                        "viewpoint": 1 + (counter // 3) % 3,
                        "landmarks": _landmarks(cid, x1, y1, x2, y2, counter) if cid in N_LANDMARKS else [],
                        "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]],
                    })
                img.save(path, quality=90)
    table = pd.DataFrame(rows, columns=COLUMNS)
    table.attrs["skipped"] = []
    return table
