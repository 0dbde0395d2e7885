"""The pixel answerer: an X2-VLM VQA model trained on the train split's (crop, question, answer) triples.

On the synthetic benchmark the ground-truth answerer (:class:`~capret_utils.captions.dialogue.AttributeAnswerer`)
is an oracle: the query photo does not give it its answers. This module owns the honest alternative
(``vqa="x2vlm-demo"`` in :class:`~capret_utils.captions.runner.CaptionSetup`):

* :func:`vqa_triples` — every **train** item × every question the scripted questioner asks (the fixed first
  question + :data:`~capret_utils.captions.dialogue.DEFAULT_QUESTIONS`), answered from the ground truth; the
  candidate answer list is the set of those answers (train only, sorted), and each question topic keeps its own
  list (:func:`topic_answer_lists`: 13 categories, 16 colours, … on the synthetic benchmark);
* :func:`train_pixel_vqa` — the demo X2-VLM (``PRESETS["demo"]``: random weights, as notebook 03's demo starts;
  there are no hub weights offline and 02 runs before 03 trains a retrieval checkpoint) turned into an
  :class:`~capret_utils.x2vlm.vqa.X2VLMForVQA` by the official initialisation (decoder from the fusion layers),
  then fine-tuned end to end (the encoder is random, so it must learn to see) with the official loss on item
  crops (GT box + :data:`~capret_utils.data.boxes.CROP_CONTEXT`, square-resized, random horizontal flip), on the
  questions whose topic has more than one train answer — not on the first ("describe") question, whose ~1,000
  train answers are combinations of the category / colour / pattern / pattern-colour answers;
  cached in ``<cache_dir>/x2vlm-vqa-<hash>/`` (model, tokenizer, answer list, training record) and re-used;
* :class:`PixelAnswerer` — the :class:`~capret_utils.captions.dialogue.Answerer`: ``rank_answer`` over the
  question topic's answer list, every candidate scored (``k`` = the list's length, so the first-token shortlist
  cuts nothing); a topic with a single train answer (material: "I don't know") gets it without a model call; the
  describe question is answered by asking the model the category, colour, pattern and pattern-colour questions
  and composing them (:func:`~capret_utils.captions.dialogue.describe_text`, the ground truth's own format). A
  question of an unknown topic (or an answerer folder without ``topic_answers.json``, e.g. an official VQA file)
  ranks the whole list with the official ``k_test`` shortlist. It sees only pixels and the question (records name it
  ``x2vlm-vqa:...``, so :func:`~capret_utils.captions.store.dialogue_source` labels its captions ``pixel``).

Bad input: an empty question or a view without an image raises ``ValueError`` naming the item; a training
answer outside the candidate list raises naming the item and the question.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from capret_utils.captions.dialogue import (
    DEFAULT_QUESTIONS,
    FIRST_QUESTION,
    AttributeAnswerer,
    GenerationStats,
    Turn,
    describe_text,
    question_topic,
)
from capret_utils.captions.views import ItemView, load_views
from capret_utils.common import deterministic_algorithms
from capret_utils.data.boxes import CROP_CONTEXT

PIXEL_VQA = {"x2vlm-demo": "demo"}
"""``vqa`` names that train a pixel answerer on the train split -> the X2-VLM preset it starts from."""
MODEL_DIR, ANSWERS_FILE, RECORD_FILE = "model", "answer_list.json", "training.json"
TOPICS_FILE = "topic_answers.json"
COMPOSED = {"describe": ("category", "colour", "pattern", "pattern_colour")}
"""Topics answered by composing the answerer's own answers to other topics (in ``describe_text``'s order)."""


@dataclass
class PixelVQAConfig:
    """How the pixel answerer is trained (defaults: the setting chosen on validation in docs/experiments.md; from
    notebook 03's demo checkpoint 400 steps at about 0.76 s each on 2 idle cores, 1.1 s at 1 thread; benchmarks/
    bench_vqa.py)."""

    preset: str = "demo"  # X2-VLM architecture (capret_utils.x2vlm.PRESETS), random weights seeded by `seed`
    init: str = ""  # a notebook-03 checkpoint folder (model/, tokenizer/: trained on the train split) to start from
    # instead of random `preset` weights; its tokenizer is kept. Empty: random init
    steps: int = 400  # optimiser steps
    batch_size: int = 32  # crops per step
    questions_per_crop: int = 0  # questions drawn (without replacement) per crop and step, of the trained ones;
    # 0 = all of them (10 on the synthetic benchmark): the vision pass is shared, so each extra question costs only
    # its text side (docs/experiments.md: 4 -> all lifted validation category 0.44 -> 0.56, colour 0.15 -> 0.41)
    lr: float = 1e-3  # AdamW peak learning rate, linear warm-up over the first 5 % of steps, then linear decay
    weight_decay: float = 0.01  # AdamW weight decay
    seed: int = 0  # weights, crop sampling and flips
    threads: int = 0  # torch intra-op threads while training (CPU); 0 = torch's default (all cores)
    context: float = CROP_CONTEXT  # context around the item box, fraction of box width / height per side
    k_test: int = 128  # rank_answer: first-token shortlist for questions outside the per-topic lists (official)
    vocab_size: int = 512  # WordPiece vocabulary trained on the questions, answers and the fashion corpus
    answer_batch: int = 64  # crops per rank_answer call when answering


def dialogue_questions() -> list[str]:
    """Every question the scripted questioner asks: the fixed first one, then its list."""
    return [FIRST_QUESTION] + [q.text for q in DEFAULT_QUESTIONS]


def vqa_triples(items: pd.DataFrame, attributes: Mapping[str, Mapping[str, Any]],
                questions: Sequence[str] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """``(triples, answer_list)``: one row per (item, question) with the ground-truth ``answer`` and its
    ``topic`` (from :func:`~capret_utils.captions.dialogue.question_topic`); the answer list is the sorted set of
    the answers. Call it on the **train** split only: the answer list is the model's closed vocabulary."""
    from capret_utils.captions.dialogue import question_topic

    questions = list(questions or dialogue_questions())
    oracle = AttributeAnswerer(attributes)
    rows = []
    for row in items.to_dict("records"):
        for q in questions:
            rows.append({"key": str(row["key"]), "question": q, "topic": question_topic(q) or "other",
                         "answer": oracle.answer_one(row, q)})
    triples = pd.DataFrame(rows, columns=["key", "question", "topic", "answer"])
    return triples, sorted(set(triples["answer"]))


def topic_answer_lists(triples: pd.DataFrame) -> dict[str, list[str]]:
    """``{topic: sorted answers}`` of the train triples, composed topics (describe) left out."""
    kept = triples[~triples["topic"].isin(list(COMPOSED))]
    return {str(t): sorted(set(g["answer"])) for t, g in kept.groupby("topic")}


def trained_questions(questions: Sequence[str], topics: Mapping[str, Sequence[str]]) -> list[str]:
    """The questions the model is trained on: those whose topic has two or more train answers."""
    return [q for q in questions if len(topics.get(question_topic(q) or "other", ())) > 1]


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _train_fingerprint(train_dir: Path) -> str:
    """Content hash of what training reads besides the images: the split's annotations + attributes listing."""
    h = hashlib.sha256()
    attrs = train_dir / "attributes.jsonl"
    if attrs.is_file():
        h.update(attrs.read_bytes())
    annos = sorted((train_dir / "annos").glob("*.json")) if (train_dir / "annos").is_dir() else []
    h.update(str(len(annos)).encode())
    for p in annos[:: max(1, len(annos) // 64)]:
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def _crop_tensor(rows: Sequence[Mapping[str, Any]], processor: Any, context: float):
    import torch

    views = load_views(rows, "crop", context, with_images=True)
    res = processor.settings.image_res
    return torch.stack([torch.from_numpy(processor.to_array(v.image.resize((res, res), resample=3)))
                        for v in views])


def build_vqa_tokenizer(questions: Sequence[str], answers: Sequence[str], vocab_size: int):
    """The offline WordPiece vocabulary (compact special ids, as the demo preset) over the fashion caption
    corpus, the category names, the questions and the answers."""
    from capret_utils.data.df2 import CATEGORY_NAMES
    from capret_utils.x2vlm import (
        COMPACT_SPECIAL_IDS,
        build_wordpiece_tokenizer,
        fashion_caption_corpus,
    )

    corpus = fashion_caption_corpus() + list(CATEGORY_NAMES.values()) + list(questions) + list(answers)
    return build_wordpiece_tokenizer(corpus, vocab_size, special_ids=COMPACT_SPECIAL_IDS)


def train_pixel_vqa(train_items: pd.DataFrame, attributes: Mapping[str, Mapping[str, Any]],
                    config: PixelVQAConfig | None = None, progress: bool = True) -> tuple[Any, Any, list[str], dict]:
    """Train an :class:`~capret_utils.x2vlm.vqa.X2VLMForVQA` on the train items' triples; returns
    ``(model, tokenizer, answer_list, record)`` (record: seconds, steps, final loss, sizes)."""
    import torch

    from capret_utils.x2vlm import (
        X2VLMConfig,
        X2VLMImageProcessor,
        X2VLMModel,
        check_tokenizer,
    )
    from capret_utils.x2vlm.vqa import X2VLMForVQA

    cfg = config or PixelVQAConfig()
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.questions_per_crop < 0:
        raise ValueError(f"PixelVQAConfig: steps and batch_size must be >= 1 and questions_per_crop >= 0, got "
                         f"{cfg.steps}, {cfg.batch_size}, {cfg.questions_per_crop}")
    bad = sorted(set(train_items["split"].astype(str)) - {"train"}) if "split" in train_items else []
    if bad:
        raise ValueError(f"train_pixel_vqa trains on the train split only; items table has splits {bad}")
    started = time.perf_counter()
    triples, _ = vqa_triples(train_items, attributes, dialogue_questions())
    topics = topic_answer_lists(triples)
    answer_list = sorted({a for answers in topics.values() for a in answers})
    questions = trained_questions(dialogue_questions(), topics)
    triples = triples[triples["question"].isin(questions)].reset_index(drop=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or threads)
    try:
        # bitwise repeatable at one thread count (without it two runs drifted apart within 20 steps)
        with deterministic_algorithms(True):
            torch.manual_seed(cfg.seed)
            if cfg.init:
                init = Path(cfg.init)
                if not (init / "model").is_dir() or not (init / "tokenizer").is_dir():
                    raise FileNotFoundError(f"PixelVQAConfig.init={cfg.init!r}: expected a notebook-03 checkpoint "
                                            f"folder with model/ and tokenizer/")
                from capret_utils.x2vlm import X2VLMTokenizer

                base = X2VLMModel.from_pretrained(init / "model")
                tokenizer = X2VLMTokenizer.from_pretrained(init / "tokenizer")
            else:
                tokenizer = build_vqa_tokenizer(dialogue_questions(), answer_list, cfg.vocab_size)
                base = X2VLMModel(X2VLMConfig.preset(cfg.preset))
            check_tokenizer(base.config, tokenizer)
            model, _ = X2VLMForVQA.from_x2vlm(base, k_test=cfg.k_test)
            processor = X2VLMImageProcessor.for_config(model.config)
            rows = train_items.to_dict("records")
            pixels = _crop_tensor(rows, processor, cfg.context).to(torch.float16)
            load_s = time.perf_counter() - started
            q = tokenizer(questions)
            answer_index = {a: i for i, a in enumerate(answer_list)}
            a = tokenizer(answer_list)
            n_q = len(questions)
            # target answer id of (item i, question j)
            target = torch.tensor(triples["answer"].map(answer_index).to_numpy(), dtype=torch.long).view(len(rows), n_q)
            if list(triples["key"].iloc[::n_q]) != [str(r["key"]) for r in rows]:
                raise RuntimeError("vqa_triples: rows are not item-major in items-table order")
            opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
            warm = max(1, cfg.steps // 20)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: min((s + 1) / warm, max(0.0, (cfg.steps - s) / max(1, cfg.steps - warm))))
            gen = torch.Generator().manual_seed(cfg.seed)
            model.train()
            losses = []
            from tqdm.auto import tqdm

            for step in tqdm(range(cfg.steps), disable=not progress, desc="pixel VQA training"):
                idx = torch.randint(len(rows), (min(cfg.batch_size, len(rows)),), generator=gen)
                x = pixels[idx].float()
                flip = torch.rand(len(idx), generator=gen) < 0.5
                x[flip] = x[flip].flip(-1)
                image_embeds, _ = model.get_image_embeds(x)
                text = model.get_text_embeds(q["input_ids"], q["attention_mask"])
                b, per = len(idx), min(cfg.questions_per_crop or n_q, n_q)
                qs = torch.rand(b, n_q, generator=gen).argsort(1)[:, :per]  # a random subset of questions per crop
                states = model.get_fusion_embeds(text[qs.reshape(-1)], q["attention_mask"][qs.reshape(-1)],
                                                 image_embeds.repeat_interleave(per, 0))
                ans = target[idx.unsqueeze(1), qs].reshape(-1)
                ids, atts = a["input_ids"][ans], a["attention_mask"][ans]
                width = int(atts.sum(1).max())  # drop the columns that are padding for every answer of the batch
                nll = model.answer_nll(states, q["attention_mask"][qs.reshape(-1)], ids[:, :width], atts[:, :width])
                loss = nll.sum() / (b * per)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
    finally:
        torch.set_num_threads(threads)
    model.eval()
    record = {"seconds": time.perf_counter() - started, "load_seconds": load_s, "steps": cfg.steps,
              "final_loss": float(np.mean(losses[-20:])), "first_loss": losses[0], "train_items": len(rows),
              "triples": len(triples), "answers": len(answer_list), "questions": questions,
              "topic_answers": topics,
              "config": asdict(cfg),
              "init": (f"checkpoint {cfg.init}" if cfg.init else f"random {cfg.preset} preset (seed {cfg.seed})")
              + ", official VQA decoder initialisation from its fusion layers"}
    return model, tokenizer, answer_list, record


def load_or_train(root: str | os.PathLike, cache_dir: str | os.PathLike, config: PixelVQAConfig | None = None,
                  progress: bool = True) -> Path:
    """The cached pixel answerer for ``root``'s train split (trained on a cache miss); returns its folder."""
    from capret_utils.captions.dialogue import load_attributes
    from capret_utils.data import df2
    from capret_utils.runs import paths

    cfg = config or PixelVQAConfig()
    train_dir = paths.split_dir(root, "train")
    init_id = _hash(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(cfg.init, "model").glob("*"))
                    ) if cfg.init else ""  # a retrained checkpoint in the same folder is a new answerer
    # the constant is the training code's version: 3 = deterministic algorithms (answerers cached before differ)
    folder = Path(cache_dir) / f"x2vlm-vqa-{_hash(asdict(cfg), _train_fingerprint(train_dir), 3, init_id)}"
    if (folder / RECORD_FILE).is_file():
        return folder
    attributes = load_attributes(train_dir)
    if not attributes:
        raise ValueError(f"{train_dir / 'attributes.jsonl'} is missing: the pixel answerer learns colour and "
                         f"pattern answers from it (synthetic benchmark only); on real data use a VQA model id")
    items = df2.load_items(train_dir)
    model, tokenizer, answers, record = train_pixel_vqa(items, attributes, cfg, progress=progress)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp / MODEL_DIR)
    tokenizer.save_pretrained(tmp / MODEL_DIR)
    (tmp / ANSWERS_FILE).write_text(json.dumps(answers, indent=1))
    (tmp / TOPICS_FILE).write_text(json.dumps(record["topic_answers"], indent=1))
    (tmp / RECORD_FILE).write_text(json.dumps(record, indent=1))
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


class PixelAnswerer:
    """Answers each (crop, question) with ``rank_answer`` over a fixed answer list (the Answerer protocol)."""

    needs_images = True

    def __init__(self, folder: str | os.PathLike, device: str = "cpu", context: float = CROP_CONTEXT,
                 batch: int = 64, name: str | None = None) -> None:
        from capret_utils.x2vlm.vqa import X2VLMForVQA

        folder = Path(folder)
        answers = json.loads((folder / ANSWERS_FILE).read_text())
        topics = json.loads((folder / TOPICS_FILE).read_text()) if (folder / TOPICS_FILE).is_file() else None
        self.record = json.loads((folder / RECORD_FILE).read_text()) if (folder / RECORD_FILE).is_file() else {}
        self._setup(X2VLMForVQA.from_pretrained(folder / MODEL_DIR), _load_tokenizer(folder / MODEL_DIR), answers,
                    topics, device, context, batch, name or f"x2vlm-vqa:{folder.name}", folder / ANSWERS_FILE)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, answer_list: Sequence[str],
                   topic_answers: Mapping[str, Sequence[str]] | None = None, device: str = "cpu",
                   context: float = CROP_CONTEXT, batch: int = 64, name: str = "x2vlm-vqa") -> PixelAnswerer:
        """An answerer around a loaded model (e.g. :meth:`~capret_utils.x2vlm.vqa.X2VLMForVQA.from_official`)."""
        self = cls.__new__(cls)
        self.record = {}
        self._setup(model, tokenizer, list(answer_list), topic_answers, device, context, batch, name,
                    f"{name}: answer_list")
        return self

    def _setup(self, model: Any, tokenizer: Any, answers: list, topics: Mapping[str, Sequence[str]] | None,
               device: str, context: float, batch: int, name: str, source: Any) -> None:
        from capret_utils.x2vlm import X2VLMImageProcessor

        if not answers or not all(isinstance(a, str) and a for a in answers):
            raise ValueError(f"{source}: expected a non-empty list of non-empty answer strings")
        self.model, self.tokenizer, self.answer_list = model.to(device).eval(), tokenizer, list(answers)
        index = {a: i for i, a in enumerate(self.answer_list)}
        self.topic_ids: dict[str, list[int]] = {}
        for topic, cands in (topics or {}).items():
            missing = [a for a in cands if a not in index]
            if missing or not cands:
                raise ValueError(f"{source}: topic {topic!r} lists answers not in the answer list: {missing[:5]}")
            self.topic_ids[str(topic)] = [index[a] for a in cands]
        self.composed_topics = set(COMPOSED) if self.topic_ids else set()  # answered by composition, not ranked
        self.processor = X2VLMImageProcessor.for_config(self.model.config)
        self.device, self.context, self.batch, self.name = device, context, batch, name
        enc = self.tokenizer(self.answer_list)
        self._answers = (enc["input_ids"].to(device), enc["attention_mask"].to(device))
        self.stats = GenerationStats()
        # (item key, question, view size) -> answer: the answers depend on the view and the question only, so
        # notebook 02's answer-quality check re-uses the dialogue's answers instead of asking again
        self.memo: dict[tuple[str, str, tuple[int, int]], str] = {}

    def _pixels(self, images: Sequence[Any]):
        import torch

        res = self.processor.settings.image_res
        return torch.stack([torch.from_numpy(self.processor.to_array(im.resize((res, res), resample=3)))
                            for im in images]).to(self.device)

    def _candidates(self, question: str) -> list[int] | None:
        """Answer-list ids a question is ranked over (its topic's list), ``None`` = the whole list (k_test)."""
        return self.topic_ids.get(question_topic(question) or "other") if self.topic_ids else None

    def rank(self, images: Sequence[Any], questions: Sequence[str], keys: Sequence[str] | None = None):
        """``(top answer ids, their probabilities)`` for each (image, question) pair; ids index ``answer_list``."""
        import torch

        keys = list(keys or [f"#{i}" for i in range(len(images))])
        for key, image, q in zip(keys, images, questions, strict=True):
            if image is None:
                raise ValueError(f"item {key}: no crop to answer from (the pixel answerer needs item images; "
                                 f"build views with load_views(with_images=True))")
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"item {key}: empty question; the pixel answerer needs a question")
        ids, probs = [0] * len(images), [1.0] * len(images)
        cands = [self._candidates(q) for q in questions]
        todo = [i for i, c in enumerate(cands) if c is None or len(c) > 1]
        for i, c in enumerate(cands):
            if c is not None and len(c) == 1:
                ids[i] = c[0]  # one train answer for the topic: no model call
        started = time.perf_counter()
        with torch.inference_mode():
            for s in range(0, len(todo), self.batch):
                part = todo[s:s + self.batch]
                enc = self.tokenizer([questions[i] for i in part])
                mask = enc["attention_mask"].to(self.device)
                states = self.model.question_states(self._pixels([images[i] for i in part]),
                                                    enc["input_ids"].to(self.device), mask)
                groups: dict[Any, list[int]] = {}
                for j, i in enumerate(part):
                    groups.setdefault(tuple(cands[i]) if cands[i] is not None else None, []).append(j)
                for group, rows in groups.items():
                    sel = torch.tensor(rows, device=self.device)
                    if group is None:
                        top, p = self.model.rank_answer(states[sel], mask[sel], *self._answers)
                        top, p = top[:, 0], p[:, 0]
                    else:
                        cid = torch.tensor(group, device=self.device)
                        top, p = self.model.rank_answer(states[sel], mask[sel], self._answers[0][cid],
                                                        self._answers[1][cid], k=len(group))
                        top, p = cid[top[:, 0]], p[:, 0]
                    for j, t, pr in zip(rows, top.tolist(), p.tolist()):
                        ids[part[j]], probs[part[j]] = int(t), float(pr)
        self.stats.add(GenerationStats(calls=1, sequences=len(todo), seconds=time.perf_counter() - started))
        return ids, probs

    MEMO_LIMIT = 2_000_000
    """Answers kept for re-use (about 100 bytes each); past it new answers are not memoised."""

    def answer(self, views: Sequence[ItemView], questions: Sequence[str],
               histories: Sequence[Sequence[Turn]] | None = None) -> list[str]:
        """One answer per (view, question); pairs answered before (same item, question and view size) come from
        :attr:`memo` without a model call."""
        if len(views) != len(questions):
            raise ValueError(f"{len(views)} views but {len(questions)} questions")
        ids = [(v.key, q, getattr(v.image, "size", (0, 0))) if isinstance(q, str) else None
               for v, q in zip(views, questions)]
        todo = [i for i, k in enumerate(ids) if k is None or k not in self.memo]
        fresh = dict(zip(todo, self._answer([views[i] for i in todo], [questions[i] for i in todo]) if todo else []))
        for i, a in fresh.items():
            if ids[i] is not None and len(self.memo) < self.MEMO_LIMIT:
                self.memo[ids[i]] = a
        return [fresh[i] if i in fresh else self.memo[k] for i, k in enumerate(ids)]

    def _answer(self, views: Sequence[ItemView], questions: Sequence[str]) -> list[str]:
        # (pair index, part topic or None, question) of every model question: the asked ones, and for a composed
        # (describe) question the questions of its parts
        asks: list[tuple[int, str | None, str]] = []
        composed: dict[int, tuple[str, ...]] = {}
        for i, q in enumerate(questions):
            topic = question_topic(q) if isinstance(q, str) else None
            if self.topic_ids and topic in COMPOSED and all(t in self.topic_ids for t in COMPOSED[topic]):
                composed[i] = COMPOSED[topic]
                asks += [(i, t, _TOPIC_QUESTION[t]) for t in composed[i]]
            else:
                asks.append((i, None, q))
        ids, _ = self.rank([views[i].image for i, _, _ in asks], [q for _, _, q in asks],
                           [views[i].key for i, _, _ in asks])
        out: list[str] = [""] * len(views)
        parts: dict[int, dict[str, str]] = {}
        for (i, t, _), a in zip(asks, ids):
            if t is None:
                out[i] = self.answer_list[a]
            else:
                parts.setdefault(i, {})[t] = self.answer_list[a]
        for i, part_topics in composed.items():
            out[i] = describe_text(*(parts[i][t] for t in part_topics))
        return out


def _load_tokenizer(folder: Path):
    from capret_utils.x2vlm import X2VLMTokenizer

    return X2VLMTokenizer.from_pretrained(folder)


_TOPIC_QUESTION = {question_topic(q): q for q in dialogue_questions()}
"""The scripted question of each topic (the composed describe answer asks these)."""


OFFICIAL_SUFFIXES = (".th", ".pth", ".pt", ".bin")
"""``vqa`` values ending in these name an official X2-VLM VQA checkpoint file (:func:`load_official_answerer`)."""


def df2_topic_answers() -> dict[str, list[str]]:
    """A closed answer vocabulary per question topic for data without a train answer list: the 13 DeepFashion2
    category names, the ground-truth answerer's phrases for sleeves / worn / viewpoint / occlusion / scale / zoom,
    and the synthetic benchmark's colour and pattern words (DeepFashion2 has no colour labels)."""
    from capret_utils.captions import dialogue as d
    from capret_utils.data.df2 import CATEGORY_NAMES
    from capret_utils.data.synth_spec import COLOURS, PATTERNS

    def phrases(table: Mapping[int, str | None], extra: Sequence[str] = ()) -> list[str]:
        return sorted({v for v in table.values() if v} | set(extra))

    return {"category": sorted(CATEGORY_NAMES.values()), "colour": sorted(COLOURS), "pattern": sorted(PATTERNS),
            "pattern_colour": sorted(set(COLOURS) | {"no"}), "sleeve": phrases(d._SLEEVES, ["no"]),
            "worn": phrases(d._WORN), "viewpoint": phrases(d._VIEW), "occlusion": phrases(d._OCCLUSION),
            "scale": phrases(d._SCALE), "zoom": phrases(d._ZOOM), "other": [d.NO_ANSWER]}


def load_official_answerer(path: str | os.PathLike, device: str = "cpu", image_res: int | None = None,
                           text_num_attention_heads: int | None = None, trust_checkpoint: bool = False,
                           tokenizer: str = "") -> PixelAnswerer:
    """A :class:`PixelAnswerer` around an official X2-VLM VQA file (``XVLMForVQA``, loaded key-exactly by
    :meth:`~capret_utils.x2vlm.vqa.X2VLMForVQA.from_official`).

    Answer list: ``answer_list.json`` next to the file (the official VQA release's list; ranked as the official
    code does, first-token shortlist of ``k_test``), else :func:`df2_topic_answers` (per-topic lists, every
    candidate scored). Tokenizer: ``tokenizer`` if given, else ``vocab.txt`` next to the file, else
    ``bert-base-uncased`` (the official one; needs the hub or its cache).
    """
    from capret_utils.x2vlm import X2VLMTokenizer
    from capret_utils.x2vlm.vqa import X2VLMForVQA

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vqa={str(path)!r}: official X2-VLM VQA checkpoint not found")
    model = X2VLMForVQA.from_official(path, text_num_attention_heads=text_num_attention_heads,
                                      image_res=image_res, trust_checkpoint=trust_checkpoint)
    name = tokenizer or (str(path.parent) if (path.parent / "vocab.txt").is_file() else "bert-base-uncased")
    tok = X2VLMTokenizer.from_pretrained(name)
    answers_file = path.parent / ANSWERS_FILE
    if answers_file.is_file():
        answers = json.loads(answers_file.read_text())
        if not isinstance(answers, list):
            raise ValueError(f"{answers_file}: expected a JSON list of answer strings, got {type(answers).__name__}")
        return PixelAnswerer.from_model(model, tok, answers, None, device, name=f"x2vlm-vqa:{path.name}")
    topics = df2_topic_answers()
    answers = sorted({a for cands in topics.values() for a in cands})
    return PixelAnswerer.from_model(model, tok, answers, topics, device, name=f"x2vlm-vqa:{path.name}")
