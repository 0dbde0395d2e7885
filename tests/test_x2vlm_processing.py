"""X2-VLM preprocessing: caption cleaning, the offline WordPiece tokenizer, the torchvision-free image processor."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from capret_utils.x2vlm import (
    BERT_SPECIAL_IDS,
    CLIP_MEAN,
    CLIP_STD,
    ImageSettings,
    X2VLMConfig,
    X2VLMImageProcessor,
    X2VLMModel,
    X2VLMTokenizer,
    build_wordpiece_tokenizer,
    check_tokenizer,
    fashion_caption_corpus,
    pre_caption,
)
from capret_utils.x2vlm.processing import (
    photometric_jitter,
    random_erase_box,
    random_resized_crop_box,
)


# ---------------------------------------------------------------------------------------------- captions
@pytest.mark.parametrize("raw,clean", [
    ("A Red T-Shirt, with white/blue stripes!", "a red t shirt with white blue stripes"),
    ("  <person> wears a (navy) skirt;  seen from the back...\n", "person wears a navy skirt seen from the back"),
    ("It's a \"long sleeve\" top: #1 ~ *great*?", "it s a long sleeve top 1 great"),
    ("short sleeve top", "short sleeve top"),
])
def test_pre_caption_hand_cases(raw, clean):
    assert pre_caption(raw) == clean


def test_pre_caption_truncates_words_and_rejects_empty():
    assert pre_caption("one two three four", max_words=2) == "one two"
    with pytest.raises(ValueError, match=r"'\.\.\. !!'"):
        pre_caption("... !!")
    with pytest.raises(TypeError):
        pre_caption(None)


# ---------------------------------------------------------------------------------------------- tokenizer
@pytest.fixture(scope="module")
def tiny_tokenizer() -> X2VLMTokenizer:
    """A vocabulary of the tiny preset's size with BERT's special ids (vocab 120, [CLS]=101, ...)."""
    return build_wordpiece_tokenizer(fashion_caption_corpus(), vocab_size=120, special_ids=BERT_SPECIAL_IDS)


def test_tiny_tokenizer_matches_the_tiny_preset(tiny_tokenizer):
    assert tiny_tokenizer.vocab_size == 120
    assert tiny_tokenizer.special_ids() == BERT_SPECIAL_IDS
    check_tokenizer(X2VLMConfig.preset("tiny"), tiny_tokenizer)
    enc = tiny_tokenizer(["A navy short-sleeve top", "skirt"])
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids.dtype == torch.long and ids.shape[0] == 2 and int(ids.max()) < 120
    assert ids[0, 0] == 101 and ids[0, mask[0].sum() - 1] == 102 and ids[1, -1] == 0 and mask[1, -1] == 0
    with torch.no_grad():  # ids run through a tiny model built from the same numbers
        X2VLMModel(X2VLMConfig.preset("tiny")).eval()(input_ids=ids, attention_mask=mask)


def test_demo_tokenizer_round_trip_and_limits(tmp_path):
    corpus = fashion_caption_corpus()
    tok = build_wordpiece_tokenizer(corpus, vocab_size=400, settings=None)
    assert tok.special_ids() == {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
    words = tok.tokenizer.convert_ids_to_tokens(tok("a navy short sleeve top")["input_ids"][0])
    assert words == ["[CLS]", "a", "navy", "short", "sleeve", "top", "[SEP]"]
    long_caption = " ".join(["stripes"] * 60)
    assert tok(long_caption)["input_ids"].shape[1] == 32  # 30 words kept + [CLS] + [SEP]
    assert tok(long_caption, padding="max_length", max_length=10)["input_ids"].shape[1] == 10
    tok.save_pretrained(tmp_path / "tok")
    again = X2VLMTokenizer.from_pretrained(tmp_path / "tok")
    assert again.settings == tok.settings
    for caption in corpus[:20]:
        assert torch.equal(again(caption)["input_ids"], tok(caption)["input_ids"])
    demo = X2VLMConfig.preset("tiny", vocab_size=400, unk_token_id=1, cls_token_id=2, sep_token_id=3,
                              mask_token_id=4)
    check_tokenizer(demo, again)
    with pytest.raises(ValueError, match=r"\[CLS\] is id 2 in the tokenizer but config.cls_token_id=101"):
        check_tokenizer(X2VLMConfig.preset("tiny", vocab_size=400), again)
    with pytest.raises(ValueError, match="400 tokens but the model vocab_size is 120"):
        check_tokenizer(X2VLMConfig.preset("tiny"), again)


def test_tokenizer_from_a_vocab_txt_folder(tmp_path, tiny_tokenizer):
    """A checkpoint folder with only BERT's vocab.txt loads (as real users' bert-base-uncased copies do)."""
    vocab = sorted(tiny_tokenizer.tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    (tmp_path / "vocab.txt").write_text("\n".join(tok for tok, _ in vocab) + "\n")
    tok = X2VLMTokenizer.from_pretrained(tmp_path)
    assert tok.special_ids() == BERT_SPECIAL_IDS
    assert torch.equal(tok("a red skirt")["input_ids"], tiny_tokenizer("a red skirt")["input_ids"])


def test_wordpiece_builder_is_deterministic():
    """Same texts, same vocabulary, every call (a trainer with hash-order tie breaks broke resumable training)."""
    corpus = fashion_caption_corpus() + ["a zebra-striped vest", "vest vest skirt"]
    vocabs = [build_wordpiece_tokenizer(corpus, vocab_size=150).tokenizer.get_vocab() for _ in range(4)]
    assert all(v == vocabs[0] for v in vocabs)
    assert {"z", "##z", "vest", "skirt"} <= set(vocabs[0])  # every character spells; frequent words are whole


def test_wordpiece_builder_errors():
    with pytest.raises(ValueError, match="raise vocab_size"):
        build_wordpiece_tokenizer(["abcdefghijklmnopqrstuvwxyz"], vocab_size=30)
    with pytest.raises(ValueError, match="distinct"):
        build_wordpiece_tokenizer(["a b"], vocab_size=100, special_ids={"[PAD]": 0, "[UNK]": 0, "[CLS]": 2,
                                                                         "[SEP]": 3, "[MASK]": 4})
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor vocab.txt"):
        X2VLMTokenizer.from_pretrained(__import__("pathlib").Path(__file__).parent)


# ---------------------------------------------------------------------------------------------- images
def test_eval_transform_by_hand():
    """A constant image stays constant through the bicubic resize; the value is (v/255 - mean) / std."""
    img = Image.new("RGB", (50, 30), (255, 0, 128))
    out = X2VLMImageProcessor(ImageSettings(image_res=32))(img)["pixel_values"]
    assert out.shape == (1, 3, 32, 32) and out.dtype == torch.float32
    expected = [(255 / 255 - CLIP_MEAN[0]) / CLIP_STD[0], (0 - CLIP_MEAN[1]) / CLIP_STD[1],
                (128 / 255 - CLIP_MEAN[2]) / CLIP_STD[2]]
    for c in range(3):
        assert torch.allclose(out[0, c], torch.full((32, 32), expected[c]), atol=1e-5)


def test_eval_transform_matches_a_naive_reference(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(40, 70, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.png")
    proc = X2VLMImageProcessor(ImageSettings(image_res=24))
    naive = np.asarray(Image.fromarray(arr).resize((24, 24), Image.BICUBIC), dtype=np.float64) / 255.0
    naive = ((naive - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).transpose(2, 0, 1)
    for source in (arr, Image.fromarray(arr), tmp_path / "x.png", str(tmp_path / "x.png")):
        got = proc(source)["pixel_values"][0].numpy()
        assert np.abs(got - naive).max() < 1e-5
    batch = proc([arr, Image.fromarray(arr)])["pixel_values"]
    assert batch.shape == (2, 3, 24, 24) and torch.equal(batch[0], batch[1])


def test_train_augmentation_is_deterministic_and_moves_boxes():
    arr = np.zeros((60, 80, 3), dtype=np.uint8)
    arr[:, :40] = 255  # left half white
    proc = X2VLMImageProcessor(ImageSettings(image_res=32, train=True))
    a = proc(arr, rng=np.random.default_rng(3), boxes=[10, 5, 30, 25])
    b = proc(arr, rng=np.random.default_rng(3), boxes=[10, 5, 30, 25])
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["boxes"], b["boxes"])
    assert a["boxes"].shape == (1, 4) and ((a["boxes"] >= 0) & (a["boxes"] <= 1)).all()
    with pytest.raises(ValueError, match="explicit rng"):
        proc(arr)
    # flip only (crop = whole image): the box mirrors, hand-computed
    flip = X2VLMImageProcessor(ImageSettings(image_res=32, train=True, crop_scale=(1.0, 1.0),
                                             crop_ratio=(80 / 60, 80 / 60), hflip_prob=1.0))
    out = flip(arr, rng=np.random.default_rng(0), boxes=[10, 6, 30, 24])
    assert torch.allclose(out["boxes"][0], torch.tensor([1 - 20 / 80, 15 / 60, 20 / 80, 18 / 60]), atol=1e-6)
    left = out["pixel_values"][0, 0, :, :8].mean()
    right = out["pixel_values"][0, 0, :, -8:].mean()
    assert right > left  # the white half moved to the right
    # eval mode: boxes only normalised
    plain = X2VLMImageProcessor(ImageSettings(image_res=32))(arr, boxes=[0, 0, 40, 30])["boxes"][0]
    assert torch.allclose(plain, torch.tensor([0.25, 0.25, 0.5, 0.5]))


def test_random_resized_crop_box_bounds():
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(200):
        left, top, w, h = random_resized_crop_box(100, 80, rng)
        assert 0 <= left and left + w <= 100 and 0 <= top and top + h <= 80
        areas.append(w * h / 8000)
    assert 0.45 <= min(areas) and max(areas) <= 1.0


def test_random_resized_crop_box_relative_ratio_keeps_elongated_inputs_whole():
    # a trousers-like 40 x 100 crop: an absolute 3:4..4:3 crop cannot hold more than 40 x 53, so at full area
    # the recipe falls back to a centre band (hand-computed); relative to the input's 0.4 ratio it keeps it whole
    rng = np.random.default_rng(0)
    assert random_resized_crop_box(40, 100, rng, (1.0, 1.0)) == (0, 23, 40, 53)
    assert random_resized_crop_box(40, 100, rng, (1.0, 1.0), relative=True) == (0, 0, 40, 100)
    heights = []
    for _ in range(200):
        left, top, w, h = random_resized_crop_box(40, 100, rng, (0.6, 1.0), relative=True)
        assert 0 <= left and left + w <= 40 and 0 <= top and top + h <= 100
        assert 0.4 * 0.75 - 0.05 <= w / h <= 0.4 * 4 / 3 + 0.05
        heights.append(h)
    assert max(heights) == 100  # the whole length is reachable; absolute ratios never exceed 53
    # the processor passes the setting through (same rng draws -> a different crop for a tall input)
    tall = np.zeros((100, 40, 3), np.uint8)
    tall[:20] = 255  # a white waistband the centre band cuts off
    rel = X2VLMImageProcessor(ImageSettings(image_res=16, train=True, crop_scale=(1.0, 1.0), hflip_prob=0.0,
                                            crop_ratio_relative=True))
    absolute = X2VLMImageProcessor(ImageSettings(image_res=16, train=True, crop_scale=(1.0, 1.0), hflip_prob=0.0))
    top_rel = rel(tall, rng=np.random.default_rng(1))["pixel_values"][0, :, 0].mean()
    top_abs = absolute(tall, rng=np.random.default_rng(1))["pixel_values"][0, :, 0].mean()
    assert top_rel > 1.0 > top_abs  # the first output row is white only when the crop keeps the waistband


def test_random_erase_box_bounds_and_hand_cases():
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(300):
        top, left, h, w = random_erase_box(64, 64, rng)
        assert 0 <= top and top + h < 64 and 0 <= left and left + w < 64  # strictly inside, as drawn
        areas.append(h * w / 64**2)
    assert 0.015 <= min(areas) and max(areas) <= 0.27
    # hand cases: a full-area square never fits strictly inside -> None after 10 tries; a quarter-area square is
    # 2 x 2 in a 4 x 4 image
    assert random_erase_box(4, 4, np.random.default_rng(0), area=(1.0, 1.0), ratio=(1.0, 1.0)) is None
    top, left, h, w = random_erase_box(4, 4, np.random.default_rng(0), area=(0.25, 0.25), ratio=(1.0, 1.0))
    assert (h, w) == (2, 2) and 0 <= top <= 1 and 0 <= left <= 1


def test_random_erasing_paints_one_flat_rectangle_and_only_when_training():
    rng_img = np.random.default_rng(5)
    arr = rng_img.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    base = ImageSettings(image_res=32, train=True, crop_scale=(1.0, 1.0), hflip_prob=0.0)
    plain = X2VLMImageProcessor(base)
    erased = X2VLMImageProcessor(replace(base, erase_prob=1.0))
    a, _ = plain.process_one(arr, rng=np.random.default_rng(1))
    b, _ = erased.process_one(arr, rng=np.random.default_rng(1))
    diff = np.abs(a - b).sum(0) > 0
    rows, cols = np.where(diff)
    assert diff.any()
    box = diff[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert box.all()  # one axis-aligned rectangle ...
    patch = b[:, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert np.allclose(patch, patch[:, :1, :1])  # ... of a single colour
    assert 0.015 <= box.size / 32**2 <= 0.27
    # erase_prob 0 draws exactly what the crop and the flip draw, so erasing-free trajectories are unchanged
    r0, ref = np.random.default_rng(7), np.random.default_rng(7)
    plain.process_one(arr, rng=r0)
    random_resized_crop_box(40, 40, ref, base.crop_scale, base.crop_ratio, base.crop_ratio_relative)
    ref.random()  # the flip draw
    assert r0.random() == ref.random()
    # evaluation preprocessing never erases
    e, _ = erased.process_one(arr, train=False)
    assert np.array_equal(e, plain.process_one(arr, train=False)[0])


def test_photometric_jitter_hand_case_and_processor_wiring():
    # hand case: draws gain g, casts c_rgb, contrast k from the same seed; x = 0.5 everywhere with one 1.0 pixel
    x = np.full((2, 2, 3), 0.5, np.float32)
    x[0, 0] = 1.0
    ref = np.random.default_rng(4)
    g = ref.uniform(0.75, 1.25)
    cast = ref.uniform(0.9, 1.1, size=3)
    k = ref.uniform(0.8, 1.2)
    y = x * g * cast
    expect = np.clip((y - y.mean()) * k + y.mean(), 0, 1)
    got = photometric_jitter(x.copy(), np.random.default_rng(4), 0.25, 0.2, 0.1)
    assert np.allclose(got, expect, atol=1e-6)
    assert np.allclose(photometric_jitter(x.copy(), np.random.default_rng(0), 0.0, 0.0, 0.0), x)  # ranges 0
    # the processor jitters training views only, deterministically per rng, and stays a pure function of them
    arr = np.random.default_rng(5).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    base = ImageSettings(image_res=32, train=True, crop_scale=(1.0, 1.0), hflip_prob=0.0)
    plain, jit = X2VLMImageProcessor(base), X2VLMImageProcessor(replace(base, brightness=0.25, contrast=0.125,
                                                                        colour_cast=0.0625))
    a, _ = plain.process_one(arr, rng=np.random.default_rng(1))
    b, _ = jit.process_one(arr, rng=np.random.default_rng(1))
    b2, _ = jit.process_one(arr, rng=np.random.default_rng(1))
    assert np.array_equal(b, b2) and not np.allclose(a, b)
    mean, std = np.asarray(CLIP_MEAN, np.float32)[:, None, None], np.asarray(CLIP_STD, np.float32)[:, None, None]
    assert (b * std + mean).min() >= -1e-6 and (b * std + mean).max() <= 1 + 1e-6
    assert np.array_equal(jit.process_one(arr, train=False)[0], plain.process_one(arr, train=False)[0])
    # DataConfig / TrainConfig carry one strength s -> brightness s, contrast s / 2, cast s / 4
    from capret_utils.data.loader import DataConfig, build_processor
    from capret_utils.train import TrainConfig
    st = build_processor(TrainConfig(photometric=0.2).data_config(32)).settings
    assert (st.brightness, st.contrast, st.colour_cast) == (0.2, 0.1, 0.05)
    assert build_processor(DataConfig(image_res=32)).settings.brightness == 0.0  # off by default
    with pytest.raises(ValueError, match="photometric"):
        TrainConfig(photometric=1.0).validate()


def test_processor_settings_round_trip_and_errors(tmp_path):
    proc = X2VLMImageProcessor.for_config(X2VLMConfig.preset("tiny"), crop_scale=(0.6, 1.0), erase_prob=0.5)
    proc.save_pretrained(tmp_path)
    again = X2VLMImageProcessor.from_pretrained(tmp_path)
    assert again.settings == proc.settings and again.settings.image_res == 32
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        proc(tmp_path / "missing.jpg")
    (tmp_path / "bad.jpg").write_text("not an image")
    with pytest.raises(ValueError, match="bad.jpg"):
        proc(tmp_path / "bad.jpg")
    with pytest.raises(ValueError, match="2 boxes for 1 images"):
        proc([np.zeros((8, 8, 3), np.uint8)], boxes=[[0, 0, 1, 1], [0, 0, 1, 1]])
