"""Test data for test_captions.py: a small DeepFashion2-format split (image/ + annos/ + attributes.jsonl).

Written in the exact on-disk layout and schema (docs/deepfashion2.md §1.2) so the tests read it through the real
``capret_utils.data.df2.load_items``. Deterministic; each item gets a distinct colour so VQA crops differ.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

CATEGORIES = {1: "short sleeve top", 2: "long sleeve top", 3: "short sleeve outwear", 4: "long sleeve outwear",
              5: "vest", 6: "sling", 7: "shorts", 8: "trousers", 9: "skirt", 10: "short sleeve dress",
              11: "long sleeve dress", 12: "vest dress", 13: "sling dress"}
LANDMARKS = {1: 25, 2: 33, 3: 31, 4: 39, 5: 15, 6: 15, 7: 10, 8: 14, 9: 8, 10: 29, 11: 37, 12: 19, 13: 19}
COLOURS = {"navy": (0, 0, 128), "red": (200, 30, 30), "white": (245, 245, 245), "green": (30, 150, 60),
           "black": (10, 10, 10), "yellow": (230, 210, 40), "grey": (128, 128, 128)}
PATTERNS = ("solid", "horizontal stripes", "vertical stripes", "polka dots", "checks")


def write_split(root: str | Path, split: str = "validation", n_images: int = 12, size: tuple[int, int] = (96, 128)
                ) -> Path:
    """Write ``root/split`` with ``n_images`` images (user/shop alternating, pairs of two), one item each and
    a second (style 0) item on every third image; returns the split folder."""
    split_dir = Path(root) / split
    (split_dir / "image").mkdir(parents=True, exist_ok=True)
    (split_dir / "annos").mkdir(parents=True, exist_ok=True)
    colour_names = list(COLOURS)
    attrs = []
    w, h = size
    for i in range(n_images):
        image_id = i + 1
        img = Image.new("RGB", size, (200 - 7 * i % 120, 180, 160 + 5 * i % 90))
        draw = ImageDraw.Draw(img)
        anno: dict = {"source": "user" if i % 2 == 0 else "shop", "pair_id": i // 2 + 1}
        n_items = 2 if i % 3 == 0 else 1
        for k in range(1, n_items + 1):
            cat = (i * 5 + k * 3) % 13 + 1
            box = [4 + 6 * k, 6 + 40 * (k - 1), w - 10 - 4 * k, 46 + 40 * (k - 1) + 30 * (k == 1)]
            colour = colour_names[(i + 2 * k) % len(colour_names)]
            pattern = PATTERNS[(i + k) % len(PATTERNS)]
            pattern_colour = None if pattern == "solid" else colour_names[(i + 2 * k + 3) % len(colour_names)]
            draw.rectangle(box, fill=COLOURS[colour])
            if pattern_colour:
                for y in range(box[1], box[3], 6):
                    draw.line([box[0], y, box[2], y], fill=COLOURS[pattern_colour], width=2)
            anno[f"item{k}"] = {
                "category_id": cat, "category_name": CATEGORIES[cat], "style": 1 if k == 1 else 0,
                "bounding_box": box, "landmarks": [0] * (3 * LANDMARKS[cat]),
                "segmentation": [[box[0], box[1], box[2], box[1], box[2], box[3], box[0], box[3]]],
                "scale": 1 + (i + k) % 3, "occlusion": 1 + i % 3, "zoom_in": 1 + (i + 2 * k) % 3,
                "viewpoint": 1 + (i + k) % 3,
            }
            attrs.append({"key": f"{split}/{image_id:06d}/item{k}", "colour": colour,
                          "colour_rgb": list(COLOURS[colour]), "pattern": pattern, "pattern_colour": pattern_colour})
        img.save(split_dir / "image" / f"{image_id:06d}.jpg", quality=90)
        (split_dir / "annos" / f"{image_id:06d}.json").write_text(json.dumps(anno))
    with open(split_dir / "attributes.jsonl", "w") as fh:
        for a in attrs:
            fh.write(json.dumps(a) + "\n")
    return split_dir


def write_dataset(root: str | Path, n_train: int = 6, n_val: int = 12) -> Path:
    """A data root with ``train/`` and ``validation/`` splits."""
    root = Path(root)
    write_split(root, "train", n_train)
    write_split(root, "validation", n_val)
    return root
