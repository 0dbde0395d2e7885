"""Losses against naive hand-written references on small seeded inputs, and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from capret_utils.train import losses as L


def _feats(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


# ------------------------------------------------------------------------------------------------ ITC


def _itc_reference(img: torch.Tensor, txt: torch.Tensor, temp: float, pos: list[list[bool]]) -> float:
    """Loop version of the official soft-target InfoNCE (x2vlm.md §2)."""
    n = img.shape[0]
    s = [[float(img[i] @ txt[j]) / temp for j in range(n)] for i in range(n)]

    def direction(mat, mask):
        total = 0.0
        for i in range(n):
            m = max(mat[i])
            log_z = m + math.log(sum(math.exp(v - m) for v in mat[i]))
            npos = sum(mask[i])
            total += -sum((1.0 / npos) * (mat[i][j] - log_z) for j in range(n) if mask[i][j])
        return total / n

    st = [[s[j][i] for j in range(n)] for i in range(n)]
    pt = [[pos[j][i] for j in range(n)] for i in range(n)]
    return (direction(s, pos) + direction(st, pt)) / 2


def test_itc_matches_reference_diagonal_and_soft_targets():
    img, txt = _feats(6, 5, 0), _feats(6, 5, 1)
    eye = [[i == j for j in range(6)] for i in range(6)]
    assert L.itc_loss(img, txt, 0.07).item() == pytest.approx(_itc_reference(img, txt, 0.07, eye), rel=1e-9)
    ids = torch.tensor([0, 0, 1, 2, 2, 2])
    pos = L.positive_mask(ids)
    ref = _itc_reference(img, txt, 0.2, pos.tolist())
    assert L.itc_loss(img, txt, 0.2, pos).item() == pytest.approx(ref, rel=1e-9)
    # soft targets differ from the diagonal-only loss
    assert L.itc_loss(img, txt, 0.2, pos).item() != pytest.approx(L.itc_loss(img, txt, 0.2).item())


def test_itc_hand_computed_two_pairs():
    # orthogonal unit features, matching pairs aligned: logits [[1, 0], [0, 1]] / temp
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    temp = 0.5
    expected = -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(0.0)))
    assert L.itc_loss(img, img.clone(), temp).item() == pytest.approx(expected, rel=1e-12)


def test_positive_mask_with_duplicate_texts():
    ids = torch.tensor([5, 6, 7])
    text_ids = torch.tensor([0, 0, 1])
    mask = L.positive_mask(ids, text_ids)
    assert mask.tolist() == [[True, True, False], [True, True, False], [False, False, True]]


def test_itc_rejects_missing_diagonal():
    img = _feats(3, 4, 2)
    with pytest.raises(ValueError, match="diagonal"):
        L.itc_loss(img, img, 0.1, torch.zeros(3, 3, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------ ITM


def test_hard_negatives_never_positive_and_follow_the_weights():
    sim = torch.tensor([[5.0, 4.0, 0.0, -3.0], [1.0, 5.0, 2.0, 0.0], [0.0, 0.0, 5.0, 1.0], [0.5, 3.0, 0.0, 5.0]])
    pos = L.positive_mask(torch.tensor([0, 0, 1, 2]))
    gen = torch.Generator().manual_seed(0)
    counts_t2i = np.zeros((4, 4))
    counts_i2t = np.zeros((4, 4))
    n = 4000
    for _ in range(n):
        ni, tok, nt, iok = L.sample_hard_negatives(sim, pos, gen)
        assert tok.all() and iok.all()
        for t in range(4):
            counts_t2i[t, ni[t]] += 1
            counts_i2t[t, nt[t]] += 1
    # naive reference: row-softmax + 1e-5, positives zeroed, renormalised
    def probs(mat, mask):
        w = torch.softmax(mat, 1) + L.ITM_EPS
        w[mask] = 0
        return (w / w.sum(1, keepdim=True)).numpy()

    p_t2i, p_i2t = probs(sim.t(), pos.t()), probs(sim, pos)
    assert (counts_t2i[pos.t().numpy()] == 0).all() and (counts_i2t[pos.numpy()] == 0).all()
    np.testing.assert_allclose(counts_t2i / n, p_t2i, atol=0.03)
    np.testing.assert_allclose(counts_i2t / n, p_i2t, atol=0.03)


def test_hard_negatives_flag_rows_without_candidates():
    sim = torch.zeros(3, 3)
    pos = L.positive_mask(torch.tensor([1, 1, 1]))  # one identity: nothing is a negative
    ni, tok, nt, iok = L.sample_hard_negatives(sim, pos, torch.Generator().manual_seed(0))
    assert not tok.any() and not iok.any()
    img = torch.randn(3, 2, 4)
    txt = torch.randn(3, 5, 4)
    mask = torch.ones(3, 5, dtype=torch.long)
    images, texts, masks, labels = L.itm_pairs(img, txt, mask, ni, tok, nt, iok)
    assert images.shape[0] == texts.shape[0] == masks.shape[0] == 3 and labels.tolist() == [1, 1, 1]


def test_itm_pairs_layout_and_loss_reference():
    b = 3
    img = torch.arange(b, dtype=torch.float32).view(b, 1, 1).expand(b, 2, 4).clone()
    txt = (10 + torch.arange(b, dtype=torch.float32)).view(b, 1, 1).expand(b, 5, 4).clone()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    neg_img = torch.tensor([2, 0, 1])
    neg_txt = torch.tensor([1, 2, 0])
    ok = torch.tensor([True, True, True])
    images, texts, masks, labels = L.itm_pairs(img, txt, mask, neg_img, ok, neg_txt, ok)
    assert labels.tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert images[:, 0, 0].tolist() == [0, 1, 2, 2, 0, 1, 0, 1, 2]  # positives, neg image per text, image
    assert texts[:, 0, 0].tolist() == [10, 11, 12, 10, 11, 12, 11, 12, 10]  # positives, text, neg text per image
    assert masks[6].tolist() == mask[1].tolist() and masks[3].tolist() == mask[0].tolist()
    logits = torch.tensor([[0.2, 1.0], [1.5, -0.5], [0.0, 0.0]])
    y = torch.tensor([1, 0, 1])
    ref = -(math.log(math.exp(1.0) / (math.exp(0.2) + math.exp(1.0))) +
            math.log(math.exp(1.5) / (math.exp(1.5) + math.exp(-0.5))) + math.log(0.5)) / 3
    assert L.itm_loss(logits, y).item() == pytest.approx(ref, rel=1e-6)


def test_itm_pairs_rows_keeps_only_the_first_rows_pairs():
    b = 4
    img = torch.arange(b, dtype=torch.float32).view(b, 1, 1).expand(b, 2, 4).clone()
    txt = (10 + torch.arange(b, dtype=torch.float32)).view(b, 1, 1).expand(b, 5, 4).clone()
    mask = torch.ones(b, 5, dtype=torch.long)
    neg_img = torch.tensor([3, 2, 1, 0])  # negatives may come from rows outside the first two
    neg_txt = torch.tensor([2, 3, 0, 1])
    ok = torch.tensor([True, False, True, True])
    images, texts, _, labels = L.itm_pairs(img, txt, mask, neg_img, ok, neg_txt, ok, rows=2)
    assert labels.tolist() == [1, 1, 0, 0]  # 2 positives; row 1 has no negative
    assert images[:, 0, 0].tolist() == [0, 1, 3, 0]
    assert texts[:, 0, 0].tolist() == [10, 11, 10, 12]
    full = L.itm_pairs(img, txt, mask, neg_img, ok, neg_txt, ok, rows=b)
    assert all(torch.equal(x, y) for x, y in zip(full, L.itm_pairs(img, txt, mask, neg_img, ok, neg_txt, ok)))
    with pytest.raises(ValueError, match="rows"):
        L.itm_pairs(img, txt, mask, neg_img, ok, neg_txt, ok, rows=0)


# ------------------------------------------------------------------------------------------------ boxes


def _giou_reference(a, b) -> float:
    ax1, ay1, ax2, ay2 = a
    bx1, by1, bx2, by2 = b
    iw, ih = max(0.0, min(ax2, bx2) - max(ax1, bx1)), max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    hull = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
    return inter / union - (hull - union) / hull


def test_giou_hand_computed_cases():
    same = torch.tensor([[0.1, 0.1, 0.5, 0.5]])
    assert L.generalized_iou(same, same).item() == pytest.approx(1.0)
    # disjoint unit squares side by side with a gap of 1: IoU 0, hull 3x1, union 2 -> GIoU = -1/3
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0, 3.0, 1.0]])
    assert L.generalized_iou(a, b).item() == pytest.approx(-1 / 3)
    # half overlap: inter 0.5, union 1.5 -> IoU 1/3, hull = union -> GIoU 1/3
    c = torch.tensor([[0.5, 0.0, 1.5, 1.0]])
    assert L.generalized_iou(a, c).item() == pytest.approx(1 / 3)


def test_box_loss_matches_reference():
    g = torch.Generator().manual_seed(3)
    centre = torch.rand(7, 2, generator=g) * 0.6 + 0.2
    size = torch.rand(7, 2, generator=g) * 0.3 + 0.05
    pred = torch.cat([centre, size], 1)
    target = torch.cat([centre + 0.05 * torch.randn(7, 2, generator=g), size * 1.2], 1)
    l1, giou = L.box_loss(pred, target)
    ref_l1 = sum(float((pred[i] - target[i]).abs().sum()) for i in range(7)) / 7
    xy = lambda b: [b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2]  # noqa: E731
    ref_giou = sum(1 - _giou_reference(xy(pred[i].tolist()), xy(target[i].tolist())) for i in range(7)) / 7
    assert l1.item() == pytest.approx(ref_l1, rel=1e-6)
    assert giou.item() == pytest.approx(ref_giou, rel=1e-5)


def test_box_loss_degenerate_batch_drops_giou():
    pred = torch.tensor([[0.5, 0.5, -0.1, 0.2], [0.4, 0.4, 0.2, 0.2]])
    target = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.4, 0.4, 0.2, 0.2]])
    l1, giou = L.box_loss(pred, target)
    assert giou.item() == 0.0
    assert l1.item() == pytest.approx(0.3 / 2)


# ------------------------------------------------------------------------------------------------ ArcFace


def _arcface_reference(emb: torch.Tensor, labels: torch.Tensor, W: torch.Tensor, m: float, s: float) -> float:
    """Normalise, cos, angle + m on the target (cos θ − m sin m past π − m), scale, cross-entropy."""
    total = 0.0
    Wn = W / W.norm(dim=0, keepdim=True)
    for i in range(emb.shape[0]):
        e = emb[i] / emb[i].norm()
        cos = (e @ Wn).tolist()
        y = int(labels[i])
        theta = math.acos(max(-1.0, min(1.0, cos[y])))
        cos[y] = math.cos(theta + m) if theta <= math.pi - m else cos[y] - m * math.sin(m)
        logits = [s * c for c in cos]
        mx = max(logits)
        total += -(logits[y] - mx - math.log(sum(math.exp(v - mx) for v in logits)))
    return total / emb.shape[0]


def test_arcface_margin_is_radians_and_matches_reference():
    torch.manual_seed(0)
    arc = L.ArcFace(num_classes=5, embedding_size=8, margin=0.15, scale=30.0)
    assert arc.loss.margin == pytest.approx(0.15)  # PML stores radians after converting our degrees
    assert arc.loss.scale == 30.0
    emb = torch.randn(6, 8)
    labels = torch.tensor([0, 1, 2, 3, 4, 1])
    ref = _arcface_reference(emb.double(), labels, arc.W.detach().double(), 0.15, 30.0)
    assert arc(emb, labels).item() == pytest.approx(ref, rel=1e-4)


def test_arcface_ignores_unlabelled_rows_and_keeps_float32_weights():
    torch.manual_seed(1)
    arc = L.ArcFace(num_classes=3, embedding_size=4, margin=0.3, scale=10.0)
    emb = torch.randn(4, 4)
    labels = torch.tensor([0, -1, 2, -1])
    kept = arc(emb[[0, 2]], labels[[0, 2]])
    assert arc(emb, labels).item() == pytest.approx(kept.item())
    assert arc(emb, torch.tensor([-1, -1, -1, -1])).item() == 0.0
    arc(emb.to(torch.bfloat16), labels)
    assert arc.W.dtype == torch.float32


def test_arcface_gradients_reach_class_weights():
    arc = L.ArcFace(num_classes=3, embedding_size=4)
    emb = torch.randn(3, 4, requires_grad=True)
    arc(emb, torch.tensor([0, 1, 2])).backward()
    assert arc.W.grad is not None and arc.W.grad.abs().sum() > 0 and emb.grad.abs().sum() > 0


def test_arcface_rejects_degrees():
    with pytest.raises(ValueError, match="radians"):
        L.ArcFace(3, 4, margin=28.6)


# ------------------------------------------------------------------------------------------------ totals


def test_total_loss_weights_and_nan_guard():
    w = L.LossWeights(itc=2.0, itm=0.0, box=0.5, arcface=1.0)
    terms = {"itc": torch.tensor(1.0), "box_l1": torch.tensor(2.0), "box_giou": torch.tensor(4.0),
             "arcface": torch.tensor(3.0)}
    assert L.total_loss(terms, w).item() == pytest.approx(2 + 1 + 2 + 3)
    cat = L.LossWeights(itc=0.0, itm=0.0, box=0.0, arcface=0.0, category=0.25)
    assert L.total_loss({"category": torch.tensor(8.0)}, cat).item() == pytest.approx(2.0)
    assert L.LossWeights().category == 0 and cat.active() == {"category": 0.25}
    cat.validate()  # the category term alone is something to train
    terms["itc"] = torch.tensor(float("nan"))
    terms["arcface"] = torch.tensor(float("inf"))
    with pytest.raises(L.NonFiniteLossError, match=r"step 17: non-finite loss term\(s\) itc=nan, arcface=inf"):
        L.total_loss(terms, w, step=17)


def test_loss_weights_validation():
    with pytest.raises(ValueError, match="nothing to train"):
        L.LossWeights(0, 0, 0, 0).validate()
    with pytest.raises(ValueError, match="itc"):
        L.LossWeights(itc=-1).validate()
    with pytest.raises(ValueError, match="arcface_fused"):
        L.LossWeights(itm=0, arcface_fused=1.0).validate()
