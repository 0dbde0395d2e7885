"""Simple retrieval baselines on the synthetic benchmark (item level, GT-box crops); prints JSON.

Answers "how hard is the synthetic benchmark?": chance level, hand-crafted features (colour histograms, raw
pixels), a randomly initialised ViT (what a random-weight model's embeddings give) and, with ``--learned``, a
small CNN or ViT trained from scratch on the train split's identities (ArcFace loss from
pytorch-metric-learning) — evidence that a learned model can pass 0.9 top-1 while colour statistics cannot.
``tuple_matcher`` (validation and test) is the exact-tuple matcher of :mod:`capret_utils.evaluation.tuple_matcher`:
the hit@1 / mAP that captions built from the answer key (category, colour, pattern, pattern colour) reach alone.

Metrics (numpy, GT-box setting, official sets: queries = user items with style > 0, gallery = every shop item):
top-k accuracy (any positive in the first k) and mAP over the full gallery ranking.

    python benchmarks/bench_synth_baselines.py                  # demo benchmark (generated on first use)
    python benchmarks/bench_synth_baselines.py --learned cnn    # + a small CNN trained on train (~1-3 min)
    python benchmarks/bench_synth_baselines.py --data-root DIR --crop 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
from PIL import Image

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from capret_utils.data import df2  # noqa: E402
from capret_utils.evaluation import tuple_matcher  # noqa: E402
from capret_utils.runs import paths


def crops(items, size: int, pad: float = 0.0) -> np.ndarray:
    """GT-box crops resized to size × size (uint8, N × size × size × 3)."""
    out = np.empty((len(items), size, size, 3), np.uint8)
    cache: dict[str, Image.Image] = {}
    for n, (path, x1, y1, x2, y2) in enumerate(items[["path", "x1", "y1", "x2", "y2"]].itertuples(index=False)):
        im = cache.get(path)
        if im is None:
            cache.clear()
            im = cache[path] = Image.open(path).convert("RGB")
        if pad:
            dw, dh = (x2 - x1) * pad, (y2 - y1) * pad
            x1, y1, x2, y2 = x1 - dw, y1 - dh, x2 + dw, y2 + dh
        out[n] = np.asarray(im.resize((size, size), Image.Resampling.BILINEAR, box=(x1, y1, x2, y2)))
    return out


def first_hit_rank(q: np.ndarray, g: np.ndarray, rs: df2.RetrievalSet) -> np.ndarray:
    """0-based rank of the first relevant gallery item per query (cosine similarity)."""
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    order = np.argsort(-(q @ g.T), axis=1, kind="stable")
    hits = np.take_along_axis(rs.relevance().toarray(), order, axis=1)
    return np.where(hits.any(1), hits.argmax(1), hits.shape[1])


def retrieval_metrics(q: np.ndarray, g: np.ndarray, rs: df2.RetrievalSet, ks=(1, 5, 10)) -> dict[str, float]:
    """Cosine top-k accuracy and mAP; q, g are raw feature matrices (L2-normalised here)."""
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    sims = q @ g.T
    order = np.argsort(-sims, axis=1, kind="stable")
    rel = rs.relevance().toarray()
    hits = np.take_along_axis(rel, order, axis=1)
    out = {f"top{k}": float(hits[:, :k].any(1).mean()) for k in ks}
    cum = np.cumsum(hits, axis=1)
    prec = cum / np.arange(1, hits.shape[1] + 1)
    ap = (prec * hits).sum(1) / np.maximum(hits.sum(1), 1)
    out["mAP"] = float(ap.mean())
    return out


def chance(rs: df2.RetrievalSet, ks=(1, 5, 10)) -> dict[str, float]:
    """Expected metrics of a random ranking (exact hypergeometric for top-k; mAP estimated by 200 shuffles)."""
    from math import comb

    n = len(rs.gallery)
    pos = rs.queries["n_positives"].to_numpy()
    out = {f"top{k}": float(np.mean([1 - comb(n - p, min(k, n)) / comb(n, min(k, n)) for p in pos])) for k in ks}
    rng = np.random.default_rng(0)
    q = rng.normal(size=(len(pos), 8))
    aps = [retrieval_metrics(q, rng.normal(size=(n, 8)), rs)["mAP"] for _ in range(20)]
    out["mAP"] = float(np.mean(aps))
    return out


def colour_hist_rgb(x: np.ndarray, bins: int = 8) -> np.ndarray:
    idx = (x.astype(np.int32) * bins // 256)
    flat = (idx[..., 0] * bins + idx[..., 1]) * bins + idx[..., 2]
    h = np.stack([np.bincount(f.ravel(), minlength=bins ** 3) for f in flat]).astype(np.float64)
    return np.sqrt(h / h.sum(1, keepdims=True))  # Hellinger: cosine of sqrt-histograms


def colour_hist_hsv(x: np.ndarray, bins=(18, 4, 4)) -> np.ndarray:
    hsv = np.stack([np.asarray(Image.fromarray(c).convert("HSV")) for c in x]).astype(np.int32)
    idx = [hsv[..., i] * b // 256 for i, b in enumerate(bins)]
    flat = (idx[0] * bins[1] + idx[1]) * bins[2] + idx[2]
    n = bins[0] * bins[1] * bins[2]
    h = np.stack([np.bincount(f.ravel(), minlength=n) for f in flat]).astype(np.float64)
    return np.sqrt(h / h.sum(1, keepdims=True))


def raw_pixels(x: np.ndarray, size: int = 16) -> np.ndarray:
    small = np.stack([np.asarray(Image.fromarray(c).resize((size, size), Image.Resampling.BILINEAR)) for c in x])
    f = small.reshape(len(x), -1).astype(np.float64)
    return f - f.mean(1, keepdims=True)


def _to_tensor(x: np.ndarray):
    import torch

    t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
    return (t - 0.5) / 0.25


def _vit(size: int, seed: int):
    import torch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=size, patch_size=8, hidden_size=192, num_hidden_layers=4, num_attention_heads=3,
                    intermediate_size=384, num_channels=3)
    return ViTModel(cfg, add_pooling_layer=False)


def embed_random_vit(x: np.ndarray, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    import torch

    model = _vit(size, seed).eval()
    cls, mean = [], []
    with torch.no_grad():
        for i in range(0, len(x), 128):
            h = model(pixel_values=_to_tensor(x[i:i + 128])).last_hidden_state
            cls.append(h[:, 0].numpy())
            mean.append(h[:, 1:].mean(1).numpy())
    return {"cls": np.concatenate(cls), "mean": np.concatenate(mean)}


class _SmallCNN:
    """A strided stem and three conv blocks → 128-d embedding (about 15 MFLOPs per 64 px crop)."""

    @staticmethod
    def build(dim: int = 128):
        from torch import nn

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True),
                                 nn.MaxPool2d(2))

        return nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32),
                             nn.ReLU(inplace=True), block(32, 64), block(64, 96), block(96, 128),
                             nn.Conv2d(128, 192, 3, padding=1, bias=False), nn.BatchNorm2d(192), nn.ReLU(inplace=True),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(192, dim))


class _ViTEmbed:
    @staticmethod
    def build(size: int, dim: int = 128):
        from torch import nn

        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.vit = _vit(size, 0)
                self.head = nn.Linear(192, dim)

            def forward(self, x):
                return self.head(self.vit(pixel_values=x).last_hidden_state[:, 0])

        return M()


def _augment(x, gen):
    """Flip, small translation/scale jitter and brightness/colour jitter on a normalised batch (torch)."""
    import torch
    import torch.nn.functional as F

    b = x.shape[0]
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    theta = torch.zeros(b, 2, 3)
    s = 1 + (torch.rand(b, generator=gen) - 0.5) * 0.2
    theta[:, 0, 0] = s
    theta[:, 1, 1] = s
    theta[:, :, 2] = (torch.rand(b, 2, generator=gen) - 0.5) * 0.16
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    gain = 1 + (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.5
    cast = 1 + (torch.rand(b, 3, 1, 1, generator=gen) - 0.5) * 0.12
    return (x * 0.25 + 0.5) * gain * cast * 4 - 2  # back in normalised units after the photometric jitter


def train_learned(kind: str, train_x: np.ndarray, train_y: np.ndarray, size: int, epochs: int, seed: int,
                  budget_s: float) -> tuple[object, dict]:
    """Train a small CNN / ViT from scratch with ArcFace (pytorch-metric-learning) on identity labels."""
    import torch
    from pytorch_metric_learning.losses import ArcFaceLoss

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = _SmallCNN.build() if kind == "cnn" else _ViTEmbed.build(size)
    n_cls = int(train_y.max()) + 1
    loss_fn = ArcFaceLoss(num_classes=n_cls, embedding_size=128, margin=20.0, scale=32.0)
    opt = torch.optim.AdamW([*model.parameters(), *loss_fn.parameters()], lr=2e-3 if kind == "cnn" else 5e-4,
                            weight_decay=1e-4)
    steps = epochs * int(np.ceil(len(train_x) / 64))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opt.param_groups[0]["lr"], total_steps=steps)
    xt, yt = _to_tensor(train_x), torch.from_numpy(train_y)
    t0, losses, step = time.perf_counter(), [], 0
    model.train()
    for ep in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        tot = 0.0
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            loss = loss_fn(model(_augment(xt[idx], gen)), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step < steps - 1:
                sched.step()
            step += 1
            tot += float(loss.detach()) * len(idx)
        losses.append(round(tot / len(xt), 4))
        print(f"[{kind}] epoch {ep + 1}: loss {losses[-1]:.3f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        if time.perf_counter() - t0 > budget_s:
            break
    model.eval()
    return model, {"epochs_run": len(losses), "train_seconds": round(time.perf_counter() - t0, 1),
                   "loss_per_epoch": losses, "n_train_items": int(len(xt)), "n_classes": n_cls}


def embed_model(model, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return np.concatenate([model(_to_tensor(x[i:i + 256])).numpy() for i in range(0, len(x), 256)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="", help="DeepFashion2-format root (default: the synthetic demo)")
    p.add_argument("--smoke", action="store_true", help="use the tiny smoke benchmark")
    p.add_argument("--crop", type=int, default=64, help="crop side in pixels for the learned / ViT models")
    p.add_argument("--learned", choices=("none", "cnn", "vit"), default="none", help="also train a small model")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--budget-s", type=float, default=480.0, help="stop training after this many seconds")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-query", default="", help="write a CSV: query attributes + first-hit rank per method")
    a = p.parse_args(argv)
    t_start = time.perf_counter()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    root = paths.data_root(a.data_root, smoke=a.smoke)
    val = df2.load_items(paths.split_dir(root, "validation"))
    rs = df2.item_retrieval_set(val)
    qx, gx = crops(rs.queries, a.crop), crops(rs.gallery, a.crop)
    report: dict = {
        "benchmark": "synthetic-baselines", "data_root": str(root), "crop_px": a.crop,
        "validation": {"queries": len(rs.queries), "gallery": len(rs.gallery),
                       "identities": int(rs.queries["identity"].nunique()),
                       "mean_positives_per_query": round(float(rs.queries["n_positives"].mean()), 3)},
        "results": {},
    }
    res = report["results"]
    per_query = rs.queries[["key", "category_id", "scale", "occlusion", "zoom_in", "viewpoint"]].copy()
    res["chance"] = chance(rs)
    per_query["colour_hist_hsv"] = first_hit_rank(colour_hist_hsv(qx), colour_hist_hsv(gx), rs)
    res["colour_hist_rgb_8x8x8"] = retrieval_metrics(colour_hist_rgb(qx), colour_hist_rgb(gx), rs)
    res["colour_hist_hsv_18x4x4"] = retrieval_metrics(colour_hist_hsv(qx), colour_hist_hsv(gx), rs)
    res["raw_pixels_16x16"] = retrieval_metrics(raw_pixels(qx), raw_pixels(gx), rs)
    rq, rg = embed_random_vit(qx, a.crop, a.seed), embed_random_vit(gx, a.crop, a.seed)
    res["random_vit_cls"] = retrieval_metrics(rq["cls"], rg["cls"], rs)
    res["random_vit_meanpool"] = retrieval_metrics(rq["mean"], rg["mean"], rs)
    # the answer key alone: gallery items with the query's exact captionable tuple first (expected values over
    # a random order inside the tuple group); what oracle captions can get without looking at the photo
    report["tuple_matcher"] = {s: tuple_matcher.tuple_matcher_split(root / s)
                               for s in ("validation", "test") if (root / s).is_dir()}
    if a.learned != "none":
        train = df2.load_items(paths.split_dir(root, "train"))
        train = train[train["style"] > 0].reset_index(drop=True)
        ident = [df2.identity_key(p_, s_) for p_, s_ in zip(train["pair_id"], train["style"])]
        labels = np.unique(ident, return_inverse=True)[1].astype(np.int64)
        model, info = train_learned(a.learned, crops(train, a.crop), labels, a.crop, a.epochs, a.seed, a.budget_s)
        eq, eg = embed_model(model, qx), embed_model(model, gx)
        res[f"learned_{a.learned}"] = {**retrieval_metrics(eq, eg, rs), **info}
        per_query[f"learned_{a.learned}"] = first_hit_rank(eq, eg, rs)
    if a.per_query:
        per_query.to_csv(a.per_query, index=False)
    for v in [*res.values(), *(t for t in report["tuple_matcher"].values() if t)]:
        for k in list(v):
            if isinstance(v[k], float):
                v[k] = round(v[k], 4)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
