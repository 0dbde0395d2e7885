"""X2-VLM model and official checkpoint loading: equivalence with the official outputs, manifests, strictness.

Reference data: ``../shared/data/x2vlm`` (key manifests of the official classes and the tiny official-format
checkpoint with the official outputs). Tests that need it skip with a reason when it is absent.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from capret_utils.common import repo_root
from capret_utils.x2vlm import (
    OfficialCheckpointError,
    X2VLMConfig,
    X2VLMModel,
    config_from_official,
    load_official_checkpoint,
    official_to_capret,
    read_official_checkpoint,
    resize_rel_pos_table,
    to_official_state_dict,
)
from capret_utils.x2vlm.config import PRESETS
from capret_utils.x2vlm.convert import geometric_source_grid

X2VLM_DATA = repo_root().parent / "shared" / "data" / "x2vlm"
TINY = X2VLM_DATA / "tiny_public"
EMBED_TOL, LOGIT_TOL = 1e-5, 1e-4
TOLERANCE = {"image_embeds": EMBED_TOL, "image_feat": EMBED_TOL, "text_embeds": EMBED_TOL, "text_feat": EMBED_TOL,
             "fusion_embeds": EMBED_TOL, "bbox": EMBED_TOL, "itm_logits": LOGIT_TOL, "itc_logits": LOGIT_TOL,
             "mlm_logits": LOGIT_TOL, "temp": 0.0}
MANIFESTS = [  # file, preset, image_res, naming
    ("x2vlm_base_pretrain_keys.json", "base", 224, "pretrain"),
    ("x2vlm_base_retrieval_224_keys.json", "base", 224, "retrieval"),
    ("x2vlm_base_retrieval_384_keys.json", "base", 384, "retrieval"),
    ("x2vlm_large_pretrain_keys.json", "large", 224, "pretrain"),
    ("x2vlm_large_retrieval_384_keys.json", "large", 384, "retrieval"),
]


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"X2-VLM reference data {path} is not available")
    return path


@pytest.fixture(scope="module")
def tiny_ckpt() -> Path:
    return _need(TINY / "checkpoint.th")


@pytest.fixture(scope="module")
def tiny_io() -> tuple[dict, dict]:
    _need(TINY)
    return torch.load(TINY / "inputs.pt"), torch.load(TINY / "outputs.pt")


@pytest.fixture(scope="module")
def tiny_model(tiny_ckpt) -> X2VLMModel:
    return X2VLMModel.from_official(tiny_ckpt, text_num_attention_heads=4).eval()


def run_all(model: X2VLMModel, inputs: dict) -> dict[str, torch.Tensor]:
    """Every reference quantity the fixture holds, computed by ``model``."""
    with torch.no_grad():
        out = model(**inputs, return_mlm=model.mlm_head is not None)
    result = {k: v for k, v in out.items() if v is not None}
    if "mlm_logits" in result:
        result["mlm_logits"] = result["mlm_logits"][:, :4]
    result["temp"] = model.temp.detach()
    return result


def assert_matches(got: dict, ref: dict, keys=None) -> None:
    for key in keys or ref:
        assert key in got, f"{key} missing from the model outputs"
        assert got[key].shape == ref[key].shape, f"{key}: {tuple(got[key].shape)} vs {tuple(ref[key].shape)}"
        diff = (got[key].float() - ref[key].float()).abs().max().item()
        assert diff <= TOLERANCE.get(key, EMBED_TOL), f"{key}: max |diff| {diff:.3g}"


# ---------------------------------------------------------------------------------------------- naive reference
def naive_official_forward(sd: dict, cfg: X2VLMConfig, pixel_values, input_ids, attention_mask) -> dict:
    """The official formulas written out in plain torch on an *official-named* state dict (independent of HF)."""
    B = pixel_values.shape[0]
    Wv, Hv, Wt, Ht = cfg.vision_width, cfg.vision_heads, cfg.text_width, cfg.text_heads
    v = "vision_encoder."
    x = F.conv2d(pixel_values, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"],
                 stride=cfg.patch_size).flatten(2).transpose(1, 2)
    x = torch.cat([sd[v + "cls_token"].expand(B, -1, -1), x], 1)
    T = x.shape[1]
    for i in range(cfg.vision_layers):
        p = f"{v}blocks.{i}."
        h = F.layer_norm(x, (Wv,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
        bias = torch.cat([sd[p + "attn.q_bias"], torch.zeros_like(sd[p + "attn.v_bias"]), sd[p + "attn.v_bias"]])
        q, k, vv = F.linear(h, sd[p + "attn.qkv.weight"], bias).reshape(B, T, 3, Hv, -1).permute(2, 0, 3, 1, 4)
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        table, index = sd[p + "attn.relative_position_bias_table"], sd[p + "attn.relative_position_index"]
        scores = scores + table[index.reshape(-1)].reshape(T, T, Hv).permute(2, 0, 1)
        o = (scores.softmax(-1) @ vv).transpose(1, 2).reshape(B, T, Wv)
        x = x + sd[p + "gamma_1"] * F.linear(o, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.layer_norm(x, (Wv,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
        h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                     sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        x = x + sd[p + "gamma_2"] * h
    patches = F.layer_norm(x[:, 1:], (Wv,), sd[v + "fc_norm.weight"], sd[v + "fc_norm.bias"], 1e-6)
    image_embeds = torch.cat([patches.mean(1, keepdim=True), patches], 1)

    t = "text_encoder.bert." if "text_encoder.bert.embeddings.word_embeddings.weight" in sd else "text_encoder."
    L = input_ids.shape[1]
    e = sd[t + "embeddings.word_embeddings.weight"][input_ids] + sd[t + "embeddings.position_embeddings.weight"][:L]
    e = e + sd[t + "embeddings.token_type_embeddings.weight"][0]
    x = F.layer_norm(e, (Wt,), sd[t + "embeddings.LayerNorm.weight"], sd[t + "embeddings.LayerNorm.bias"], 1e-12)
    ext = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0

    def attend(h, kv, p, mask):
        def heads(z):
            return z.reshape(z.shape[0], z.shape[1], Ht, -1).transpose(1, 2)

        q = heads(F.linear(h, sd[p + "self.query.weight"], sd[p + "self.query.bias"]))
        k = heads(F.linear(kv, sd[p + "self.key.weight"], sd[p + "self.key.bias"]))
        val = heads(F.linear(kv, sd[p + "self.value.weight"], sd[p + "self.value.bias"]))
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + mask
        ctx = (scores.softmax(-1) @ val).transpose(1, 2).reshape(h.shape)
        out = F.linear(ctx, sd[p + "output.dense.weight"], sd[p + "output.dense.bias"])
        return F.layer_norm(out + h, (Wt,), sd[p + "output.LayerNorm.weight"], sd[p + "output.LayerNorm.bias"], 1e-12)

    outs = {}
    for i in range(cfg.text_layers + cfg.fusion_layers):
        p = f"{t}encoder.layer.{i}."
        if i == cfg.text_layers:
            outs["text_embeds"] = x
        x = attend(x, x, p + "attention.", ext)
        if i >= cfg.text_layers:
            x = attend(x, image_embeds, p + "crossattention.", 0.0)
        h = F.gelu(F.linear(x, sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"]))
        h = F.linear(h, sd[p + "output.dense.weight"], sd[p + "output.dense.bias"])
        x = F.layer_norm(h + x, (Wt,), sd[p + "output.LayerNorm.weight"], sd[p + "output.LayerNorm.bias"], 1e-12)
    fusion = x

    def mlp(prefix, z):
        z = F.linear(z, sd[prefix + "0.weight"], sd[prefix + "0.bias"])
        z = F.gelu(F.layer_norm(z, (z.shape[-1],), sd[prefix + "1.weight"], sd[prefix + "1.bias"], 1e-5))
        return F.linear(z, sd[prefix + "3.weight"], sd[prefix + "3.bias"])

    image_feat = F.normalize(F.linear(image_embeds[:, 0], sd["vision_proj.weight"], sd["vision_proj.bias"]), dim=-1)
    text_feat = F.normalize(F.linear(outs["text_embeds"][:, 0], sd["text_proj.weight"], sd["text_proj.bias"]),
                            dim=-1)
    outs.update(image_embeds=image_embeds, image_feat=image_feat, text_feat=text_feat, fusion_embeds=fusion,
                itc_logits=image_feat @ text_feat.t() / sd["temp"], itm_logits=mlp("itm_head.", fusion[:, 0]))
    if "bbox_head.0.weight" in sd:
        outs["bbox"] = mlp("bbox_head.", fusion[:, 0]).sigmoid()
    return outs


# ---------------------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_tiny_official_checkpoint_reproduces_every_reference_output(tiny_ckpt, tiny_io, attn):
    inputs, ref = tiny_io
    model = X2VLMModel.from_official(tiny_ckpt, text_num_attention_heads=4, attn_implementation=attn).eval()
    assert model.config._attn_implementation == attn
    assert model._fusion_config._attn_implementation == attn
    assert model.vision_encoder.config._attn_implementation == attn
    report = model.official_load_report
    assert report.naming == "pretrain" and report.checkpoint_image_res == 32 and not report.resized
    assert len(report.recomputed) == 3  # 2 relative_position_index + position_ids, checked then dropped
    assert set(ref) == set(TOLERANCE)
    assert_matches(run_all(model, inputs), ref)


def test_set_attn_implementation_switches_every_part(tiny_model, tiny_io):
    inputs, ref = tiny_io
    tiny_model.set_attn_implementation("eager")
    try:
        assert {tiny_model.vision_encoder.config._attn_implementation,
                tiny_model.text_encoder.config._attn_implementation,
                tiny_model._fusion_config._attn_implementation} == {"eager"}
        assert_matches(run_all(tiny_model, inputs), ref)
    finally:
        tiny_model.set_attn_implementation("sdpa")


def test_naive_reference_reproduces_the_fixture(tiny_ckpt, tiny_io):
    """The hand-written official formulas match the official outputs, so they can judge other configs."""
    inputs, ref = tiny_io
    state, _, _ = read_official_checkpoint(tiny_ckpt)
    cfg = X2VLMConfig.preset("tiny", has_mlm_head=True)
    got = naive_official_forward(state, cfg, **inputs)
    assert_matches(got, ref, keys=[k for k in got])


def test_embedding_definitions_by_hand(tiny_model, tiny_io):
    inputs, _ = tiny_io
    with torch.no_grad():
        out = tiny_model(**inputs)
        hidden = tiny_model.vision_encoder(pixel_values=inputs["pixel_values"]).last_hidden_state
    # token 0 = mean of the fc_norm-ed patch tokens (not HF's pooler_output = LayerNorm(mean))
    assert torch.allclose(out.image_embeds[:, 0], out.image_embeds[:, 1:].mean(1), atol=1e-6)
    patches = tiny_model.vision_encoder.pooler.layernorm(hidden[:, 1:])
    assert torch.allclose(out.image_embeds[:, 1:], patches, atol=1e-6)
    assert torch.allclose(out.image_feat.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert torch.allclose(out.text_feat.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert torch.allclose(out.itc_logits, out.image_feat @ out.text_feat.T / tiny_model.temp, atol=1e-6)
    assert ((out.bbox > 0) & (out.bbox < 1)).all()
    # the separate methods give the forward's quantities
    with torch.no_grad():
        emb, feat = tiny_model.get_image_embeds(inputs["pixel_values"])
        txt = tiny_model.get_text_embeds(inputs["input_ids"], inputs["attention_mask"])
        fus = tiny_model.get_fusion_embeds(txt, inputs["attention_mask"], emb)
    assert torch.equal(emb, out.image_embeds) and torch.equal(feat, out.image_feat)
    assert torch.equal(fus, out.fusion_embeds)
    assert torch.equal(tiny_model.itm_logits(fus), out.itm_logits)
    # a batch without padding gets no mask under sdpa: the fusion self-attention must stay bidirectional
    assert tiny_model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        alone = tiny_model(**{k: v[[0]] for k, v in inputs.items()})
    assert torch.allclose(alone.fusion_embeds[0], out.fusion_embeds[0], atol=1e-5)
    assert torch.allclose(alone.text_embeds[0], out.text_embeds[0], atol=1e-5)
    # an all-ones image mask is the official "no mask"
    with torch.no_grad():
        fus_masked = tiny_model.get_fusion_embeds(txt, inputs["attention_mask"], emb, torch.ones(3, 5))
    assert torch.allclose(fus_masked, fus, atol=1e-6)


def test_forward_modes_and_input_errors(tiny_model, tiny_io):
    inputs, _ = tiny_io
    with torch.no_grad():
        img_only = tiny_model(pixel_values=inputs["pixel_values"])
        txt_only = tiny_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        cross = tiny_model(pixel_values=inputs["pixel_values"][:2], **{k: v for k, v in inputs.items()
                                                                       if k != "pixel_values"})
    assert img_only.text_feat is None and img_only.image_feat.shape == (3, 16)
    assert txt_only.image_feat is None and txt_only.text_embeds.shape == (3, 12, 48)
    assert cross.itc_logits.shape == (2, 3) and cross.fusion_embeds is None  # 2 images x 3 texts: no pairing
    with pytest.raises(ValueError, match="32x32"):
        tiny_model(pixel_values=torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="pairs text i with image i"):
        tiny_model.get_fusion_embeds(txt_only.text_embeds, inputs["attention_mask"], img_only.image_embeds[:2])


def test_temp_clamp(tiny_ckpt):
    model = X2VLMModel.from_official(tiny_ckpt, text_num_attention_heads=4)
    with torch.no_grad():
        model.temp.fill_(2.0)
    assert model.clamp_temp_() == pytest.approx(0.5)
    with torch.no_grad():
        model.temp.fill_(1e-6)
    assert model.clamp_temp_() == pytest.approx(0.001)


def test_bf16_autocast_on_cpu_stays_close(tiny_model, tiny_io):
    inputs, ref = tiny_io
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_model(**inputs)
    assert torch.isfinite(out.itm_logits).all()
    assert (out.image_feat.float() - ref["image_feat"]).abs().max() < 0.1


# ---------------------------------------------------------------------------------------------- manifests
@pytest.mark.parametrize("manifest,preset,res,naming", MANIFESTS)
def test_presets_on_meta_device_match_official_manifests(manifest, preset, res, naming):
    entries = json.loads(_need(X2VLM_DATA / manifest).read_text())
    expected = {name: tuple(shape) for name, shape in entries}
    assert len(expected) == len(entries)
    heads = naming == "pretrain"
    cfg = X2VLMConfig.preset(preset, image_res=res, has_mlm_head=heads, has_bbox_head=heads)
    with torch.device("meta"):
        model = X2VLMModel(cfg)
    # ours -> official: names (incl. the recomputed buffers and the tied decoder) and shapes exactly
    official = to_official_state_dict(model, cfg, naming)
    got = {k: tuple(v.shape) for k, v in official.items()}
    assert set(got) == set(expected), (sorted(set(expected) - set(got))[:5], sorted(set(got) - set(expected))[:5])
    assert {k for k in expected if got[k] != expected[k]} == set()
    # official -> ours: the manifest's names map onto exactly the model's state dict
    meta_sd = {name: torch.empty(shape, device="meta") for name, shape in expected.items()}
    mapped, report = official_to_capret(meta_sd, cfg, source=manifest)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(mapped) == set(ours)
    assert all(tuple(mapped[k].shape) == ours[k] for k in mapped)
    assert report.naming == naming
    assert len(report.recomputed) == cfg.vision_layers + 1  # every relative_position_index + position_ids
    # the config inferred from the manifest's shapes is the preset
    inferred = config_from_official(meta_sd, source=manifest)
    for field in ("vision_width", "vision_layers", "vision_heads", "vision_mlp", "patch_size", "image_res",
                  "text_width", "text_heads", "text_ffn", "text_layers", "fusion_layers", "vocab_size",
                  "max_position_embeddings", "embed_dim", "has_itm_head", "has_bbox_head", "has_mlm_head"):
        assert getattr(inferred, field) == getattr(cfg, field), field


def test_large_preset_numbers():
    cfg = X2VLMConfig.preset("large", image_res=384)
    assert (cfg.vision_width, cfg.vision_layers, cfg.vision_heads, cfg.text_width, cfg.text_heads) == \
        (1024, 24, 16, 1024, 16)
    assert cfg.rel_pos_table_rows == 2212 and cfg.num_image_tokens == 577
    with pytest.raises(ValueError, match="unknown X2-VLM preset"):
        X2VLMConfig.preset("huge")
    with pytest.raises(ValueError, match="not divisible by text_heads"):
        X2VLMConfig.preset("tiny", text_heads=5)


# ---------------------------------------------------------------------------------------------- strict loading
def _tiny_state(tiny_ckpt) -> dict:
    state, _, _ = read_official_checkpoint(tiny_ckpt)
    return dict(state)


def test_renamed_key_fails_naming_both_sides(tiny_ckpt):
    state = _tiny_state(tiny_ckpt)
    state["vision_encoder.blocks.0.norm_1.weight"] = state.pop("vision_encoder.blocks.0.norm1.weight")
    with pytest.raises(OfficialCheckpointError) as err:
        X2VLMModel.from_official(state, text_num_attention_heads=4)
    message = str(err.value)
    assert "vision_encoder.blocks.0.norm_1.weight" in message  # the leftover
    assert "vision_encoder.blocks.0.norm1.weight" in message  # the missing key, by its official name


def test_missing_key_fails_naming_it(tiny_ckpt):
    state = _tiny_state(tiny_ckpt)
    del state["text_encoder.bert.encoder.layer.3.crossattention.self.value.bias"]
    with pytest.raises(OfficialCheckpointError, match=r"fusion\.1\.crossattention\.self\.value\.bias \(official "
                                                      r"text_encoder\.bert\.encoder\.layer\.3\.crossattention"):
        X2VLMModel.from_official(state, text_num_attention_heads=4)


def test_corrupt_recomputed_buffer_is_an_error(tiny_ckpt):
    state = _tiny_state(tiny_ckpt)
    state["vision_encoder.blocks.1.attn.relative_position_index"] = torch.zeros(5, 5, dtype=torch.long)
    with pytest.raises(OfficialCheckpointError, match="relative_position_index"):
        X2VLMModel.from_official(state, text_num_attention_heads=4)


def test_shape_mismatch_with_a_given_config(tiny_ckpt):
    cfg = X2VLMConfig.preset("tiny", vision_heads=2, has_mlm_head=True)
    with pytest.raises(OfficialCheckpointError, match="relative_position_bias_table: checkpoint"):
        load_official_checkpoint(tiny_ckpt, cfg)


def test_heads_are_dropped_only_when_named(tiny_ckpt, tiny_io):
    cfg = X2VLMConfig.preset("tiny", has_bbox_head=False, has_mlm_head=False)
    with pytest.raises(OfficialCheckpointError, match=r"bbox_head\.0\.weight"):
        load_official_checkpoint(tiny_ckpt, cfg)
    model = load_official_checkpoint(tiny_ckpt, cfg, drop=("bbox_head", "mlm_head")).eval()
    assert sum(k.startswith("bbox_head.") for k in model.official_load_report.dropped) == 6
    inputs, ref = tiny_io
    assert_matches(run_all(model, inputs), ref, keys=["image_embeds", "fusion_embeds", "itm_logits", "itc_logits"])
    with pytest.raises(ValueError, match="cannot drop"):
        load_official_checkpoint(tiny_ckpt, cfg, drop=("vision_encoder",))


def test_retrieval_naming_round_trip_and_new_box_head(tiny_ckpt, tiny_io):
    inputs, ref = tiny_io
    pre = X2VLMModel.from_official(tiny_ckpt, text_num_attention_heads=4, drop=("bbox_head", "mlm_head"))
    retrieval = to_official_state_dict(pre, pre.config, naming="retrieval")
    assert not any(k.startswith(("text_encoder.bert.", "text_encoder.cls.", "bbox_head.")) for k in retrieval)
    model = X2VLMModel.from_official(dict(retrieval), text_num_attention_heads=4).eval()
    assert model.official_load_report.naming == "retrieval"
    assert not model.config.has_bbox_head and not model.config.has_mlm_head
    assert_matches(run_all(model, inputs), ref, keys=["image_embeds", "text_embeds", "fusion_embeds", "itm_logits",
                                                      "itc_logits"])
    with_box = X2VLMModel.from_official(dict(retrieval), text_num_attention_heads=4, add_heads=("bbox_head",))
    assert with_box.bbox_head is not None
    assert sorted(with_box.official_load_report.new_heads)[0] == "bbox_head.0.bias"
    with pytest.raises(ValueError, match="no bbox_head"):
        model.predict_bbox(torch.zeros(1, 2, 48))


def test_official_export_round_trip_is_exact(tiny_ckpt):
    state = _tiny_state(tiny_ckpt)
    model = X2VLMModel.from_official(tiny_ckpt, text_num_attention_heads=4)
    exported = to_official_state_dict(model, model.config, naming="pretrain")
    assert set(exported) == set(state)
    for key, value in state.items():
        assert torch.equal(exported[key].to(value.dtype), value), key


def test_text_head_count_rules(tiny_ckpt):
    # the fixture's stored config records 4 heads: used when none is given, a contradiction is an error
    assert X2VLMModel.from_official(tiny_ckpt).config.text_heads == 4
    with pytest.raises(OfficialCheckpointError, match="contradicts the checkpoint config"):
        X2VLMModel.from_official(tiny_ckpt, text_num_attention_heads=3)
    bare = _tiny_state(tiny_ckpt)  # no config: hidden / 64 cannot apply to a 48-wide text encoder
    with pytest.raises(OfficialCheckpointError, match="pass text_num_attention_heads"):
        X2VLMModel.from_official(bare)
    with pytest.raises(OfficialCheckpointError, match="not divisible"):
        X2VLMModel.from_official(bare, text_num_attention_heads=5)


class _YamlLikeConfig(dict):
    """Stands in for a config stored as a custom class (needs full unpickling)."""


def test_file_formats(tmp_path, tiny_ckpt, tiny_io):
    inputs, ref = tiny_io
    state = _tiny_state(tiny_ckpt)
    torch.save({"model": state}, tmp_path / "legacy.th", _use_new_zipfile_serialization=False)  # no mmap
    model = X2VLMModel.from_official(tmp_path / "legacy.th", text_num_attention_heads=4).eval()
    assert_matches(run_all(model, inputs), ref, keys=["image_embeds", "fusion_embeds", "mlm_logits"])
    torch.save({"model": state, "config": _YamlLikeConfig(image_res=32)}, tmp_path / "pickled.th")
    with pytest.raises(OfficialCheckpointError, match="trust_checkpoint=True"):
        X2VLMModel.from_official(tmp_path / "pickled.th", text_num_attention_heads=4)
    trusted = X2VLMModel.from_official(tmp_path / "pickled.th", text_num_attention_heads=4, trust_checkpoint=True)
    assert trusted.official_load_report.checkpoint_config == {"image_res": 32}


def test_unreadable_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        X2VLMModel.from_official(tmp_path / "nope.th")
    torch.save([1, 2, 3], tmp_path / "list.th")
    with pytest.raises(OfficialCheckpointError, match="expected a dict"):
        X2VLMModel.from_official(tmp_path / "list.th")


# ---------------------------------------------------------------------------------------------- resize
def test_geometric_grid_matches_the_documented_ratios():
    grid = geometric_source_grid(27, 47)  # 224 -> 384
    q = (grid[-1] - grid[-2]) / (grid[-2] - grid[-3])
    assert q == pytest.approx(1.0903, abs=5e-4) and grid[-1] == pytest.approx(23, abs=1e-3)
    assert len(grid) == 27 and grid[13] == 0 and np.allclose(grid, -grid[::-1])
    grid = geometric_source_grid(27, 95)  # 224 -> 768
    assert (grid[-1] - grid[-2]) / (grid[-2] - grid[-3]) == pytest.approx(1.1955, abs=5e-4)
    assert grid[-1] == pytest.approx(47, abs=1e-3)


def test_resize_same_grid_is_identity_and_shapes():
    table = torch.randn(732, 12)
    assert resize_rel_pos_table(table, 14) is table
    out = resize_rel_pos_table(table, 24)
    assert out.shape == (2212, 12) and out.dtype == table.dtype
    assert torch.equal(out[-3:], table[-3:])  # cls->token, token->cls, cls->cls copied unchanged


def test_resize_reproduces_a_cubic_on_the_geometric_grid_exactly():
    """A bicubic interpolating spline reproduces any cubic: sample one on the source grid, expect it at the
    integer target offsets (checks the method and the row/column orientation)."""
    grid = geometric_source_grid(27, 47)

    def g(dy, dx):
        return 0.3 + 0.02 * dx - 0.05 * dy + 1e-3 * dx * dy + 2e-5 * dx**3 - 1e-4 * dy**2

    dy, dx = np.meshgrid(grid, grid, indexing="ij")
    table = torch.cat([torch.tensor(np.stack([g(dy, dx), 2 * g(dy, dx)], -1).reshape(-1, 2)),
                       torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=torch.float64)])
    out = resize_rel_pos_table(table, 24).numpy()
    ty, tx = np.meshgrid(np.arange(-23, 24.0), np.arange(-23, 24.0), indexing="ij")
    expected = g(ty, tx).reshape(-1)
    inside = (np.abs(ty) <= grid[-1]) & (np.abs(tx) <= grid[-1])  # the edge +-23 lies 7e-5 outside: clamped
    assert np.abs(out[:-3, 0] - expected)[inside.reshape(-1)].max() < 1e-9
    assert np.abs(out[:-3, 0] - expected).max() < 1e-3
    assert np.allclose(out[:-3, 1], 2 * out[:-3, 0])


def test_resize_keeps_a_smooth_table_smooth():
    grid = geometric_source_grid(27, 47)
    dy, dx = np.meshgrid(grid, grid, indexing="ij")
    bump = np.exp(-(dx**2 + dy**2) / 60.0)
    table = torch.cat([torch.tensor(bump.reshape(-1, 1), dtype=torch.float32), torch.zeros(3, 1)])
    out = resize_rel_pos_table(table, 24)[:-3, 0].reshape(47, 47).numpy()
    assert out.max() == pytest.approx(1.0, abs=1e-3) and out.min() > -0.01  # no ringing
    assert np.abs(np.diff(out, 2, axis=0)).max() < 0.05 and np.abs(np.diff(out, 2, axis=1)).max() < 0.05
    assert np.allclose(out, out.T, atol=1e-5)  # symmetric input stays symmetric


def test_loading_at_another_resolution_resizes_every_table(tiny_ckpt):
    cfg = X2VLMConfig.preset("tiny", image_res=64, has_mlm_head=True)
    donor = X2VLMModel(cfg)
    official = to_official_state_dict(donor, cfg)  # a 64 px (4x4 grid) official-format file
    model = X2VLMModel.from_official(dict(official), text_num_attention_heads=4, image_res=96).eval()
    report = model.official_load_report
    assert report.checkpoint_image_res == 64 and report.model_image_res == 96 and len(report.resized) == 2
    table = model.vision_encoder.layers[1].relative_position_bias.relative_position_bias_table
    expected = resize_rel_pos_table(official["vision_encoder.blocks.1.attn.relative_position_bias_table"], 6)
    assert table.shape == (124, 4) and torch.allclose(table, expected)
    with torch.no_grad():
        out = model(pixel_values=torch.randn(2, 3, 96, 96), input_ids=torch.tensor([[101, 5, 102]] * 2))
    assert out.image_embeds.shape == (2, 37, 48) and torch.isfinite(out.itm_logits).all()
    # the 32 px fixture (2x2 grid: only 3 points per axis) still resizes
    assert X2VLMModel.from_official(tiny_ckpt, text_num_attention_heads=4, image_res=64).official_load_report.resized


# ---------------------------------------------------------------------------------------------- other sizes
def test_vision_width_differs_from_text_width_matches_naive_reference():
    torch.manual_seed(0)
    cfg = X2VLMConfig(vision_width=32, vision_layers=2, vision_heads=2, vision_mlp=64, patch_size=8, image_res=24,
                      text_width=64, text_heads=4, text_ffn=128, text_layers=2, fusion_layers=2, vocab_size=50,
                      max_position_embeddings=16, embed_dim=8, pad_token_id=0, unk_token_id=1, cls_token_id=2,
                      sep_token_id=3, mask_token_id=4)
    model = X2VLMModel(cfg).eval()
    with torch.no_grad():  # move every parameter off its trivial init so that a wrong map shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    cross = model.fusion[0].crossattention.self
    assert cross.key.in_features == 32 and cross.key.out_features == 64 and cross.query.in_features == 64
    inputs = dict(pixel_values=torch.randn(2, 3, 24, 24), input_ids=torch.tensor([[2, 7, 9, 3, 0], [2, 11, 3, 0, 0]]),
                  attention_mask=torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]))
    official = to_official_state_dict(model, cfg, naming="pretrain")
    assert official["text_encoder.bert.encoder.layer.2.crossattention.self.key.weight"].shape == (64, 32)
    ref = naive_official_forward(official, cfg, **inputs)
    assert_matches(run_all(model, inputs), ref, keys=list(ref))
    # and the official-format dict loads back (config read from the shapes) to the same outputs
    again = X2VLMModel.from_official(dict(official))  # no recorded head count: BERT's hidden / 64 = 1
    assert (again.config.vision_width, again.config.text_width, again.config.text_heads) == (32, 64, 1)
    reloaded = X2VLMModel.from_official(dict(official), text_num_attention_heads=4).eval()
    assert_matches(run_all(reloaded, inputs), ref, keys=list(ref))


# ---------------------------------------------------------------------------------------------- own weights
def test_save_pretrained_round_trip_with_tied_weights(tmp_path, tiny_model, tiny_io):
    from safetensors.torch import load_file
    from transformers import AutoModel

    inputs, _ = tiny_io
    tiny_model.save_pretrained(tmp_path / "m")
    saved = load_file(tmp_path / "m" / "model.safetensors")
    assert "mlm_head.predictions.decoder.weight" not in saved  # tied: stored once
    for loader in (X2VLMModel.from_pretrained, AutoModel.from_pretrained):
        model = loader(tmp_path / "m").eval()
        assert isinstance(model, X2VLMModel)
        assert model.mlm_head.predictions.decoder.weight is model.text_encoder.embeddings.word_embeddings.weight
        a, b = run_all(tiny_model, inputs), run_all(model, inputs)
        assert all(torch.equal(a[k], b[k]) for k in a)


def _conv_stem_config(**kw) -> X2VLMConfig:
    base = dict(PRESETS["tiny"], image_res=32, patch_size=8, vision_stem="conv")
    base.update(kw)
    return X2VLMConfig(**base)


# patch 8, width 48. "conv": three stride-2 3x3 convolutions (32, then 64 capped at the width, then the width) with
# BatchNorm + GELU between them. "cnn": a stride-2 3x3 convolution to 32, two stride-1 blocks (64, 96) each with
# BatchNorm + ReLU + 2x2 max-pool, then a 3x3 convolution to the width.
STEMS = {
    "conv": ([((3, 3), (2, 2), 32), ((3, 3), (2, 2), 48), ((3, 3), (2, 2), 48)], 2, 0),
    "cnn": ([((3, 3), (2, 2), 32), ((3, 3), (1, 1), 64), ((3, 3), (1, 1), 96), ((3, 3), (1, 1), 48)], 3, 2),
}


@pytest.mark.parametrize("stem_kind", sorted(STEMS))
def test_conv_stem_keeps_the_token_grid_and_round_trips(tmp_path, stem_kind):
    from transformers import AutoModel

    cfg = _conv_stem_config(vision_stem=stem_kind)
    torch.manual_seed(0)
    model = X2VLMModel(cfg)
    stem = model.vision_encoder.embeddings.patch_embeddings.projection
    convs = [m for m in stem if isinstance(m, torch.nn.Conv2d)]
    layout, n_norm, n_pool = STEMS[stem_kind]
    assert cfg.vision_width == 48
    assert [(c.kernel_size, c.stride, c.out_channels) for c in convs] == layout
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in stem) == n_norm
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in stem) == n_pool
    pixels = torch.randn(3, 3, 32, 32)
    model.train()
    model.get_image_embeds(pixels)  # moves the BatchNorm running statistics away from their initial values
    model.eval()
    embeds, feat = model.get_image_embeds(pixels)
    assert embeds.shape == (3, cfg.num_image_tokens, cfg.vision_width) and cfg.num_image_tokens == 1 + 16
    # hand check of the stem output against the layers applied one by one
    x = pixels
    for layer in stem:
        x = layer(x)
    assert x.shape == (3, cfg.vision_width, 4, 4)
    torch.testing.assert_close(model.vision_encoder.embeddings.patch_embeddings(pixels), x.flatten(2).transpose(1, 2))
    model.save_pretrained(tmp_path / "m")
    for loader in (X2VLMModel.from_pretrained, AutoModel.from_pretrained):
        again = loader(tmp_path / "m").eval()
        assert again.config.vision_stem == stem_kind
        assert torch.equal(again.get_image_embeds(pixels)[1], feat)  # running statistics saved and restored


def test_conv_stem_validation_and_no_official_export():
    with pytest.raises(ValueError, match="vision_stem must be one of"):
        _conv_stem_config(vision_stem="resnet")
    for stem_kind in STEMS:
        with pytest.raises(ValueError, match="power-of-two patch_size"):
            _conv_stem_config(patch_size=6, image_res=36, vision_stem=stem_kind)
        cfg = _conv_stem_config(vision_stem=stem_kind)
        with pytest.raises(ValueError, match="no official X2-VLM counterpart"):
            to_official_state_dict(X2VLMModel(cfg), cfg)


def test_absolute_positions_start_at_zero_and_round_trip(tmp_path):
    """vision_abs_pos adds zero-initialised position embeddings: a fresh model with them computes what the same
    weights compute without them; they train, save, reload, and have no official export."""
    cfg_off, cfg_on = _conv_stem_config(), _conv_stem_config(vision_abs_pos=True)
    torch.manual_seed(0)
    off = X2VLMModel(cfg_off).eval()
    on = X2VLMModel(cfg_on).eval()
    missing, unexpected = on.load_state_dict(off.state_dict(), strict=False)
    assert missing == ["vision_encoder.embeddings.position_embeddings"] and unexpected == []
    pos = on.vision_encoder.embeddings.position_embeddings
    assert pos.shape == (1, cfg_on.num_image_tokens, cfg_on.vision_width) and not pos.any() and pos.requires_grad
    pixels = torch.randn(2, 3, 32, 32)
    assert torch.equal(on.get_image_embeds(pixels)[0], off.get_image_embeds(pixels)[0])
    with torch.no_grad():
        pos.normal_()
    moved = on.get_image_embeds(pixels)[0]
    assert not torch.allclose(moved, off.get_image_embeds(pixels)[0])
    on.save_pretrained(tmp_path / "m")
    again = X2VLMModel.from_pretrained(tmp_path / "m").eval()
    assert again.config.vision_abs_pos and torch.equal(again.get_image_embeds(pixels)[0], moved)
    patch = _conv_stem_config(vision_stem="patch", vision_abs_pos=True)
    with pytest.raises(ValueError, match="vision_abs_pos"):
        to_official_state_dict(X2VLMModel(patch), patch)


def test_stripe_pooling_starts_as_the_plain_mean_and_reads_bands_of_rows(tmp_path):
    """vision_stripes adds a zero-initialised map of the row bands' mean tokens to image token 0: a fresh model
    pools as without it; trained, token 0 = mean + W [band means, top to bottom] (checked by hand); it saves,
    reloads, must divide the grid and has no official export."""
    cfg_off, cfg_on = _conv_stem_config(), _conv_stem_config(vision_stripes=2)
    torch.manual_seed(0)
    off = X2VLMModel(cfg_off).eval()
    on = X2VLMModel(cfg_on).eval()
    missing, unexpected = on.load_state_dict(off.state_dict(), strict=False)
    assert sorted(missing) == ["stripe_pool.bias", "stripe_pool.weight"] and unexpected == []
    assert not on.stripe_pool.weight.any() and not on.stripe_pool.bias.any()
    pixels = torch.randn(2, 3, 32, 32)
    assert torch.equal(on.get_image_embeds(pixels)[0], off.get_image_embeds(pixels)[0])
    with torch.no_grad():
        on.stripe_pool.weight.normal_()
        on.stripe_pool.bias.normal_()
    embeds, feat = on.get_image_embeds(pixels)
    g, d = cfg_on.grid_size, cfg_on.vision_width
    patches = embeds[:, 1:].reshape(2, g, g, d)  # rows of the token grid, top first
    top, bottom = patches[:, : g // 2].mean(dim=(1, 2)), patches[:, g // 2:].mean(dim=(1, 2))
    expected = patches.mean(dim=(1, 2)) + torch.cat([top, bottom], dim=1) @ on.stripe_pool.weight.t() \
        + on.stripe_pool.bias
    assert torch.allclose(embeds[:, 0], expected, atol=1e-5)
    assert torch.allclose(feat, torch.nn.functional.normalize(on.vision_proj(expected), dim=-1), atol=1e-5)
    flipped = on.get_image_embeds(pixels.flip(-2))[0][:, 0]  # upside down: the bands swap, token 0 moves
    assert not torch.allclose(flipped, embeds[:, 0], atol=1e-3)
    on.save_pretrained(tmp_path / "m")
    again = X2VLMModel.from_pretrained(tmp_path / "m").eval()
    assert again.config.vision_stripes == 2 and torch.equal(again.get_image_embeds(pixels)[0], embeds)
    with pytest.raises(ValueError, match="vision_stripes 3 must be 0 or divide"):
        _conv_stem_config(vision_stripes=3)
    patch = _conv_stem_config(vision_stem="patch", vision_stripes=2)
    with pytest.raises(ValueError, match="vision_stripes"):
        to_official_state_dict(X2VLMModel(patch), patch)


def test_from_pretrained_is_strict(tmp_path, tiny_model):
    from safetensors.torch import load_file, save_file

    tiny_model.save_pretrained(tmp_path / "m")
    weights = load_file(tmp_path / "m" / "model.safetensors")
    weights["itm_head.9.weight"] = weights.pop("itm_head.3.weight")
    save_file(weights, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"itm_head\.3\.weight"):
        X2VLMModel.from_pretrained(tmp_path / "m")
    model = X2VLMModel.from_pretrained(tmp_path / "m", strict=False)
    assert isinstance(model, X2VLMModel)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_ckpt, tiny_io):
    inputs, _ = tiny_io
    grads = []
    for checkpointing in (False, True):
        model = X2VLMModel.from_official(tiny_ckpt, text_num_attention_heads=4, vision_drop_path_rate=0.0,
                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.fusion[0].gradient_checkpointing and model.vision_encoder.layers[0].gradient_checkpointing
        out = model(**inputs)
        (out.itm_logits.sum() + out.itc_logits.sum()).backward()
        grads.append(model.vision_encoder.layers[0].attention.q_proj.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.gpu
def test_gpu_fp32_and_bf16_autocast(tiny_ckpt, tiny_io):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    inputs, ref = tiny_io
    model = X2VLMModel.from_official(tiny_ckpt, text_num_attention_heads=4).eval().to("cuda")
    cuda_inputs = {k: v.to("cuda") for k, v in inputs.items()}
    got = {k: v.cpu() for k, v in run_all(model, cuda_inputs).items()}
    for key in ("image_embeds", "text_embeds", "fusion_embeds", "itm_logits"):  # TF32 convolutions: loose
        assert (got[key] - ref[key]).abs().max() < 1e-2, key
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(**cuda_inputs)
    assert (out.image_feat.float().cpu() - ref["image_feat"]).abs().max() < 0.1
