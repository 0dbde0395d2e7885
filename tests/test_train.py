"""Fine-tuning loop: optimiser groups, schedule, losses of a real batch, NaN guard, LoRA vs full, checkpoints,
in-process resume and a real SIGKILL + resume of a subprocess (tiny preset on the smoke benchmark, CPU)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from capret_utils.data.splits import load_splits
from capret_utils.data import loader as D
from capret_utils.train import losses as L
from capret_utils import train
from capret_utils.train import model as train_model
from capret_utils.common import repo_root

WORKER = Path(__file__).with_name("train_kill_worker.py")


@pytest.fixture(scope="module")
def splits(smoke_root):
    return load_splits(smoke_root)


def _cfg(**kw) -> train.TrainConfig:
    base = dict(model="tiny", use_captions="template", max_steps=4, batch_size=8, per_identity=2, eval_every=0,
                ckpt_every=2, device="cpu", threads=1, progress=False, seed=1, lr=1e-3)
    base.update(kw)
    return train.TrainConfig(**base)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_config_validation_and_mode():
    assert _cfg().mode == "full" and _cfg(model="base").mode == "lora" and _cfg(finetune_mode="lora").mode == "lora"
    with pytest.raises(ValueError, match="multiple of per_identity"):
        _cfg(batch_size=7).validate()
    with pytest.raises(ValueError, match="use_captions"):
        _cfg(use_captions="gpt").validate()
    with pytest.raises(ValueError, match="nothing to train"):
        _cfg(w_itc=0, w_itm=0, w_box=0, w_arcface=0, w_category=0).validate()
    # use_boxes=False switches the box loss off whatever its weight
    assert _cfg(use_boxes=False).weights().box == 0 and _cfg(use_boxes=False).data_config(32).view == "image"
    assert _cfg().trajectory_digest() == _cfg(eval_every=7, num_workers=2).trajectory_digest()
    assert _cfg().trajectory_digest() != _cfg(lr=2e-3).trajectory_digest()
    assert _cfg().trajectory_digest() != _cfg(category_margin=0.1).trajectory_digest()
    with pytest.raises(ValueError, match="category_margin is in radians"):
        _cfg(category_margin=8.6).validate()
    assert _cfg().trajectory_digest() != _cfg(category_recolour=0).trajectory_digest()
    with pytest.raises(ValueError, match="category_recolour"):
        _cfg(category_recolour=-1).validate()
    assert _cfg().trajectory_digest() != _cfg(category_views="both").trajectory_digest()
    with pytest.raises(ValueError, match="category_views"):
        _cfg(category_views="plain").validate()


def test_build_arcfaces_margins_and_switch():
    # the identity ArcFace takes `margin`, the category ArcFace its own `category_margin` (default 0), same scale
    arc, cat = train.build_arcfaces(_cfg(margin=0.2, category_margin=0.05, arcface_scale=16.0), 7, 32)
    assert (arc.num_classes, arc.margin_rad, arc.scale) == (7, 0.2, 16.0)
    assert (cat.num_classes, cat.margin_rad, cat.scale) == (13, 0.05, 16.0)
    assert cat.loss.margin == pytest.approx(0.05) and tuple(cat.W.shape) == (32, 13)
    assert train.TrainConfig().category_margin == 0.0
    assert train.build_arcfaces(_cfg(w_category=0), 7, 32)[1] is None


def test_scheduler_warmup_then_cosine():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p], "lr": 1.0}])
    sched = train.build_scheduler(opt, 10, _cfg(warmup=0.2, schedule="cosine"))
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1 / 3) and lrs[1] == pytest.approx(2 / 3) and lrs[2] == pytest.approx(1.0)
    assert lrs[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    lin = train.build_scheduler(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 10,
                                _cfg(warmup=0.0, schedule="linear"))
    assert lin.lr_lambdas[0](5) == pytest.approx(0.5)


def test_optimizer_groups(splits):
    cfg = _cfg(lr=1e-3, head_lr_mult=2.0, lr_arcface=0.05, weight_decay=0.1)
    setup = train.prepare(cfg, splits[0])
    arc = L.ArcFace(len(setup.classes), setup.bundle.model.config.embed_dim)
    cat = L.ArcFace(13, setup.bundle.model.config.embed_dim)
    opt = train.build_optimizer(setup.bundle.model, arc, cfg, cat)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"body", "body_nd", "head", "head_nd", "arcface"}
    assert groups["head"]["lr"] == pytest.approx(2e-3) and groups["body"]["lr"] == pytest.approx(1e-3)
    assert groups["arcface"]["lr"] == 0.05 and groups["arcface"]["params"][0] is arc.W
    assert groups["arcface"]["params"][1] is cat.W and groups["arcface"]["weight_decay"] == 0
    assert groups["body_nd"]["weight_decay"] == 0 and groups["body"]["weight_decay"] == 0.1
    names = {id(p): n for n, p in setup.bundle.model.named_parameters()}
    assert names[id(groups["head"]["params"][0])].split(".")[0] in train.HEAD_NAMES
    assert all(p.ndim >= 2 for p in groups["body"]["params"])
    assert any(names[id(p)] == "temp" for p in groups["body_nd"]["params"])
    n_model = sum(1 for p in setup.bundle.model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in opt.param_groups) == n_model + 2
    # the category weights alone still get the class-weight group (identity ArcFace switched off)
    only_cat = train.build_optimizer(setup.bundle.model, arc, replace(cfg, w_arcface=0), cat)
    assert [p for g in only_cat.param_groups if g["name"] == "arcface" for p in g["params"]] == [cat.W]


def _batch(setup, n=8):
    sampler = D.PKBatchSampler(setup.labels, setup.data_config.identities_per_batch, 2, seed=0)
    return D.Collator(setup.bundle.tokenizer, box_source=setup.dataset)(
        [setup.dataset[i] for i in sampler.batches(0)[0][:n]])


def test_compute_losses_every_term_and_gradients(splits):
    cfg = _cfg(w_arcface_fused=0.5)
    setup = train.prepare(cfg, splits[0])
    net = setup.bundle.model.eval()  # no dropout / drop path: the recomputation below must see the same features
    arc = L.ArcFace(len(setup.classes), net.config.embed_dim, cfg.margin, cfg.arcface_scale)
    cat = L.ArcFace(13, net.config.embed_dim, cfg.margin, cfg.arcface_scale)
    batch = _batch(setup)
    terms = train.compute_losses(net, arc, batch, cfg.weights(), torch.Generator().manual_seed(0), 0.25,
                                 category=cat)
    assert set(terms) == {"itc", "itm", "box_l1", "box_giou", "arcface", "arcface_fused", "category"}
    assert all(torch.isfinite(v) and v >= 0 for v in terms.values())
    # the category term is the category ArcFace on the retrieval embedding with the items' category_id - 1
    rows = batch["rows"].numpy()
    assert batch["categories"].tolist() == (setup.train_items["category_id"].to_numpy()[rows] - 1).tolist()
    with torch.no_grad():
        _, feat = net.get_image_embeds(batch["pixel_values"])
        assert torch.allclose(terms["category"], cat(feat, batch["categories"]), atol=1e-5)
    L.total_loss(terms, cfg.weights()).backward()
    for module in (net.vision_encoder, net.text_encoder, net.fusion, net.itm_head, net.bbox_head):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert arc.W.grad.abs().sum() > 0 and cat.W.grad.abs().sum() > 0 and net.temp.grad is not None
    with pytest.raises(ValueError, match="category"):
        train.compute_losses(net, arc, batch, cfg.weights(), torch.Generator().manual_seed(0))
    # switching terms off removes them (and their work)
    off = train.compute_losses(net, arc, batch, L.LossWeights(itc=1, itm=0, box=0, arcface=0),
                               torch.Generator().manual_seed(0))
    assert set(off) == {"itc"}


def test_category_term_on_recoloured_copies_of_the_views(splits):
    cfg = _cfg()
    setup = train.prepare(cfg, splits[0])
    net = setup.bundle.model.eval()  # eval: BatchNorm / dropout identical in both passes
    arc = L.ArcFace(len(setup.classes), net.config.embed_dim, cfg.margin, cfg.arcface_scale)
    cat = L.ArcFace(13, net.config.embed_dim, 0.0, cfg.arcface_scale)
    batch = _batch(setup)
    weights = L.LossWeights(itc=0, itm=0, box=0, arcface=1, category=1)  # nothing else draws from the generator
    terms = train.compute_losses(net, arc, batch, weights, torch.Generator().manual_seed(7), category=cat,
                                 category_recolour=3)
    both = train.compute_losses(net, arc, batch, weights, torch.Generator().manual_seed(7), category=cat,
                                category_recolour=3, category_views="both")
    pv, cats = batch["pixel_values"], batch["categories"]
    with torch.no_grad():
        _, feat = net.get_image_embeds(pv)
        _, recoloured = net.get_image_embeds(D.recolour(pv[:3], torch.Generator().manual_seed(7)))
    # default "recoloured": the term on the copies of the first 3 views only; "both": the mean with the plain term
    assert torch.allclose(terms["category"], cat(recoloured, cats[:3]), atol=1e-5)
    assert torch.allclose(both["category"], 0.5 * (cat(feat, cats) + cat(recoloured, cats[:3])), atol=1e-5)
    assert not torch.allclose(terms["category"], cat(feat, cats), atol=1e-4)
    assert torch.allclose(terms["arcface"], both["arcface"])  # the identity term always sees the views as they are
    # 0 switches the copies off; more than the batch recolours every view
    plain = train.compute_losses(net, arc, batch, weights, torch.Generator().manual_seed(7), category=cat)
    assert torch.allclose(plain["category"], cat(feat, cats), atol=1e-5)
    every = train.compute_losses(net, arc, batch, weights, torch.Generator().manual_seed(7), category=cat,
                                 category_recolour=10 * pv.shape[0])
    with torch.no_grad():
        _, allre = net.get_image_embeds(D.recolour(pv, torch.Generator().manual_seed(7)))
    assert torch.allclose(every["category"], cat(allre, cats), atol=1e-5)
    assert (train.TrainConfig().category_recolour, train.TrainConfig().category_views) == (64, "recoloured")


def test_itm_fraction_fuses_only_the_first_rows_pairs(splits, monkeypatch):
    cfg = _cfg(w_box=0, w_category=0)
    setup = train.prepare(cfg, splits[0])
    net = setup.bundle.model.train()
    arc = L.ArcFace(len(setup.classes), net.config.embed_dim, cfg.margin, cfg.arcface_scale)
    batch = _batch(setup)
    b = batch["pixel_values"].shape[0]
    sizes = []
    fuse = net.get_fusion_embeds
    monkeypatch.setattr(net, "get_fusion_embeds", lambda t, m, i: sizes.append(t.shape[0]) or fuse(t, m, i))
    for fraction in (1.0, 0.5):
        terms = train.compute_losses(net, arc, batch, cfg.weights(), torch.Generator().manual_seed(0),
                                     itm_fraction=fraction)
        assert torch.isfinite(terms["itm"])
    n = train.leading_rows(b, 0.5)
    assert sizes[0] > 2 * n and b < sizes[0] <= 3 * b  # every row: its positive and up to two negatives
    assert n <= sizes[1] <= 3 * n
    with pytest.raises(ValueError, match="itm_fraction"):
        _cfg(itm_fraction=1.5).validate()
    assert train.TrainConfig(model="demo").itm_share == 0.25 and train.TrainConfig(model="base").itm_share == 1.0
    assert train.TrainConfig(model="base", itm_fraction=0.5).itm_share == 0.5


def test_nan_guard_names_step_and_terms(splits, tmp_path):
    setup = train.prepare(_cfg(max_steps=2), splits[0])
    with torch.no_grad():
        setup.bundle.model.vision_proj.weight.fill_(float("nan"))
    with pytest.raises(L.NonFiniteLossError,
                       match=r"step 1: non-finite loss term\(s\) arcface=nan, category=nan, itc=nan"):
        train.finetune(setup, tmp_path / "run")


def test_full_finetune_learns_saves_and_reloads(splits, tmp_path):
    train_items, val_items = splits[:2]  # train, select
    cfg = _cfg(max_steps=6, eval_every=3)
    setup = train.prepare(cfg, train_items)
    before = _state(setup.bundle.model)
    zero = train.evaluate(setup.bundle, val_items, cfg)
    result = train.finetune(setup, tmp_path / "run", val_items=val_items)
    assert result.steps == 6 and result.resumed_from is None
    after = result.bundle.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    hist = result.history
    assert list(hist.loc[hist["kind"] == "eval", "step"]) == [3, 6]
    assert (tmp_path / "run" / train.HISTORY_CSV).is_file() and (tmp_path / "run" / train.HISTORY_JSON).is_file()
    train_rows = hist[hist["kind"] == "train"]
    assert len(train_rows) == 6 and train_rows["loss"].notna().all()
    assert {"loss_itc", "loss_itm", "loss_box_l1", "loss_box_giou", "loss_arcface"} <= set(hist.columns)
    assert set(zero) >= {"top1", "top5", "top10", "top15", "top20", "mAP"}
    # the checkpoint folder reloads into the same embeddings and metrics
    bundle = train.load_finetuned(result.checkpoint, device="cpu")
    again = train.evaluate(bundle, val_items, cfg)
    assert again["mAP"] == pytest.approx(result.metrics["mAP"], abs=1e-9)
    info = json.loads((result.checkpoint / train.INFO_FILE).read_text())
    assert info["finetune_mode"] == "full" and info["identity_classes"] == setup.classes
    assert info["arcface_margin_deg"] == pytest.approx(math.degrees(0.15))
    assert train.load_arcface(result.checkpoint).shape == (bundle.model.config.embed_dim, len(setup.classes))
    from safetensors.torch import load_file

    heads = load_file(str(result.checkpoint / train.ARCFACE_FILE))
    assert heads["category_W"].shape == (bundle.model.config.embed_dim, 13) and "loss_category" in hist.columns
    # a finished run re-entered with resume=True does not train again
    setup2 = train.prepare(cfg, train_items)
    again_result = train.finetune(setup2, tmp_path / "run", val_items=val_items)
    assert again_result.resumed_from == 6 and again_result.steps == 6
    assert again_result.metrics["mAP"] == pytest.approx(result.metrics["mAP"])


def test_lora_trains_adapters_and_heads_only_and_merges(splits, tmp_path):
    cfg = _cfg(finetune_mode="lora", lora_r=4, lora_alpha=8, max_steps=3, lr=5e-3)
    setup = train.prepare(cfg, splits[0])
    before = _state(setup.bundle.model)
    result = train.finetune(setup, tmp_path / "run")
    counts = result.info["trainable_parameters"]
    assert counts["by_part"].get("lora", 0) > 0 and counts["trainable"] < 0.5 * counts["total"]
    merged = result.bundle.model.state_dict()
    assert set(merged) == set(before), "the saved model is a plain X2-VLM (adapters merged)"
    # frozen non-target weights are unchanged, adapted attention weights and heads changed
    assert torch.equal(merged["vision_encoder.layers.0.mlp.fc1.weight"],
                       before["vision_encoder.layers.0.mlp.fc1.weight"])
    assert not torch.equal(merged["vision_encoder.layers.0.attention.q_proj.weight"],
                           before["vision_encoder.layers.0.attention.q_proj.weight"])
    assert not torch.equal(merged["itm_head.0.weight"], before["itm_head.0.weight"])
    state = json.loads((tmp_path / "run" / train.STATE_DIR / "latest.json").read_text())
    saved = (tmp_path / "run" / train.STATE_DIR / state["path"] / "trainable.safetensors")
    from safetensors.torch import load_file

    keys = load_file(str(saved)).keys()
    assert any("lora_" in k for k in keys) and not any("mlp.fc1" in k for k in keys)
    train.load_finetuned(result.checkpoint)


def test_in_process_resume_matches_uninterrupted(splits, tmp_path):
    train_items, val_items = splits[:2]  # train, select
    cfg = _cfg(max_steps=6, ckpt_every=2, eval_every=3)
    full = train.finetune(train.prepare(cfg, train_items), tmp_path / "a", val_items=val_items)
    part = train.finetune(train.prepare(cfg, train_items), tmp_path / "b", val_items=val_items, stop_after=4)
    assert part.steps == 4
    resumed = train.finetune(train.prepare(cfg, train_items), tmp_path / "b", val_items=val_items)
    assert resumed.resumed_from == 4
    a, b = full.bundle.model.state_dict(), resumed.bundle.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics["mAP"] == full.metrics["mAP"] and resumed.metrics["top1"] == full.metrics["top1"]
    la = full.history.loc[full.history["kind"] == "train", "loss"].to_numpy()
    lb = resumed.history.loc[resumed.history["kind"] == "train", "loss"].to_numpy()
    np.testing.assert_array_equal(la, lb)


def test_resume_restores_batchnorm_statistics_of_the_demo_conv_stem(splits, tmp_path):
    train_items = splits.train
    cfg = _cfg(model="demo", max_steps=4, ckpt_every=2)
    full = train.finetune(train.prepare(cfg, train_items), tmp_path / "a")
    train.finetune(train.prepare(cfg, train_items), tmp_path / "b", stop_after=2)
    state = tmp_path / "b" / train.STATE_DIR / "step-000002"
    from safetensors.torch import load_file

    saved = load_file(str(state / "buffers.safetensors"))
    assert saved and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in saved)
    # two steps, each passing item crops, the box task's whole photos and the recoloured crops of the category
    # term through the stem
    assert int(saved["vision_encoder.embeddings.patch_embeddings.projection.1.num_batches_tracked"]) == 6
    resumed = train.finetune(train.prepare(cfg, train_items), tmp_path / "b")
    a, b = full.bundle.model.state_dict(), resumed.bundle.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # weights and running statistics
    (state / "buffers.safetensors").unlink()
    with pytest.raises(ValueError, match="BatchNorm statistics"):
        train.load_train_state(state, *_resume_targets(cfg, train_items))


def _resume_targets(cfg, train_items):
    setup = train.prepare(cfg, train_items)
    model = setup.bundle.model
    arcface = L.ArcFace(len(setup.classes), int(model.config.embed_dim), cfg.margin, cfg.arcface_scale)
    sampler = D.PKBatchSampler(setup.labels, setup.data_config.identities_per_batch, cfg.per_identity)
    optimizer = train.build_optimizer(model, arcface, cfg)
    return model, arcface, optimizer, train.build_scheduler(optimizer, 4, cfg), sampler, torch.Generator()


def test_training_runs_with_deterministic_algorithms_and_restores_the_setting(splits, tmp_path):
    seen = []
    before = torch.are_deterministic_algorithms_enabled()
    cfg = _cfg(max_steps=3, threads=2)
    a = train.finetune(train.prepare(cfg, splits[0]), tmp_path / "a",
                       callback=lambda row: seen.append(torch.are_deterministic_algorithms_enabled()))
    assert seen and all(seen) and torch.are_deterministic_algorithms_enabled() == before
    b = train.finetune(train.prepare(cfg, splits[0]), tmp_path / "b")
    sa, sb = a.bundle.model.state_dict(), b.bundle.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # 2 threads, bitwise the same
    seen.clear()
    train.finetune(train.prepare(replace(cfg, deterministic=False), splits[0]), tmp_path / "c",
                   callback=lambda row: seen.append(torch.are_deterministic_algorithms_enabled()))
    assert seen and not any(seen)


def replace_config(config, **changes):
    return type(config)(**{**config.to_dict(), **changes})


def test_resume_refuses_another_configuration(splits, tmp_path, monkeypatch):
    cfg = _cfg(max_steps=4, ckpt_every=1)
    train.finetune(train.prepare(cfg, splits[0]), tmp_path / "run", stop_after=1)
    with pytest.raises(ValueError, match="another training configuration"):
        train.finetune(train.prepare(replace(cfg, lr=3e-3), splits[0]), tmp_path / "run")
    # same TrainConfig, but the preset's architecture changed in code (here: the vision stem): refused by the digest
    # before any weight is loaded, not by a missing-key error
    original = train_model.model_config
    monkeypatch.setattr(train_model, "model_config", lambda c, vocab_size=None: replace_config(
        original(c, vocab_size), vision_stem="conv", patch_size=16))
    with pytest.raises(ValueError, match="another training configuration or model architecture"):
        train.finetune(train.prepare(cfg, splits[0]), tmp_path / "run")
    monkeypatch.undo()
    # resume=False starts over
    fresh = train.finetune(train.prepare(replace(cfg, resume=False, max_steps=2), splits[0]), tmp_path / "run")
    assert fresh.resumed_from is None and fresh.steps == 2


def test_checkpoints_are_atomic_and_pruned(splits, tmp_path):
    cfg = _cfg(max_steps=5, ckpt_every=1, keep_checkpoints=2)
    train.finetune(train.prepare(cfg, splits[0]), tmp_path / "run")
    root = tmp_path / "run" / train.STATE_DIR
    names = sorted(p.name for p in root.iterdir())
    assert names == ["latest.json", "step-000004", "step-000005"]
    assert train.latest_train_state(tmp_path / "run") == root / "step-000005"
    (root / "latest.json").write_text(json.dumps({"step": 9, "path": "step-000009"}))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train.latest_train_state(tmp_path / "run")


def test_load_finetuned_names_a_wrong_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="finetune_info.json"):
        train.load_finetuned(tmp_path)


def test_model_argument_errors(splits):
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        train.prepare(_cfg(model="/nonexistent/x2vlm.th"), splits[0])


def _run_worker(run_dir: Path, *extra: str, wait: bool = True) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(WORKER), str(run_dir), *extra], cwd=repo_root(), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
    return proc


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path):
    """A real subprocess is SIGKILLed after a few checkpoints; the resumed run ends with the same weights and
    metrics as an uninterrupted run (CPU, fixed seed, one thread)."""
    _run_worker(tmp_path / "straight")
    straight = json.loads((tmp_path / "straight" / "result.json").read_text())
    assert straight["resumed_from"] is None and straight["steps"] == 8

    killed_dir = tmp_path / "killed"
    proc = _run_worker(killed_dir, "--sleep", "0.5", wait=False)
    latest = killed_dir / train.STATE_DIR / "latest.json"
    deadline = time.time() + 240
    while time.time() < deadline:
        if latest.is_file() and json.loads(latest.read_text())["step"] >= 3:
            break
        if proc.poll() is not None:
            pytest.fail(f"worker ended before it could be killed: {proc.stdout.read()}")
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("worker wrote no checkpoint in time")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed_dir / "result.json").exists()
    step_at_kill = json.loads(latest.read_text())["step"]
    assert 3 <= step_at_kill < 8

    _run_worker(killed_dir)
    resumed = json.loads((killed_dir / "result.json").read_text())
    assert resumed["resumed_from"] == step_at_kill
    assert resumed["weights"] == straight["weights"]
    assert resumed["metrics"] == straight["metrics"]
    assert resumed["eval_steps"] == straight["eval_steps"] == [4, 8]


@pytest.mark.slow
def test_loader_built_once_gives_the_same_run_with_worker_processes(splits, tmp_path):
    """One DataLoader for the whole run (persistent workers, set_epoch per pass): 2 worker processes give the
    same losses as loading in the main process, across several sampler epochs."""
    cfg = _cfg(max_steps=7, ckpt_every=100)
    setup = train.prepare(cfg, splits[0])
    assert len(D.PKBatchSampler(setup.labels, setup.data_config.identities_per_batch, cfg.per_identity)) < 7
    a = train.finetune(setup, tmp_path / "w0", stop_after=7).history
    b = train.finetune(train.prepare(replace(cfg, num_workers=2), splits[0]), tmp_path / "w2", stop_after=7).history
    assert list(a["epoch"]) == list(b["epoch"]) and a["epoch"].iloc[-1] >= 1
    assert np.allclose(a["loss"], b["loss"], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- real GPUs
def _plain_model(preset: str = "tiny", **overrides) -> torch.nn.Module:
    from capret_utils.x2vlm import X2VLMConfig, X2VLMModel

    torch.manual_seed(0)
    model = X2VLMModel(X2VLMConfig.preset(preset, **overrides))
    model.set_attn_implementation("sdpa")
    return model.train()


def _step_grads(model, cfg, batch, arcface, category):
    model.zero_grad(set_to_none=True)
    arcface.zero_grad(set_to_none=True)
    criterion = train.Criterion(cfg, arcface, category, torch.Generator().manual_seed(3), torch.device("cpu"))
    torch.manual_seed(11)  # dropout / drop-path masks
    terms = criterion(model, batch)
    criterion.total(terms, 1).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, terms


def test_gradient_checkpointing_gives_the_same_gradients():
    """Every BEiT / BERT / fusion layer recomputed in backward (tiny preset with dropout and drop-path, every loss
    term): the same loss terms and gradients within float tolerance; evaluation is unaffected; off again after."""
    cfg = _cfg(w_arcface_fused=0.5, category_recolour=4)
    plain, ckpt = _plain_model(), _plain_model()
    ckpt.set_layer_checkpointing(True)
    batch = train.synthetic_batch(plain.config, cfg, text_len=12)
    arc, cat = train.build_arcfaces(cfg, cfg.batch_size, plain.config.embed_dim)
    g0, t0 = _step_grads(plain, cfg, batch, arc, cat)
    g1, t1 = _step_grads(ckpt, cfg, batch, arc, cat)
    assert set(t0) == set(t1) == {"itc", "itm", "box_l1", "box_giou", "arcface", "arcface_fused", "category"}
    assert all(torch.allclose(t0[k], t1[k], atol=1e-6) for k in t0)
    assert set(g0) == set(g1) and len(g0) > 50
    for name in g0:
        assert torch.allclose(g0[name], g1[name], rtol=1e-4, atol=1e-6), name
    layers = [m for m in ckpt.modules() if getattr(m, "gradient_checkpointing", False) is True]
    assert len(layers) >= 2 + 2 + 2  # vision, text and fusion layers of the tiny preset
    ckpt.set_layer_checkpointing(False)
    assert not any(getattr(m, "gradient_checkpointing", False) is True for m in ckpt.modules())


def test_grad_accum_gives_the_same_update_for_per_sample_losses_not_in_batch_negatives():
    """B items in one batch vs two micro-batches of B/2 accumulated: the same gradients and update for ArcFace
    (a mean of per-sample terms); ITC takes its negatives within each micro-batch, so it differs."""
    no_dropout = dict(vision_drop_path_rate=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

    def run(cfg, batches):
        model = _plain_model(**no_dropout)
        torch.manual_seed(5)
        arc, _ = train.build_arcfaces(cfg, 8, model.config.embed_dim)
        criterion = train.Criterion(cfg, arc, None, torch.Generator().manual_seed(3), torch.device("cpu"))
        opt = train.build_optimizer(model, arc, cfg)
        sched = train.build_scheduler(opt, 10, cfg)
        train.train_step(model, criterion, opt, sched, iter(batches), cfg, 0)
        return ({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                {n: p.detach().clone() for n, p in model.named_parameters()})

    def halves(batch):
        return [{k: v[i * 4:(i + 1) * 4] for k, v in batch.items()} for i in range(2)]

    for weights, same in ((dict(w_itc=0, w_itm=0, w_box=0, w_category=0), True),
                          (dict(w_itc=1, w_itm=0, w_box=0, w_category=0, w_arcface=0), False)):
        full_cfg = _cfg(batch_size=8, per_identity=1, **weights)
        batch = train.synthetic_batch(_plain_model(**no_dropout).config, full_cfg, text_len=12)
        batch.pop("box_pixel_values"), batch.pop("box_targets")
        g_one, p_one = run(full_cfg, [batch])
        g_acc, p_acc = run(replace(full_cfg, batch_size=4, grad_accum=2), halves(batch))
        close = all(torch.allclose(g_one[n], g_acc[n], rtol=1e-4, atol=1e-7) for n in g_one)
        assert close == same, weights
        if same:
            assert all(torch.allclose(p_one[n], p_acc[n], rtol=1e-5, atol=1e-7) for n in p_one)


def test_precision_fits_the_device(monkeypatch):
    from capret_utils.train import precision as P

    assert P.resolve_precision("cpu") == P.resolve_precision("cuda", mixed=False) == "fp32"
    monkeypatch.setattr(P, "bf16_supported", lambda: True)
    assert P.resolve_precision("cuda") == "bf16" and P.grad_scaler("bf16", "cuda") is None
    monkeypatch.setattr(P, "bf16_supported", lambda: False)
    assert P.resolve_precision("cuda") == "fp16"
    assert isinstance(P.grad_scaler("fp16", "cpu"), torch.amp.GradScaler)
    assert P.describe("fp32", "cpu") == "precision: float32 on cpu (CPU)"
    assert "gradient scaler" in P.describe("fp16", "cpu") and "bf16 autocast" in P.describe("bf16", "cpu")
    assert isinstance(P.autocast("cpu", "fp32"), __import__("contextlib").nullcontext)
    with pytest.raises(ValueError, match="precision"):
        P.autocast("cpu", "fp8")
    # the fp16 path (loss scaling, unscale before clipping, scaler.step) gives the plain step's update
    cfg = _cfg(batch_size=8, per_identity=1, w_box=0, w_category=0)
    no_dropout = dict(vision_drop_path_rate=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    batch = train.synthetic_batch(_plain_model(**no_dropout).config, cfg, text_len=12)
    after = []
    for scaler in (None, torch.amp.GradScaler("cpu")):
        model = _plain_model(**no_dropout)
        torch.manual_seed(5)
        arc, _ = train.build_arcfaces(cfg, 8, model.config.embed_dim)
        criterion = train.Criterion(cfg, arc, None, torch.Generator().manual_seed(3), torch.device("cpu"))
        opt = train.build_optimizer(model, arc, cfg)
        train.train_step(model, criterion, opt, train.build_scheduler(opt, 10, cfg), iter([batch]), cfg, 0, scaler)
        after.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert all(torch.allclose(after[0][n], after[1][n], rtol=1e-5, atol=1e-7) for n in after[0])


def _planned_vs_measured(cfg, model_config, model, precision):
    from capret_utils.x2vlm import LoraSettings, apply_lora

    net = model
    if cfg.mode == "lora":
        lora = LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
        net = apply_lora(model, lora).get_base_model()
    net.set_layer_checkpointing(cfg.gradient_checkpointing)
    net.train()
    arc, cat = train.build_arcfaces(cfg, cfg.batch_size, model_config.embed_dim)
    criterion = train.Criterion(cfg, arc, cat, torch.Generator().manual_seed(0), torch.device("cpu"))
    criterion.precision = precision  # bf16 on CPU: one autocast region per pass, as on a GPU
    measured = train.measure_step(net, criterion, train.synthetic_batch(model_config, cfg))
    plan = train.plan_memory(cfg, model_config, device="cpu", precision=precision)
    return (plan.activations_gb + plan.autocast_weight_copies_gb) * 1024**3 / measured, plan


@pytest.mark.parametrize("mode,precision,checkpointing", [("full", "fp32", False), ("full", "bf16", False),
                                                          ("lora", "fp32", False), ("lora", "bf16", False),
                                                          ("full", "fp32", True), ("lora", "bf16", True)])
def test_memory_plan_matches_what_autograd_saves_demo(mode, precision, checkpointing):
    """The plan of the demo preset's step (crops, recoloured copies, box photos through vision and fusion, texts,
    ITM pairs) against the bytes autograd keeps for backward, measured on CPU: within 25 %."""
    cfg = _cfg(model="demo", batch_size=8, per_identity=1, category_recolour=8, finetune_mode=mode,
               gradient_checkpointing=checkpointing)
    mcfg = train.model_config(cfg)
    ratio, plan = _planned_vs_measured(cfg, mcfg, _plain_model("demo"), precision)
    assert plan.passes == {"crops": 8, "recoloured": 8, "box_images": 2, "texts": 8, "itm_pairs": 6}
    assert 0.75 <= ratio <= 1.25, (ratio, plan.as_dict())


@pytest.mark.slow
def test_memory_plan_matches_what_autograd_saves_base_architecture():
    """The base architecture (random weights, 224 px, batch 2, every pass): full fp32 and LoRA bf16 within 25 %
    of the measured saved bytes (about 40 s on 2 CPU cores)."""
    cfg = _cfg(model="base", image_res=224, batch_size=2, per_identity=1, box_fraction=0.5, category_recolour=2,
               finetune_mode="full")
    mcfg = train.model_config(cfg)
    model = _plain_model("base", image_res=224)
    for mode, precision in (("full", "fp32"), ("lora", "bf16")):
        ratio, plan = _planned_vs_measured(replace(cfg, finetune_mode=mode), mcfg, model, precision)
        assert 0.75 <= ratio <= 1.25, (mode, precision, ratio, plan.as_dict())


def test_memory_plan_counts_every_pass_and_stops_a_gpu_run_that_cannot_fit(monkeypatch):
    demo = train.TrainConfig()
    passes = train.step_passes(demo)
    assert passes.as_dict() == {"crops": 64, "recoloured": 64, "box_images": 16, "texts": 64, "itm_pairs": 48}
    x2vlm = train.config_from_params({"model": "base"}, "")
    assert train.step_passes(x2vlm).as_dict() == {"crops": 20, "recoloured": 0, "box_images": 0, "texts": 20,
                                                  "itm_pairs": 60}
    assert "not checked" in train.check_fits(demo, train.plan_memory(demo, device="cpu"), device="cpu")
    base = train.plan_memory(x2vlm, device="cuda")  # planned for a GPU (nothing runs)
    lighter = train.plan_memory(replace(x2vlm, gradient_checkpointing=True), device="cuda")
    assert lighter.total_gb < base.total_gb and base.settings["attention"] == "sdpa"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(4 * 1024**3), int(80 * 1024**3)))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    with pytest.raises(train.MemoryPlanError) as err:
        train.check_fits(x2vlm, base, device="cuda")
    message = str(err.value)
    for name in ("batch_size", "image_res", "gradient_checkpointing", "grad_accum", "Test GPU", "4.0 GiB free"):
        assert name in message, message
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(79 * 1024**3), int(80 * 1024**3)))
    assert "fits" in train.check_fits(x2vlm, base, device="cuda")


def test_finetune_with_gradient_checkpointing_and_accumulation_runs(splits, tmp_path):
    cfg = _cfg(max_steps=2, gradient_checkpointing=True, grad_accum=2, batch_size=4)
    result = train.finetune(train.prepare(cfg, splits[0]), tmp_path / "run")
    assert result.steps == 2 and result.info["precision"] == "fp32"
    assert not any(getattr(m, "gradient_checkpointing", False) is True for m in result.bundle.model.modules())
    epochs = result.history.loc[result.history["kind"] == "train", "epoch"].tolist()
    assert epochs == pytest.approx([2 / 5, 4 / 5])  # 18 smoke items: 5 micro-batches of 4 per epoch


def test_evaluate_reports_95_percent_intervals(splits):
    cfg = _cfg()
    setup = train.prepare(cfg, splits[0])
    res = train.evaluate(setup.bundle, splits[1], cfg)
    head = train.headline(res)
    assert head["top1_lo"] <= head["top1"] <= head["top1_hi"] and head["mAP_lo"] <= head["mAP"] <= head["mAP_hi"]
    from capret_utils.evaluation import stats

    n, hits = res["n_queries"], round(res["top1"] * res["n_queries"])
    assert (head["top1_lo"], head["top1_hi"]) == pytest.approx(stats.wilson_interval([1] * hits + [0] * (n - hits)))
