"""X2-VLM LoRA (peft) and the training-memory estimate."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from capret_utils.x2vlm import (
    LoraSettings,
    X2VLMConfig,
    X2VLMModel,
    apply_lora,
    estimate_training_memory,
    measure_saved_activations,
    merge_lora,
    trainable_parameters,
)
from capret_utils.x2vlm.lora import LORA_TARGETS, lora_state_dict, lora_target_regex
from capret_utils.x2vlm.memory import GB, count_parameters

SMALL = dict(vision_width=64, vision_layers=2, vision_heads=4, vision_mlp=128, patch_size=16, image_res=64,
             text_width=96, text_heads=4, text_ffn=192, text_layers=2, fusion_layers=2, vocab_size=200,
             max_position_embeddings=32, embed_dim=16)


def _batch(cfg: X2VLMConfig, b: int = 4, length: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (b, length), generator=g)
    ids[:, 0] = cfg.cls_token_id
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, 6:] = 0
    return {"pixel_values": torch.randn(b, 3, cfg.image_res, cfg.image_res, generator=g), "input_ids": ids,
            "attention_mask": mask}


def training_loss(model, batch) -> torch.Tensor:
    """ITC + ITM (1 positive and 2 shifted negatives per row) + box L1: the losses the fine-tuning loop uses."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = model(**batch, fuse=False)
    b = out.image_embeds.shape[0]
    itc = F.cross_entropy(out.itc_logits, torch.arange(b)) + F.cross_entropy(out.itc_logits.t(), torch.arange(b))
    neg = torch.roll(torch.arange(b), 1)
    images = torch.cat([out.image_embeds, out.image_embeds[neg], out.image_embeds])
    texts = torch.cat([out.text_embeds, out.text_embeds, out.text_embeds[neg]])
    masks = torch.cat([batch["attention_mask"]] * 2 + [batch["attention_mask"][neg]])
    fusion = base.get_fusion_embeds(texts, masks, images)
    labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long()
    itm = F.cross_entropy(base.itm_logits(fusion), labels)
    box = (base.predict_bbox(fusion[:b]) - torch.tensor([0.5, 0.5, 0.4, 0.6])).abs().sum(1).mean()
    return itc / 2 + itm + box


def test_default_targets_are_vision_text_fusion_query_value():
    model = X2VLMModel(X2VLMConfig(**SMALL))
    pattern = re.compile(lora_target_regex(LoraSettings()))
    names = sorted(n for n, _ in model.named_modules() if pattern.fullmatch(n))
    assert "vision_encoder.layers.0.attention.q_proj" in names and "vision_encoder.layers.1.attention.v_proj" in names
    assert "text_encoder.encoder.layer.1.attention.self.value" in names
    assert "fusion.0.crossattention.self.query" in names and "fusion.1.attention.self.value" in names
    assert not any(n.endswith(("k_proj", ".key", "o_proj")) for n in names)
    # 2 per vision block, 2 per text layer, 4 per fusion layer
    assert len(names) == 2 * 2 + 2 * 2 + 4 * 2
    assert set(LORA_TARGETS) == {"vision", "text", "fusion"}
    with pytest.raises(ValueError, match="choose from"):
        lora_target_regex(LoraSettings(targets=("decoder",)))


def test_trainable_parameter_count_by_hand():
    cfg = X2VLMConfig(**SMALL)
    model = apply_lora(X2VLMModel(cfg), LoraSettings(r=4, trainable_heads=(), train_temp=False))
    r, hv, ht = 4, cfg.vision_width, cfg.text_width
    vision = 2 * 2 * r * (hv + hv)  # q, v per block: A (r x in) + B (out x r)
    text = 2 * 2 * r * (ht + ht)
    fusion = 2 * (2 * r * (ht + ht) + r * (ht + ht) + r * (hv + ht))  # self q,v; cross q (text); cross v (vision)
    report = trainable_parameters(model)
    assert report["trainable"] == vision + text + fusion
    assert report["by_part"] == {"lora": vision + text + fusion}
    assert report["total"] == count_parameters(cfg) + vision + text + fusion
    with pytest.raises(ValueError, match="no module matched"):
        apply_lora(X2VLMModel(cfg), LoraSettings(target_regex=r"nothing\.here"))


def test_one_lora_step_trains_only_adapters_heads_and_temp():
    """The tiny preset trains end to end: ITC + ITM + box loss, LoRA on every default target."""
    torch.manual_seed(0)
    cfg = X2VLMConfig.preset("tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                             vision_drop_path_rate=0.0)
    model = apply_lora(X2VLMModel(cfg), LoraSettings(r=4, dropout=0.0)).train()
    batch = _batch(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(6):
        loss = training_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
            assert any("lora_B" in n for n in with_grad)  # B starts at zero, so only B moves on step 1
            assert {n for n in with_grad if "lora_" not in n and "modules_to_save" not in n} == \
                {"base_model.model.temp"}
            frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
            assert not frozen & with_grad
        optimizer.step()
        model.get_base_model().clamp_temp_()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all(("lora_" in n or "modules_to_save" in n or n.endswith("temp")) for n in changed)
    state = lora_state_dict(model)
    assert "temp" in state and any("lora_B" in k for k in state)


def test_lora_with_activation_checkpointing_still_reaches_the_adapters():
    torch.manual_seed(0)
    cfg = X2VLMConfig(**SMALL, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, vision_drop_path_rate=0.0)
    weights = X2VLMModel(cfg).state_dict()
    grads = []
    for checkpointing in (False, True):
        base = X2VLMModel(cfg)
        base.load_state_dict(weights)
        if checkpointing:
            base.activation_checkpointing_enable()
        torch.manual_seed(1)  # same LoRA A initialisation in both runs
        model = apply_lora(base, LoraSettings(r=4, dropout=0.0)).train()
        training_loss(model, _batch(cfg)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if "lora_B" in n})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 16
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5), name
    assert all(g.abs().sum() > 0 for g in grads[1].values())


def test_merge_and_unload_keeps_the_outputs(tmp_path):
    torch.manual_seed(1)
    cfg = X2VLMConfig(**SMALL)
    model = apply_lora(X2VLMModel(cfg), LoraSettings(r=4))
    with torch.no_grad():  # non-zero adapters and heads, as after training
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    batch = _batch(cfg, seed=2)
    with torch.no_grad():
        ref = model(**batch)
    merged = merge_lora(model).eval()
    assert isinstance(merged, X2VLMModel)
    assert not [n for n, _ in merged.named_modules() if "lora" in n or "modules_to_save" in n]
    with torch.no_grad():
        out = merged(**batch)
    for key in ("image_embeds", "text_embeds", "fusion_embeds", "itm_logits", "bbox", "itc_logits"):
        assert (out[key] - ref[key]).abs().max() < 1e-5, key
    merged.save_pretrained(tmp_path / "merged")
    again = X2VLMModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.equal(again(**batch).itm_logits, out.itm_logits)


# ---------------------------------------------------------------------------------------------- memory
def test_base_384_batch_32_bf16_lora_fits_one_24gb_gpu():
    est = estimate_training_memory(X2VLMConfig.preset("base"), batch_size=32, image_res=384, dtype="bf16",
                                   lora_rank=16)
    assert est.total_gb < 24.0, est.as_dict()
    assert 200e6 < est.total_params < 300e6
    assert est.vision_activations_gb > est.text_activations_gb  # 577 image tokens vs 40 text tokens
    assert est.allocated_gb < est.total_gb


def test_estimate_behaves_monotonically():
    cfg = X2VLMConfig.preset("base")
    small = estimate_training_memory(cfg, 8, image_res=384)
    big = estimate_training_memory(cfg, 32, image_res=384)
    assert big.vision_activations_gb == pytest.approx(4 * small.vision_activations_gb)
    assert estimate_training_memory(cfg, 32, image_res=224).total_gb < big.total_gb
    assert estimate_training_memory(cfg, 32, image_res=384, attention="eager").total_gb > big.total_gb
    assert estimate_training_memory(cfg, 32, image_res=384, gradient_checkpointing=True).total_gb < big.total_gb
    assert estimate_training_memory(cfg, 32, image_res=384, dtype="fp32").total_gb > big.total_gb
    full = estimate_training_memory(cfg, 32, image_res=384, lora_rank=0)
    assert full.trainable_params == full.total_params and full.trainable_state_gb > 2
    with pytest.raises(ValueError, match="dtype"):
        estimate_training_memory(cfg, 1, dtype="fp16")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_activation_estimate_agrees_with_what_autograd_saves(dtype):
    """Count the tensors autograd really keeps for one LoRA training step on CPU (eager attention, where CPU and
    GPU keep the same tensors) and compare with the estimate's activation + weight-copy terms."""
    torch.manual_seed(0)
    cfg = X2VLMConfig(**{**SMALL, "image_res": 96}, attn_implementation="eager")
    model = apply_lora(X2VLMModel(cfg), LoraSettings(r=8)).train()
    batch = _batch(cfg, b=4, length=16)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            return training_loss(model, batch)

    measured = measure_saved_activations(model, step)
    est = estimate_training_memory(cfg, 4, dtype=dtype, lora_rank=8, text_len=16, attention="eager")
    estimated = (est.vision_activations_gb + est.text_activations_gb + est.fusion_activations_gb
                 + est.autocast_weight_copies_gb) * GB
    assert 0.75 < estimated / measured < 1.4, (estimated, measured)


def test_estimate_counts_every_pass_of_a_step():
    from capret_utils.x2vlm import StepPasses

    cfg = X2VLMConfig.preset("base")
    plain = StepPasses(crops=16, texts=16, itm_pairs=48)
    est = estimate_training_memory(cfg, 16, image_res=384, passes=plain)
    assert est.passes == plain.as_dict() and est.settings["image_res"] == 384
    recoloured = estimate_training_memory(cfg, 16, image_res=384, passes=StepPasses(**{**plain.as_dict(),
                                                                                     "recoloured": 16}))
    boxes = estimate_training_memory(cfg, 16, image_res=384, passes=StepPasses(**{**plain.as_dict(),
                                                                                "box_images": 4}))
    # the recoloured copies are a second vision pass as big as the crops'; box photos go through vision + fusion
    assert recoloured.by_pass_gb["recoloured"] == pytest.approx(est.by_pass_gb["crops"])
    assert recoloured.vision_activations_gb == pytest.approx(2 * est.vision_activations_gb)
    assert boxes.fusion_activations_gb > est.fusion_activations_gb
    assert boxes.vision_activations_gb == pytest.approx(est.vision_activations_gb * 20 / 16)
    assert recoloured.autocast_weight_copies_gb > est.autocast_weight_copies_gb  # one more autocast region
    for lora_rank in (16, 0):
        for dtype in ("bf16", "fp32"):
            on = estimate_training_memory(cfg, 16, image_res=384, passes=plain, lora_rank=lora_rank, dtype=dtype,
                                          gradient_checkpointing=True)
            off = estimate_training_memory(cfg, 16, image_res=384, passes=plain, lora_rank=lora_rank, dtype=dtype)
            assert on.activations_gb < 0.2 * off.activations_gb, (lora_rank, dtype)
    assert "crops 16" in est.summary() and "itm_pairs 48" in est.summary()
    with pytest.raises(ValueError, match="attention"):
        estimate_training_memory(cfg, 1, attention="flash")


def test_new_zero_initialised_parts_are_trained_fully_under_lora():
    """vision_stripes' pooling map and vision_abs_pos' position embeddings start at zero: LoRA must train them
    fully, or they would stay zero and the options would silently do nothing."""
    model = apply_lora(X2VLMModel(X2VLMConfig(**SMALL, vision_stripes=2, vision_abs_pos=True)), LoraSettings(r=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("stripe_pool" in n and n.endswith("weight") for n in trainable)
    assert any(n.endswith("embeddings.position_embeddings") for n in trainable)
    plain = apply_lora(X2VLMModel(X2VLMConfig(**SMALL)), LoraSettings(r=4))  # off: nothing named, nothing added
    names = [n for n, _ in plain.named_parameters()]
    assert not any("stripe_pool" in n or "position_embeddings" in n and "vision" in n for n in names)
