"""Peer encoders: loaders (tiny random checkpoints through from_pretrained), preprocessing against each library's
own processor and a hand-written reference, the X2-VLM adapter against evaluation.embed, the registry, the
evaluation rows of notebook 04 and one LoRA step per family."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from capret_utils import encoders
from capret_utils.encoders import hf, openclip

TINY = list(encoders.TINY_FAMILIES)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-encoders")
    encoders.build_tiny_encoders(folder)
    return folder


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    sizes = [(40, 30), (23, 61), (32, 32), (90, 45), (17, 17)]
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for h, w in sizes]


@pytest.fixture(scope="module")
def smoke_items(smoke_root):
    from capret_utils.data import df2
    from capret_utils.runs import paths

    return df2.load_items(paths.split_dir(smoke_root, "validation"))


# ------------------------------------------------------------------------------------------ loaders


@pytest.mark.parametrize("alias", TINY)
def test_tiny_encoder_loads_and_embeds(alias, tiny_dir, images):
    enc = encoders.load_encoder(alias, model_dir=tiny_dir)
    assert isinstance(enc, encoders.Encoder)
    assert enc.name == alias and enc.family == encoders.TINY_FAMILIES[alias] and enc.weights == "random-init"
    assert enc.image_size == 32 and enc.has_text == (alias != "tiny-dinov2")
    vec = enc.encode_images(images, batch_size=2)
    assert vec.shape == (len(images), enc.embed_dim) and vec.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-5)
    # batching does not change the vectors
    np.testing.assert_allclose(enc.encode_images(images, batch_size=5), vec, atol=1e-5)
    if enc.has_text:
        t = enc.encode_texts(["An image of a trousers with viewpoint 2", "skirt", "unknown words here"])
        assert t.shape == (3, enc.embed_dim) and t.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    else:
        with pytest.raises(NotImplementedError, match="no text tower"):
            enc.encode_texts(["x"])
    assert set(enc.describe()) >= {"name", "family", "has_text", "image_size", "embed_dim", "weights", "params"}


@pytest.mark.parametrize("alias", TINY)
def test_an_alias_and_its_folder_load_the_same_weights(alias, tiny_dir, images):
    a = encoders.load_encoder(alias, model_dir=tiny_dir)
    b = encoders.load_encoder(str(tiny_dir / alias))  # the hub-id code path: from_pretrained on a name
    np.testing.assert_array_equal(a.encode_images(images[:2]), b.encode_images(images[:2]))
    assert b.name == str(tiny_dir / alias) and b.weights == "random-init"


def test_tiny_build_is_deterministic(tmp_path, tiny_dir, images):
    again = encoders.load_encoder("tiny-clip", model_dir=tmp_path)
    first = encoders.load_encoder("tiny-clip", model_dir=tiny_dir)
    np.testing.assert_array_equal(again.encode_images(images[:2]), first.encode_images(images[:2]))


def test_unsupported_config_and_missing_model_dir(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match=r"config.json: field 'model_type' is 'bert'"):
        encoders.load_encoder(str(tmp_path))
    with pytest.raises(ValueError, match="model_dir"):
        encoders.load_encoder("tiny-clip")
    (tmp_path / hf.MARKER).write_text('{"weights": "guessed"}')
    with pytest.raises(ValueError, match="field 'weights'"):
        hf.read_marker(tmp_path)


# ------------------------------------------------------------------------------------------ preprocessing


@pytest.mark.parametrize("alias,cls", [("tiny-clip", "CLIPImageProcessorPil"), ("tiny-siglip", "SiglipImageProcessorPil"),
                                       ("tiny-siglip2", "Siglip2ImageProcessorPil"),
                                       ("tiny-dinov2", "BitImageProcessorPil")])
def test_preprocessing_is_the_library_processor(alias, cls, tiny_dir, images):
    import transformers

    enc = encoders.load_encoder(alias, model_dir=tiny_dir)
    assert type(enc.processor).__name__ == cls
    ref = getattr(transformers, cls).from_pretrained(tiny_dir / alias)(images=images, return_tensors="pt")
    got = enc.preprocess(images)
    for key, value in got.items():
        torch.testing.assert_close(value, ref[key], msg=key)


def _naive(image: Image.Image, resize: tuple[int, int], crop: int, mean, std) -> np.ndarray:
    """Resize (bicubic) to ``resize`` (w, h), centre-crop ``crop``, scale to [0, 1], normalise; CHW."""
    im = image.convert("RGB").resize(resize, Image.Resampling.BICUBIC)
    left, top = (im.width - crop) // 2, (im.height - crop) // 2
    arr = np.asarray(im.crop((left, top, left + crop, top + crop)), np.float32) / 255.0
    return ((arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).transpose(2, 0, 1)


def _smooth(h: int, w: int) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * (x + y))], axis=-1)
    return Image.fromarray((rgb * 255).astype("uint8"))


def test_clip_and_siglip_preprocessing_match_a_hand_written_reference(tiny_dir):
    clip = encoders.load_encoder("tiny-clip", model_dir=tiny_dir)
    siglip = encoders.load_encoder("tiny-siglip", model_dir=tiny_dir)
    clip_mean, clip_std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    for im in (_smooth(40, 30), _smooth(61, 23), _smooth(90, 45), _smooth(17, 17)):
        short = 32 / min(im.size)  # CLIP: shortest edge to 32 (the long side floored), then centre crop 32
        size = (max(32, int(im.width * short)), max(32, int(im.height * short)))
        want = _naive(im, size, 32, clip_mean, clip_std)
        np.testing.assert_allclose(clip.preprocess([im])["pixel_values"][0].numpy(), want, atol=2e-2)
        want = _naive(im, (32, 32), 32, [0.5] * 3, [0.5] * 3)  # SigLIP: squash to 32 x 32, mean / std 0.5
        np.testing.assert_allclose(siglip.preprocess([im])["pixel_values"][0].numpy(), want, atol=2e-2)


def test_siglip2_naflex_keeps_the_aspect_ratio(tiny_dir, images):
    enc = encoders.load_encoder("tiny-siglip2", model_dir=tiny_dir)
    batch = enc.preprocess(images)
    assert set(batch) == {"pixel_values", "pixel_attention_mask", "spatial_shapes"}
    shapes = batch["spatial_shapes"].tolist()
    assert all(h * w <= 16 for h, w in shapes)
    assert shapes[1][0] < shapes[1][1] and shapes[3][0] > shapes[3][1]  # wide image, wide grid; tall, tall
    assert batch["pixel_attention_mask"].sum(1).tolist() == [h * w for h, w in shapes]


# ------------------------------------------------------------------------------------------ open_clip, registry


def test_open_clip_is_guarded_with_an_install_hint():
    try:
        openclip.require_open_clip()
    except ImportError as err:
        assert "torchvision" in str(err) and "open_clip_torch" in str(err)
        with pytest.raises(ImportError, match="pip install"):
            encoders.load_encoder("hf-hub:Marqo/marqo-fashionSigLIP")
    else:
        pytest.skip("open_clip imports here: loading hf-hub ids needs the hub (offline tests), not tested")
    assert openclip.is_open_clip_source("hf-hub:Marqo/marqo-fashionCLIP")
    assert not openclip.is_open_clip_source("patrickjohncyh/fashion-clip")


def _open_clip():
    """open_clip, or skip: it needs a torchvision that imports beside torch (not the project venv's torch
    2.13.0+cpu); README "Baselines" gives the side-venv command that runs these tests."""
    try:
        return openclip.require_open_clip()
    except ImportError as err:
        cause = err.__cause__ or err
        pytest.skip(f"open_clip not importable ({type(cause).__name__}: {cause}); README 'Baselines' gives the side "
                    f"venv that runs these tests")


@pytest.fixture(scope="module")
def open_clip_dir(tmp_path_factory):
    _open_clip()
    folder = tmp_path_factory.mktemp("tiny-open_clip")
    openclip.build_tiny_open_clip(folder)
    return folder


def test_tiny_open_clip_loads_through_load_encoder(open_clip_dir, images):
    enc = encoders.load_encoder(openclip.TINY_OPEN_CLIP, model_dir=open_clip_dir)
    assert isinstance(enc, encoders.OpenCLIPEncoder) and enc.family == "open_clip" and enc.weights == "random-init"
    assert enc.has_text and enc.image_size == 32 and enc.embed_dim == openclip.TINY_OPEN_CLIP_CFG["embed_dim"]
    folder = open_clip_dir / openclip.TINY_OPEN_CLIP
    assert {p.name for p in folder.iterdir()} >= {openclip.OPEN_CLIP_CONFIG, openclip.OPEN_CLIP_WEIGHTS}
    vec = enc.encode_images(images, batch_size=2)
    assert vec.shape == (len(images), enc.embed_dim) and vec.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(enc.encode_images(images, batch_size=5), vec, atol=1e-5)
    txt = enc.encode_texts(["An image of a trousers with viewpoint 2", "skirt"])
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, atol=1e-5)
    again = encoders.load_encoder(str(folder))  # the folder code path (as an hf-hub: id's files)
    assert again.weights == "random-init" and again.name == str(folder)
    np.testing.assert_allclose(again.encode_images(images), vec, atol=1e-6)  # same weights (float noise only)


def test_open_clip_preprocessing_is_its_eval_transform(open_clip_dir, images):
    open_clip = _open_clip()
    folder = open_clip_dir / openclip.TINY_OPEN_CLIP
    enc = encoders.load_encoder(str(folder))
    _, _, own = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    ref = open_clip.image_transform(32, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN,
                                    std=open_clip.OPENAI_DATASET_STD)  # the tiny config's defaults, spelt out
    got = enc.preprocess(images)["pixel_values"]
    for i, im in enumerate(images):
        torch.testing.assert_close(got[i], own(im.convert("RGB")), rtol=0, atol=0)
        torch.testing.assert_close(got[i], ref(im.convert("RGB")), rtol=0, atol=0)
    tok = open_clip.get_tokenizer(f"local-dir:{folder}")
    torch.testing.assert_close(enc.tokenize(["a skirt"])["text"], tok(["a skirt"]))


def test_open_clip_lora_step_saves_and_loads_back(open_clip_dir, train_items, tmp_path, images):
    from capret_utils.train import peers as tp

    enc = encoders.load_encoder(str(open_clip_dir / openclip.TINY_OPEN_CLIP))
    base = enc.encode_images(images)
    out = tp.finetune_encoder(enc, train_items, tp.PeerTrainConfig(steps=2, batch_size=6, lr=0.05))
    assert out["itc"] and all(np.isfinite(r["loss_arcface"]) and np.isfinite(r["loss_itc"]) for r in out["history"])
    lora_b = {n: p for n, p in enc.module.named_parameters() if "lora_B" in n}
    assert lora_b and all(not torch.equal(p, torch.zeros_like(p)) for p in lora_b.values())
    assert out["lora"]["lora_modules"] > 0 and out["lora"]["trainable"] < out["lora"]["total"]
    tuned = enc.encode_images(images)
    assert not np.allclose(base, tuned, atol=1e-4)
    folder = tp.save_encoder(enc, tmp_path / "tuned", info={"steps": 2})
    back = encoders.load_encoder(str(folder))
    assert isinstance(back, encoders.OpenCLIPEncoder) and back.weights == "fine-tuned"
    np.testing.assert_allclose(back.encode_images(images), tuned, atol=1e-5)
    np.testing.assert_allclose(back.encode_texts(["a skirt"]), enc.encode_texts(["a skirt"]), atol=1e-5)


def test_registry_and_labels():
    assert {"clip", "siglip", "siglip2", "dinov2", "open_clip"} <= {e.family for e in encoders.KNOWN.values()}
    for e in encoders.KNOWN.values():
        assert e.licence in ("Apache-2.0", "MIT") and e.params_m > 0
        assert e.hub_id.startswith("hf-hub:") == (e.library == "open_clip")
    assert encoders.KNOWN["patrickjohncyh/fashion-clip"].licence == "MIT"
    assert encoders.row_label("patrickjohncyh/fashion-clip") == "fashion-clip"
    assert encoders.row_label("hf-hub:Marqo/marqo-fashionSigLIP") == "marqo-fashionSigLIP"
    assert encoders.row_label("/tmp/runs/x/encoder/") == "encoder" and encoders.row_label("tiny-clip") == "tiny-clip"
    assert encoders.parse_encoders(" tiny-clip, ,tiny-dinov2,tiny-clip") == ["tiny-clip", "tiny-dinov2"]
    assert encoders.parse_encoders("") == []


# ------------------------------------------------------------------------------------------ X2-VLM adapter


def test_x2vlm_bundle_satisfies_the_interface(smoke_items):
    from capret_utils.evaluation import analysis, embed

    bundle = analysis.fresh_bundle("tiny", 0, [], device="cpu")
    enc = encoders.X2VLMEncoder(bundle, name="tiny", weights="random-init")
    assert isinstance(enc, encoders.Encoder) and enc.has_text and enc.family == "x2vlm"
    frame = smoke_items.head(6)
    keys, want = embed.embed_items(frame, bundle, embed.EmbedConfig(view="crop", progress=False))
    store = bundle.store()
    crops = [store.crop(r, bundle.info["context"]) for r in frame.to_dict("records")]
    np.testing.assert_allclose(enc.encode_images(crops, batch_size=4), want, atol=1e-5)
    texts = ["a skirt", "An image of a trousers with viewpoint 2"]
    np.testing.assert_allclose(enc.encode_texts(texts), embed.embed_texts(texts, bundle), atol=1e-5)


# ------------------------------------------------------------------------------------------ evaluation rows


def test_encoder_rows_join_the_variant_table(smoke_items, tiny_dir, tmp_path):
    from capret_utils.evaluation import analysis, peers

    data = analysis.RetrievalData.build(smoke_items)
    models = {"zero-shot": analysis.fresh_bundle("tiny", 0, [], device="cpu")}
    cfg = analysis.AnalysisConfig(batch_size=16, progress=False, device="cpu")
    x2 = analysis.run_all([analysis.VARIANTS["crop"]], models, data, cfg, run_dir=tmp_path)
    pcfg = peers.PeerConfig(model_dir=str(tiny_dir), progress=False, device="cpu")
    results, info = peers.run_encoders(",".join(TINY), data, cfg, run_dir=tmp_path, models=models, pcfg=pcfg)
    table = peers.add_to_table(analysis.variant_table(x2), results, x2, info, models)
    names = table["name"].tolist()
    assert names[0] == "zero-shot/crop" and {f"{a}/crop" for a in TINY} <= set(names)
    assert "tiny-dinov2/crop+template-late" not in names  # no text tower
    assert {"tiny-clip/crop+template-late", "tiny-siglip2/crop+template-gallery"} <= set(names)
    assert table["weights"].eq("random-init").all()  # tiny X2-VLM zero-shot and tiny encoders alike
    assert table.set_index("name").loc["tiny-clip/crop", "encoder"] == "tiny-clip"
    crop_rows = table[table["name"].isin([f"{a}/crop" for a in TINY])]
    assert crop_rows["baseline"].eq("zero-shot/crop").all() and crop_rows["p_top1"].between(0, 1).all()
    late = table.set_index("name").loc["tiny-clip/crop+template-late"]
    assert late["baseline"] == "tiny-clip/crop" and late["text_source"] == "oracle"
    assert (table["n_queries"] == len(data.queries)).all() and table["official_top1"].notna().all()
    assert table[["top1_lo", "mAP_lo"]].notna().all().all()
    # the crop row's numbers are the metrics of the encoder's own vectors (naive re-computation)
    enc = encoders.load_encoder("tiny-clip", model_dir=tiny_dir)
    store = peers.ImageStore(64)
    q = peers.embed_crops(enc, data.queries, store, float(models["zero-shot"].info["context"]))
    g = peers.embed_crops(enc, data.gallery, store, float(models["zero-shot"].info["context"]))
    again = analysis.score_items(q, g, data.queries, data.gallery, device="cpu")
    assert again.metrics["mAP"] == pytest.approx(table.set_index("name").loc["tiny-clip/crop", "mAP"])
    # cached: a second run writes no new embedding files and gives the same table
    cached = sorted(p.name for p in (tmp_path / "embeddings").iterdir())
    results2, _ = peers.run_encoders("tiny-clip", data, cfg, run_dir=tmp_path, models=models, pcfg=pcfg)
    assert sorted(p.name for p in (tmp_path / "embeddings").iterdir()) == cached
    assert results2[0].metrics["mAP"] == pytest.approx(results[0].metrics["mAP"])


def test_late_fusion_is_the_normalised_sum():
    from capret_utils.evaluation.peers import _fuse

    img, txt = np.array([[1.0, 0.0]], np.float32), np.array([[0.0, 1.0]], np.float32)
    np.testing.assert_allclose(_fuse(img, txt, 1.0), [[2 ** -0.5, 2 ** -0.5]], atol=1e-7)
    np.testing.assert_allclose(_fuse(img, txt, 0.0), img)


# ------------------------------------------------------------------------------------------ fine-tuning


@pytest.fixture(scope="module")
def train_items(smoke_root):
    from capret_utils.data import df2
    from capret_utils.runs import paths

    return df2.load_items(paths.split_dir(smoke_root, "train"))


def _encoder(alias: str, tiny_dir):
    if alias == "x2vlm":
        from capret_utils.evaluation import analysis

        return encoders.X2VLMEncoder(analysis.fresh_bundle("tiny", 0, [], device="cpu"), weights="random-init")
    return encoders.load_encoder(alias, model_dir=tiny_dir)


@pytest.mark.parametrize("alias", [*TINY, "x2vlm"])
def test_one_lora_step_per_family(alias, tiny_dir, train_items):
    from capret_utils.train import peers as tp

    enc = _encoder(alias, tiny_dir)
    before = {n: p.detach().clone() for n, p in enc.module.named_parameters()}
    out = tp.finetune_encoder(enc, train_items, tp.PeerTrainConfig(steps=1, batch_size=6))
    step = out["history"][0]
    assert step["kind"] == "train" and np.isfinite(step["loss"]) and np.isfinite(step["loss_arcface"])
    assert out["itc"] == enc.has_text and (("loss_itc" in step) == enc.has_text)
    params = dict(enc.module.named_parameters())
    lora_b = {n: p for n, p in params.items() if "lora_B" in n}
    assert lora_b and all(p.requires_grad for p in lora_b.values())
    assert all(not torch.equal(p, torch.zeros_like(p)) for p in lora_b.values())  # B starts at 0: it moved
    frozen = {n: p for n, p in params.items() if "lora_" not in n}
    assert frozen and not any(p.requires_grad for p in frozen.values())
    for name, p in frozen.items():  # peft renames wrapped linears: base_model.model.<...>.base_layer.weight
        plain = name.removeprefix("base_model.model.").replace(".base_layer", "")
        torch.testing.assert_close(p, before[plain], msg=name, rtol=0, atol=0)
    assert out["lora"]["trainable"] == sum(p.numel() for p in params.values() if p.requires_grad)
    assert enc.weights == "fine-tuned"


def test_a_finetuned_encoder_saves_and_loads_back(tiny_dir, train_items, tmp_path, images):
    from capret_utils.train import peers as tp

    enc = encoders.load_encoder("tiny-siglip", model_dir=tiny_dir)
    tp.finetune_encoder(enc, train_items, tp.PeerTrainConfig(steps=2, batch_size=6, lr=0.05))
    tuned = enc.encode_images(images)
    folder = tp.save_encoder(enc, tmp_path / "tuned", info={"steps": 2})
    np.testing.assert_allclose(enc.encode_images(images), tuned, atol=1e-5)  # merged = adapters
    back = encoders.load_encoder(str(folder))
    assert back.weights == "fine-tuned" and back.family == "siglip"
    np.testing.assert_allclose(back.encode_images(images), tuned, atol=1e-5)
    base = encoders.load_encoder("tiny-siglip", model_dir=tiny_dir)
    assert not np.allclose(base.encode_images(images), tuned, atol=1e-4)


def test_finetune_refuses_items_without_identities(tiny_dir, train_items):
    from capret_utils.train import peers as tp

    enc = encoders.load_encoder("tiny-dinov2", model_dir=tiny_dir)
    with pytest.raises(ValueError, match="identity"):
        tp.finetune_encoder(enc, train_items.assign(style=0), tp.PeerTrainConfig())
    with pytest.raises(ValueError, match="text"):
        tp.PeerTrainConfig(text="caption").validate()
    with pytest.raises(ValueError, match="per_identity"):
        tp.PeerTrainConfig(batch_size=8, per_identity=3).validate()
    clip = encoders.load_encoder("tiny-clip", model_dir=tiny_dir)
    with pytest.raises(ValueError, match="caption store"):  # dialogue texts need notebook 02's captions
        tp.finetune_encoder(clip, train_items, tp.PeerTrainConfig(text="dialogue", batch_size=4))
    assert isinstance(pd.DataFrame(), pd.DataFrame)


def _fixed_batch(items: pd.DataFrame, identities: int = 4, per: int = 2) -> pd.DataFrame:
    """``identities`` identities with exactly ``per`` items each: every P×K batch of that size is the same batch."""
    lab = items[items["style"] > 0]
    groups = [g.head(per) for _, g in lab.groupby(["pair_id", "style"]) if len(g) >= per][:identities]
    assert len(groups) == identities
    return pd.concat(groups, ignore_index=True)


def test_a_few_steps_lower_the_arcface_loss(tiny_dir, train_items):
    from capret_utils.train import peers as tp

    items = _fixed_batch(train_items)
    enc = encoders.load_encoder("tiny-dinov2", model_dir=tiny_dir)
    out = tp.finetune_encoder(enc, items, tp.PeerTrainConfig(steps=8, batch_size=8, per_identity=2, lr=0.02,
                                                             lr_arcface=0.05, margin=0.1))
    losses = [r["loss_arcface"] for r in out["history"]]
    assert losses[-1] < 0.8 * losses[0], losses  # the same 8 crops every step: the loss on them falls


def test_cosine_schedule_and_mid_run_evaluations(tiny_dir, train_items):
    from capret_utils.train import peers as tp

    enc = encoders.load_encoder("tiny-dinov2", model_dir=tiny_dir)
    seen = []
    cfg = tp.PeerTrainConfig(steps=4, batch_size=4, per_identity=2, lr=0.01, schedule="cosine", warmup=0.25,
                             eval_every=2)
    out = tp.finetune_encoder(enc, train_items, cfg, evaluate=lambda e: {"top1": 0.5}, callback=seen.append)
    train_rows = [r for r in out["history"] if r["kind"] == "train"]
    assert [r["kind"] for r in out["history"]] == ["train", "train", "eval", "train", "train"] and seen == out["history"]
    lrs = [r["lr"] for r in train_rows]  # warm-up step (1 of 4), then cosine decay from the peak
    assert lrs[0] == pytest.approx(0.005) and lrs[1] == pytest.approx(0.01) and lrs[1] > lrs[2] > lrs[3] > 0


def test_peer_config_from_notebook_parameters():
    from capret_utils.train import peers as tp

    params = {"encoder": "tiny-clip", "epochs": 2, "max_steps": 0, "batch_size": 16, "per_identity": 2, "lr": 1e-4,
              "arcface_scale": 20.0, "margin": 0.2, "use_captions": "none", "w_itc": 0.5, "seed": 3, "model": "demo"}
    cfg = tp.peer_config(params, n_items=50)
    assert (cfg.steps, cfg.batch_size, cfg.per_identity, cfg.lr, cfg.scale, cfg.margin) == (8, 16, 2, 1e-4, 20.0, 0.2)
    assert (cfg.text, cfg.w_itc, cfg.seed, cfg.schedule, cfg.warmup) == ("category", 0.5, 3, "cosine", 0.1)
    assert tp.peer_config({**params, "max_steps": 5}, 50).steps == 5
    assert tp.peer_config(params, 50, "{context: 0.1, schedule: constant}").context == 0.1
    with pytest.raises(ValueError, match=r"\['w_box'\] are not PeerTrainConfig fields"):
        tp.peer_config(params, 50, "{w_box: 0.0}")
    smoke = tp.peer_config(params, 50, smoke=True)
    assert (smoke.steps, smoke.batch_size, smoke.per_identity, smoke.eval_every) == (3, 8, 2, 0)


@pytest.mark.parametrize("alias", ["tiny-clip", openclip.TINY_OPEN_CLIP])
def test_run_peer_finetune_writes_a_run_that_notebook_04_loads(alias, smoke_root, tmp_path, images):
    import json

    from capret_utils.evaluation import analysis, peers
    from capret_utils.train import peers as tp

    if alias == openclip.TINY_OPEN_CLIP:
        _open_clip()
    params = {"encoder": alias, "smoke": True, "max_steps": 2, "use_captions": "template", "lr": 0.01, "seed": 0,
              "select_fraction": 0.05, "bad_annotations": "raise", "resume": True, "w_box": 1.0}
    run = tmp_path / "run"
    res = tp.run_peer_finetune(params, run, root=smoke_root, log=lambda s: None)
    metrics = json.loads((run / "metrics.json").read_text())
    written = json.loads((run / "params.json").read_text())["params"]
    assert written["encoder"] == alias and written["weights"] == "random-init" and written["ignored"] == ["w_box"]
    assert written["peer_config"]["steps"] == 2 and written["finetune_mode_effective"] == "lora"
    assert metrics["encoder"] == alias and metrics["weights"] == "fine-tuned" and metrics["base_weights"] == "random-init"
    for role in ("select", "test"):  # selected on one split, reported on the other, as X2-VLM's run
        for phase in ("zero_shot", "finetuned"):
            assert {"top1", "top5", "top10", "top20", "mAP", "top1_lo", "mAP_hi"} <= set(metrics[role][phase])
    assert metrics["splits"] == {"train": "train", "select": "validation", "test": "test"} and metrics["itc"]
    assert metrics["steps"] == 2 and metrics["resumed_from"] is None and (run / "history.csv").is_file()
    assert list(res.history["kind"]) == ["train", "train"]
    folder = res.checkpoint
    assert folder == run / "checkpoint" / f"{alias}-ft" and metrics["checkpoint"] == str(folder)
    # the checkpoint reloads to identical embeddings, and test metrics are those of the reloaded encoder
    back = encoders.load_encoder(str(folder))
    assert back.weights == "fine-tuned"
    np.testing.assert_allclose(back.encode_images(images), res.encoder.encode_images(images), atol=1e-5)
    # notebook 04's `encoders` parameter takes the folder: a fine-tuned row next to X2-VLM's
    from capret_utils.data import df2
    from capret_utils.runs import paths

    data = analysis.RetrievalData.build(df2.load_items(paths.split_dir(smoke_root, "test")))
    cfg = analysis.AnalysisConfig(batch_size=16, progress=False, device="cpu")
    rows, info = peers.run_encoders(str(folder), data, cfg, pcfg=peers.PeerConfig(progress=False, device="cpu"))
    label = f"{alias}-ft"
    assert rows[0].name == f"{label}/crop" and info[label]["weights"] == "fine-tuned"
    assert rows[0].metrics["mAP"] == pytest.approx(metrics["test"]["finetuned"]["mAP"])
    # a second run of the same parameters reuses the finished checkpoint
    again = tp.run_peer_finetune(params, run, root=smoke_root, log=lambda s: None)
    assert again.metrics["resumed_from"] == "finished checkpoint"
    assert again.comparison["test"] == res.comparison["test"]
