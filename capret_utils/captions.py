"""Captions per garment item: template captions, ChatCaptioner-style dialogue captions, the resumable store.

This module owns everything that turns an items-table row into a caption:

* :func:`template_caption` — the original study's format, literally
  ``"An image of a {category_name} with viewpoint {v}, occlusion level {o}, scale {s}, and zoom in {z}"``.
* The dialogue (ChatCaptioner, Zhu et al. 2023): a fixed first question, then ``rounds - 1`` questions from a
  **questioner** that sees only the history, each answered by an **answerer** that sees the item (crop or whole
  image), then one summary. Answers that carry no information (no / not sure / don't know / empty) and repeated
  questions are filtered *in code* and kept out of the summary. All items of a batch advance in **lockstep**:
  one left-padded batched LLM call and one batched VQA call per round, one batched summary call.

  Questioners (:class:`Questioner` protocol): :class:`ChatLLMQuestioner` (any HF chat causal LM through its chat
  template, default Phi-3-mini, optional 4-bit NF4, the KV cache of the shared dialogue prefix reused across
  rounds), :class:`ScriptedQuestioner` (fixed question list + rule-based summary; the offline questioner).
  Answerers (:class:`Answerer` protocol): :class:`VQAAnswerer` (BLIP VQA or BLIP-2, chosen by the checkpoint's
  config), :class:`AttributeAnswerer` (ground truth from the items table + ``attributes.jsonl``; the offline
  answerer and a ceiling for a perfect VQA).
* :class:`CaptionStore` — ``captions.jsonl``, one JSON object per item, appended and fsync'ed per batch; a
  restarted run skips finished keys; a torn last line (a run killed mid-write) is reported by readers and cut
  off before appending. :func:`load_captions` is what fine-tuning and retrieval call.
* :func:`build_tiny_models` — tiny random Phi-3 / BLIP / BLIP-2 checkpoints built offline from configs and saved
  with ``save_pretrained``, so tests and smoke runs load them through the same ``from_pretrained`` path as a
  user's model id.

torch / transformers are imported lazily: template captions, the store and the scripted/attribute pair need
neither.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import string
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import pandas as pd

try:  # POSIX advisory lock: one writer per store
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

# ------------------------------------------------------------------------------------------ template captions

VIEWPOINT_WORDS: dict[int, str] = {1: "not worn", 2: "frontal", 3: "side or back"}
OCCLUSION_WORDS: dict[int, str] = {1: "slight", 2: "medium", 3: "heavy"}
SCALE_WORDS: dict[int, str] = {1: "small", 2: "moderate", 3: "large"}
ZOOM_WORDS: dict[int, str] = {1: "no", 2: "medium", 3: "large"}
_TEMPLATE_FIELDS: dict[str, dict[int, str]] = {
    "viewpoint": VIEWPOINT_WORDS, "occlusion": OCCLUSION_WORDS, "scale": SCALE_WORDS, "zoom_in": ZOOM_WORDS,
}
TEMPLATE = "An image of a {category_name} with viewpoint {viewpoint}, occlusion level {occlusion}, scale {scale}, " \
           "and zoom in {zoom_in}"
"""The original study's caption format. "a" is kept literally: no DeepFashion2 category name starts with a vowel."""


def _code(row: Mapping[str, Any], name: str) -> int:
    value = row.get(name)
    try:
        code = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        code = None
    if code is None or code not in _TEMPLATE_FIELDS[name] or code != value:
        raise ValueError(f"item {row.get('key', '?')}: field {name!r} = {value!r} is not one of "
                         f"{sorted(_TEMPLATE_FIELDS[name])}")
    return code


def template_caption(row: Mapping[str, Any]) -> str:
    """The original study's template caption for one items-table row.

    ``"An image of a {category_name} with viewpoint {…}, occlusion level {…}, scale {…}, and zoom in {…}"`` with
    viewpoint 1/2/3 → not worn / frontal / side or back, occlusion → slight / medium / heavy, scale → small /
    moderate / large, zoom_in → no / medium / large. The article is literally "a" as in the study (every
    DeepFashion2 category name starts with a consonant). A code outside 1..3 raises ``ValueError`` naming the
    item key and the field.
    """
    name = row.get("category_name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"item {row.get('key', '?')}: field 'category_name' = {name!r} is not a non-empty string")
    words = {f: _TEMPLATE_FIELDS[f][_code(row, f)] for f in _TEMPLATE_FIELDS}
    return TEMPLATE.format(category_name=name.strip(), **words)


def template_captions(items: pd.DataFrame) -> dict[str, str]:
    """``{key: template caption}`` for every row of an items table."""
    _require_columns(items, ("key", "category_name", *_TEMPLATE_FIELDS), "template captions")
    return {row["key"]: template_caption(row) for row in items.to_dict("records")}


def _require_columns(items: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in items.columns]
    if missing:
        raise ValueError(f"items table lacks column(s) {missing} needed for {what}")


# -------------------------------------------------------------------------------------- prompts (paraphrased)

FIRST_QUESTION = "Describe this image in detail."
"""ChatCaptioner's fixed first question (round 1 makes no LLM call)."""

QUESTION_INSTRUCTION = (
    "There is a photo of one garment that you cannot see. Find out what it looks like by asking me questions "
    "about it. Choose informative questions that teach you as much as possible: the type of garment, its "
    "colours, pattern, material, sleeves, length, details, and how it is shown in the photo. Ask exactly one "
    "question at a time, never answer a question yourself, and avoid questions that can be answered with yes "
    "or no. My replies start with 'Answer:'."
)
NEXT_QUESTION_INSTRUCTION = "Ask your next question. Avoid yes/no questions."
SUMMARY_INSTRUCTION = (
    "Now describe the garment in a few sentences, using only what my answers told you. Leave out questions "
    "whose answer was 'no', 'not sure' or 'I don't know'. Do not add anything that was not said, and do not "
    "leave out anything that was."
)
ANSWER_INSTRUCTION = (
    "Answer the question about the garment in the image. If you are not sure, say that you don't know. Do not "
    "describe anything that is not in the image."
)
REPEATED_ANSWER = "You asked this already; ask about something else."
NO_ANSWER = "I don't know."

# ------------------------------------------------------------------------------------------- dialogue pieces


@dataclass
class Turn:
    """One question/answer round; ``kept`` says whether the filter let the answer into the summary."""

    question: str
    answer: str
    kept: bool
    reason: str | None = None  # why it was filtered: "uninformative answer", "repeated question", "empty question"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ItemView:
    """What an answerer gets for one item: the key, the items-table row, and the image (crop) when needed."""

    key: str
    row: Mapping[str, Any]
    image: Any = None  # PIL.Image.Image | None


def clean_question(text: str) -> str:
    """ChatCaptioner's question trim: the text after the last ``Question:``, cut before an ``Answer:`` the model
    may have added (or the text after it when nothing comes before), one line, stripped."""
    text = text or ""
    if "Question:" in text:
        text = text.split("Question:")[-1]
    if "Answer:" in text:
        before, after = text.split("Answer:", 1)
        text = before if before.strip() else after
    return " ".join(text.split()).strip()


def clean_answer(text: str) -> str:
    """ChatCaptioner's answer trim: cut at the first ``Question:`` (the model carried the dialogue on), drop a
    leading ``Answer:``, one line, stripped."""
    text = (text or "").split("Question:")[0]
    text = text.strip()
    if text.startswith("Answer:"):
        text = text[len("Answer:"):]
    return " ".join(text.split()).strip()


def clean_summary(text: str) -> str:
    """The summary on one line, without a leading ``Summary:`` cue."""
    text = (text or "").strip()
    if text.startswith("Summary:"):
        text = text[len("Summary:"):]
    return " ".join(text.split()).strip()


_PUNCT = str.maketrans("", "", string.punctuation)
_UNINFORMATIVE_EXACT = {"no", "nope", "not", "nothing", "unsure", "unknown", "idk", "na", "n a", "none known"}
_UNINFORMATIVE_RE = re.compile(
    r"\b(not sure|unsure|do not know|dont know|don t know|no idea|cannot tell|cant tell|can t tell|"
    r"cannot see|cant see|can t see|not visible|unknown|unclear|hard to tell|impossible to tell)\b"
)


def _norm(text: str) -> str:
    return " ".join(text.lower().replace("’", "'").replace("'", "").translate(_PUNCT).split())


def uninformative_reason(answer: str) -> str | None:
    """``"uninformative answer"`` when an answer carries no information — empty, a bare "no", or a not sure /
    don't know / can't tell phrase — else ``None``. "no" only counts alone: "no sleeves" is informative."""
    norm = _norm(answer)
    if not norm or norm in _UNINFORMATIVE_EXACT or _UNINFORMATIVE_RE.search(norm):
        return "uninformative answer"
    return None


def same_question(a: str, b: str) -> bool:
    """Questions equal up to case, punctuation and spacing."""
    return _norm(a) == _norm(b)


# ---------------------------------------------------------------------------------------------- protocols


@runtime_checkable
class Questioner(Protocol):
    """Asks the next question from each history and summarises each finished dialogue (batched)."""

    name: str

    def ask(self, histories: Sequence[Sequence[Turn]]) -> list[str]:
        """One next question per history (all turns so far, filtered ones included)."""
        ...

    def summarise(self, histories: Sequence[Sequence[Turn]]) -> list[str]:
        """One caption per history (only the kept turns are passed)."""
        ...


@runtime_checkable
class Answerer(Protocol):
    """Answers one question per item (batched)."""

    name: str
    needs_images: bool

    def answer(self, views: Sequence[ItemView], questions: Sequence[str],
               histories: Sequence[Sequence[Turn]]) -> list[str]:
        ...


@dataclass
class GenerationStats:
    """Counters of a model's generate calls (for throughput reports)."""

    calls: int = 0
    sequences: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    cached_prompt_tokens: int = 0  # of prompt_tokens, read from a reused KV cache instead of recomputed

    def add(self, other: "GenerationStats") -> None:
        for f in asdict(self):
            setattr(self, f, getattr(self, f) + getattr(other, f))

    def minus(self, other: "GenerationStats") -> "GenerationStats":
        return GenerationStats(**{f: getattr(self, f) - getattr(other, f) for f in asdict(self)})

    def copy(self) -> "GenerationStats":
        return GenerationStats(**asdict(self))


# ------------------------------------------------------------------------------------ scripted questioner


@dataclass(frozen=True)
class ScriptedQuestion:
    """A scripted question, the slot its answer fills in the summary, and the phrase a bare "yes" stands for."""

    text: str
    slot: str
    yes_phrase: str | None = None


DEFAULT_QUESTIONS: tuple[ScriptedQuestion, ...] = (
    ScriptedQuestion("What type of garment is this?", "category"),
    ScriptedQuestion("What is the main colour of the garment?", "colour"),
    ScriptedQuestion("What pattern does the garment have?", "pattern"),
    ScriptedQuestion("What colour is the pattern?", "pattern_colour"),
    ScriptedQuestion("How long are the sleeves?", "sleeve"),
    ScriptedQuestion("Is the garment worn by a person?", "worn", yes_phrase="worn by a person"),
    ScriptedQuestion("From which side is the garment seen?", "viewpoint"),
    ScriptedQuestion("How much of the garment is occluded?", "occlusion"),
    ScriptedQuestion("How large is the garment in the picture?", "scale"),
    ScriptedQuestion("How far is the picture zoomed in on the garment?", "zoom"),
    ScriptedQuestion("What material is the garment made of?", "material"),
)
"""The offline questioner's questions after the fixed first one, most informative first."""

_PLAIN_PATTERNS = {"solid", "plain", "none", "no pattern", "solid colour", "solid color", "plain colour"}


_PLURAL_GARMENTS = ("shorts", "trousers", "jeans", "pants", "leggings")


def _with_article(noun: str) -> str:
    """``"a navy top"``, ``"an orange vest"``, and no article for plural garments (``"black shorts"``)."""
    if noun.split()[-1].lower() in _PLURAL_GARMENTS:
        return noun
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


class ScriptedQuestioner:
    """A fixed, configurable question list and a rule-based summary built only from kept answers.

    Round ``r`` (after the fixed first question) asks ``questions[(r - 1) % len(questions)]``; past the end of the
    list questions repeat and the loop's repeat filter drops them. The summary is a noun phrase from the
    ``colour`` / ``pattern`` / ``pattern_colour`` / ``category`` slots (e.g. "a navy short sleeve top with white
    horizontal stripes") followed by the other kept answers in question order ("worn by a person, seen from the
    front"). A bare "yes" becomes the question's ``yes_phrase`` (or is dropped). The first question's answer is
    used only when no noun-phrase slot was answered.
    """

    def __init__(self, questions: Sequence[ScriptedQuestion | tuple] = DEFAULT_QUESTIONS,
                 first_question: str = FIRST_QUESTION, name: str = "scripted") -> None:
        self.questions = tuple(q if isinstance(q, ScriptedQuestion) else ScriptedQuestion(*q) for q in questions)
        if not self.questions:
            raise ValueError("ScriptedQuestioner needs at least one question")
        self.first_question = first_question
        self.name = name
        self.stats = GenerationStats()

    def ask(self, histories: Sequence[Sequence[Turn]]) -> list[str]:
        return [self.questions[(max(len(h), 1) - 1) % len(self.questions)].text for h in histories]

    def _slot(self, question: str) -> ScriptedQuestion | None:
        if same_question(question, self.first_question):
            return ScriptedQuestion(question, "description")
        for q in self.questions:
            if same_question(q.text, question):
                return q
        return None

    def summarise(self, histories: Sequence[Sequence[Turn]]) -> list[str]:
        return [self._summary(h) for h in histories]

    def _summary(self, turns: Sequence[Turn]) -> str:
        slots: dict[str, str] = {}
        clauses: list[str] = []
        for turn in turns:
            if not turn.kept:
                continue
            q = self._slot(turn.question)
            answer = turn.answer.strip().rstrip(".")
            if _norm(answer) == "yes":
                if q is None or not q.yes_phrase:
                    continue
                answer = q.yes_phrase
            slot = q.slot if q is not None else "other"
            if slot in ("colour", "pattern", "pattern_colour", "category", "description"):
                slots.setdefault(slot, answer)
            elif slot == "sleeve" and "sleeve" in slots.get("category", "").lower():
                continue  # "short sleeve top" already says it
            else:
                clauses.append(answer)
        category = slots.get("category")
        colour = slots.get("colour")
        pattern = slots.get("pattern")
        if category or colour or pattern:
            plain = pattern is not None and _norm(pattern) in _PLAIN_PATTERNS
            words = ["plain"] if plain else []
            words += [colour] if colour else []
            words.append(re.sub(r"^(an?|the)\s+", "", category, flags=re.I) if category else "garment")
            noun = _with_article(" ".join(words))
            if pattern and not plain:
                pc = slots.get("pattern_colour")
                noun += f" with {pc + ' ' if pc else ''}{pattern}"
        else:
            noun = slots.get("description", "")
        parts = [p for p in [noun, *clauses] if p]
        return ", ".join(parts)


# ------------------------------------------------------------------------------------- attribute answerer

ATTRIBUTES_FILE = "attributes.jsonl"
_SLEEVES: dict[int, str | None] = {1: "short sleeves", 2: "long sleeves", 3: "short sleeves", 4: "long sleeves",
                                   5: "sleeveless", 6: "sleeveless", 7: None, 8: None, 9: None,
                                   10: "short sleeves", 11: "long sleeves", 12: "sleeveless", 13: "sleeveless"}
_WORN = {1: "not worn", 2: "worn by a person", 3: "worn by a person"}
_VIEW = {1: None, 2: "seen from the front", 3: "seen from the side or back"}
_OCCLUSION = {1: "slightly occluded", 2: "moderately occluded", 3: "heavily occluded"}
_SCALE = {1: "small in the picture", 2: "of moderate size in the picture", 3: "large in the picture"}
_ZOOM = {1: "not zoomed in", 2: "moderately zoomed in", 3: "strongly zoomed in"}

# (topic, pattern) in priority order: the first match decides what a question is about.
_TOPICS: tuple[tuple[str, re.Pattern[str]], ...] = tuple((t, re.compile(p)) for t, p in (
    ("pattern_colour", r"colou?r\w*\b.*\b(pattern|stripes?|dots?|checks?|print)|"
                       r"(pattern|stripes?|dots?|checks?|print)\b.*\bcolou?r"),
    ("colour", r"colou?r|shade|\bhue"),
    ("pattern", r"pattern|stripe|\bdots?\b|polka|check|plaid|tartan|\bprint|solid|plain|\bdesign"),
    ("sleeve", r"sleeve|\barms?\b"),
    ("worn", r"\bworn\b|\bwear|person|model|someone|somebody|\bbody\b"),
    ("viewpoint", r"\bside\b|\bfront\b|\bback\b|\bview|angle|facing|perspective|direction"),
    ("occlusion", r"occlu|hidden|\bcover|block|obscur|visible"),
    ("zoom", r"zoom|close.?up|crop"),
    ("scale", r"\bsize\b|\blarge|\bbig|\bsmall|scale|how much of the (image|picture|photo)"),
    ("category", r"what (kind|type|sort|category)|category|which (garment|item|piece)|what garment|"
                 r"what (is|s) (this|it|the garment|the item)\b"),
    ("describe", r"describe|detail|tell me about|what do you see|what is in|what s in"),
))


def question_topic(question: str) -> str | None:
    """The attribute a question asks about (``colour``, ``pattern``, ``sleeve``, …) or ``None``."""
    text = _norm(question)
    for topic, pattern in _TOPICS:
        if pattern.search(text):
            return topic
    return None


def load_attributes(split_dirs: str | os.PathLike | Iterable[str | os.PathLike]) -> dict[str, dict[str, Any]]:
    """Read ``<split>/attributes.jsonl`` of one or more split folders into ``{key: attributes}``.

    A split without the file contributes nothing (real DeepFashion2 has none). A malformed line raises
    ``ValueError`` naming the file, the line and the field.
    """
    dirs = [split_dirs] if isinstance(split_dirs, (str, os.PathLike)) else list(split_dirs)
    out: dict[str, dict[str, Any]] = {}
    for d in dirs:
        path = Path(d) / ATTRIBUTES_FILE
        if not path.is_file():
            continue
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                key = obj.get("key")
                if not isinstance(key, str) or not key:
                    raise ValueError(f"{path}:{lineno}: field 'key' = {key!r} is not a non-empty string")
                for fname in ("colour", "pattern"):
                    if fname in obj and not isinstance(obj[fname], str):
                        raise ValueError(f"{path}:{lineno}: field {fname!r} = {obj[fname]!r} is not a string")
                pc = obj.get("pattern_colour")
                if pc is not None and not isinstance(pc, str):
                    raise ValueError(f"{path}:{lineno}: field 'pattern_colour' = {pc!r} is not a string or null")
                if key in out:
                    raise ValueError(f"{path}:{lineno}: duplicate key {key!r}")
                out[key] = obj
    return out


class AttributeAnswerer:
    """Answers from ground truth: the items table row (category, viewpoint, occlusion, scale, zoom) and the
    synthetic benchmark's ``attributes.jsonl`` (colour, pattern, pattern colour); "I don't know" otherwise.

    The offline answerer for the synthetic benchmark, and a ceiling for what a perfect VQA model could add.
    Questions are mapped to an attribute by keyword rules (:func:`question_topic`); a question presupposing
    something absent (the colour of the pattern of a solid garment, the sleeves of trousers) gets "no".
    """

    name = "attributes"
    needs_images = False

    def __init__(self, attributes: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.attributes = dict(attributes or {})

    def answer(self, views: Sequence[ItemView], questions: Sequence[str],
               histories: Sequence[Sequence[Turn]] | None = None) -> list[str]:
        return [self.answer_one(v.row, q) for v, q in zip(views, questions, strict=True)]

    def describe(self, row: Mapping[str, Any]) -> str:
        attrs = self.attributes.get(str(row.get("key")), {})
        colour, pattern, pc = attrs.get("colour"), attrs.get("pattern"), attrs.get("pattern_colour")
        text = _with_article(" ".join(w for w in (colour, row.get("category_name") or "garment") if w))
        if pattern and pattern != "solid":
            text += f" with {pc + ' ' if pc else ''}{pattern}"
        return text

    def answer_one(self, row: Mapping[str, Any], question: str) -> str:
        topic = question_topic(question)
        attrs = self.attributes.get(str(row.get("key")), {})
        cat = row.get("category_id")
        if topic == "pattern_colour":
            if attrs.get("pattern") == "solid":
                return "no"
            return attrs.get("pattern_colour") or NO_ANSWER
        if topic == "colour":
            return attrs.get("colour") or NO_ANSWER
        if topic == "pattern":
            return attrs.get("pattern") or NO_ANSWER
        if topic == "sleeve":
            if cat not in _SLEEVES:
                return NO_ANSWER
            return _SLEEVES[cat] or "no"  # sleeves of shorts / trousers / a skirt: not applicable
        if topic == "worn":
            return _WORN.get(row.get("viewpoint")) or NO_ANSWER
        if topic == "viewpoint":
            return _VIEW.get(row.get("viewpoint")) or NO_ANSWER
        if topic == "occlusion":
            return _OCCLUSION.get(row.get("occlusion")) or NO_ANSWER
        if topic == "zoom":
            return _ZOOM.get(row.get("zoom_in")) or NO_ANSWER
        if topic == "scale":
            return _SCALE.get(row.get("scale")) or NO_ANSWER
        if topic == "category":
            return row.get("category_name") or NO_ANSWER
        if topic == "describe":
            return self.describe(row)
        return NO_ANSWER


# ------------------------------------------------------------------------------------------ images / views


def item_crop_box(row: Mapping[str, Any], margin: float, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The item's GT box grown by ``margin`` × its width/height on each side, clamped to the image (pixels)."""
    w_img, h_img = size
    try:
        x1, y1, x2, y2 = (float(row[k]) for k in ("x1", "y1", "x2", "y2"))
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"item {row.get('key', '?')}: box fields x1 y1 x2 y2 missing or not numbers") from None
    bw, bh = x2 - x1, y2 - y1
    if not (bw > 0 and bh > 0):
        raise ValueError(f"item {row.get('key', '?')}: empty box [{x1}, {y1}, {x2}, {y2}] in {row.get('path')}")
    box = (max(0, int(x1 - margin * bw)), max(0, int(y1 - margin * bh)),
           min(w_img, int(round(x2 + margin * bw))), min(h_img, int(round(y2 + margin * bh))))
    if box[2] - box[0] < 1 or box[3] - box[1] < 1:
        raise ValueError(f"item {row.get('key', '?')}: box [{x1}, {y1}, {x2}, {y2}] lies outside the "
                         f"{w_img}x{h_img} image {row.get('path')}")
    return box


def load_views(rows: Sequence[Mapping[str, Any]], view: str = "crop", margin: float = 0.1,
               with_images: bool = True) -> list[ItemView]:
    """Item views for a batch: each image file is opened once; ``view`` is ``"crop"`` (GT box + margin) or
    ``"image"`` (the whole photo)."""
    if view not in ("crop", "image"):
        raise ValueError(f"view must be 'crop' or 'image', got {view!r}")
    if not with_images:
        return [ItemView(str(r["key"]), r) for r in rows]
    from PIL import Image

    cache: dict[str, Any] = {}
    views = []
    for r in rows:
        path = str(r.get("path", ""))
        if path not in cache:
            try:
                with Image.open(path) as im:
                    cache[path] = im.convert("RGB")
            except FileNotFoundError:
                raise FileNotFoundError(f"item {r.get('key')}: image file {path} (field 'path') not found") from None
            except OSError as exc:
                raise ValueError(f"item {r.get('key')}: cannot read image {path}: {exc}") from None
        image = cache[path]
        if view == "crop":
            image = image.crop(item_crop_box(r, margin, image.size))
        views.append(ItemView(str(r["key"]), r, image))
    return views


# ------------------------------------------------------------------------------------- HF loading helpers


def resolve_device(device: str = "auto") -> str:
    """``"auto"`` → ``"cuda"`` when a GPU is visible, else ``"cpu"``; anything else is returned as given."""
    if device and device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _torch_dtype(dtype: Any, device: str) -> Any:
    import torch

    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, str):
        return getattr(torch, dtype)
    return dtype


def quantization_config(compute_dtype: Any = "bfloat16") -> Any:
    """4-bit NF4 with double quantisation and (by default) bf16 compute, as a ``BitsAndBytesConfig``.

    In transformers 5.x this must be passed as ``quantization_config=``; ``load_in_4bit=True`` as a
    ``from_pretrained`` keyword raises ``TypeError``. Works on CUDA and, with bitsandbytes ≥ 0.48, on CPU.
    """
    import logging

    import torch
    from transformers import BitsAndBytesConfig

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # harmless 'kernels' notice
    if isinstance(compute_dtype, str):
        compute_dtype = getattr(torch, compute_dtype)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def _load_model(cls: Any, model_id: str, device: str, dtype: Any, load_in_4bit: bool, compute_dtype: Any,
                revision: str | None = None) -> Any:
    kwargs: dict[str, Any] = {"dtype": _torch_dtype(dtype, device)}
    if revision:
        kwargs["revision"] = revision
    if load_in_4bit:
        kwargs["quantization_config"] = quantization_config(compute_dtype)
        kwargs["device_map"] = {"": device}
        model = cls.from_pretrained(model_id, **kwargs)
    else:
        model = cls.from_pretrained(model_id, **kwargs).to(device)
    return model.eval()


def _generated_lengths(new_ids: Any, stop_ids: set[int]) -> list[int]:
    """Tokens each row really generated: up to and including its first stop token."""
    lengths = []
    for row in new_ids.tolist():
        n = len(row)
        for i, t in enumerate(row):
            if t in stop_ids:
                n = i + 1
                break
        lengths.append(n)
    return lengths


# ---------------------------------------------------------------------------------------- LLM questioner

DEFAULT_LLM = "microsoft/Phi-3-mini-4k-instruct"


@dataclass
class _PrefixState:
    """What :class:`ChatLLMQuestioner` keeps of its last call for prefix reuse."""

    cache: Any  # the DynamicCache returned by generate
    tokens: Any  # int64 array (rows, longest): the tokens each row's keys/values cover, left-aligned, -1 after
    starts: list[int]  # the cache column of each row's first token (its left padding)


@dataclass
class LLMConfig:
    """How :class:`ChatLLMQuestioner` loads and decodes (ChatCaptioner: 30 tokens per question, 100 per summary)."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str | None = None  # None = bf16 on CUDA, fp32 on CPU
    load_in_4bit: bool = False  # NF4 + double quant via BitsAndBytesConfig (GPU; CPU only for tiny models)
    compute_dtype: str = "bfloat16"  # 4-bit compute dtype
    max_new_tokens: int = 30  # per question
    summary_max_new_tokens: int = 100
    min_new_tokens: int = 0  # > 0 forces lengths (benchmarks, random test models)
    do_sample: bool = False  # greedy by default (deterministic, batch-invariant)
    temperature: float = 0.6  # only with do_sample (ChatCaptioner used 0.6)
    revision: str | None = None
    prefix_cache: bool = True  # reuse the previous call's KV cache for the shared prompt prefix (exact; see below)
    question_instruction: str = QUESTION_INSTRUCTION
    next_question_instruction: str = NEXT_QUESTION_INSTRUCTION
    summary_instruction: str = SUMMARY_INSTRUCTION


class ChatLLMQuestioner:
    """Any Hugging Face chat causal LM as the questioner (default Phi-3-mini-4k-instruct), batched.

    The instruction goes into the first user turn (Phi-3 was not trained with system prompts; old templates
    drop them); each past round is an assistant turn ``Question: …`` and a user turn ``Answer: …``; the last
    user turn ends with the next-question (or summary) instruction and the assistant turn is pre-filled with the
    cue ``Question:`` (or ``Summary:``). A tokenizer without a chat template gets ChatCaptioner's flat completion
    prompt instead. Prompts are left-padded into one ``generate`` call per round; decoding stops on every end
    token the model and tokenizer declare (Phi-3: ``<|end|>`` 32007 and ``<|endoftext|>`` 32000).

    Prefix reuse (``LLMConfig.prefix_cache``, default on): each round re-sends the whole dialogue, so the KV
    cache of the previous call is kept and every prompt of the next call starts from the longest token prefix it
    shares with any row of that call (its own dialogue up to the previous answer; the next-question instruction
    sits in the last user turn, so the shared part ends before it). The prompt text and the token ids, mask and
    position ids given to the model are unchanged; greedy outputs are the same as with a full prefill (tested).
    On the benchmark (batch 32, 10 rounds) ~80 % of the prompt tokens come from the cache. The cache of the last
    call is held until the next one (on a GPU ≈ 0.39 MB per token per row for Phi-3-mini in bf16), call
    :meth:`clear_prefix_cache` to free it. With ``prefix_cache=False`` every call is a plain ``generate``.
    """

    def __init__(self, model_id: str = DEFAULT_LLM, config: LLMConfig | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config or LLMConfig()
        self.model_id = str(model_id)
        self.name = f"llm:{self.model_id}" + (" (4-bit)" if self.config.load_in_4bit else "")
        self.device = resolve_device(self.config.device)
        kw = {"revision": self.config.revision} if self.config.revision else {}
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_id, **kw)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = _load_model(AutoModelForCausalLM, self.model_id, self.device, self.config.dtype,
                                 self.config.load_in_4bit, self.config.compute_dtype, self.config.revision)
        if self.config.load_in_4bit and self.device == "cpu" and self.model.num_parameters() > 50_000_000:
            warnings.warn(f"{self.model_id}: 4-bit NF4 on CPU is slower than bf16/fp32 (weights are dequantised "
                          f"for every matmul); it is meant for GPUs and tiny test models", RuntimeWarning,
                          stacklevel=2)
        self.stop_ids = self._stop_ids()
        self.stats = GenerationStats()
        self._prefix: _PrefixState | None = None

    def _stop_ids(self) -> list[int]:
        ids: set[int] = set()
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        vocab = self.tokenizer.get_vocab()
        for tok in ("<|end|>", "<|endoftext|>", "<|eot_id|>", "<|im_end|>"):
            if tok in vocab:
                ids.add(vocab[tok])
        if not ids:
            raise ValueError(f"{self.model_id}: neither the model nor the tokenizer declares an end token")
        return sorted(ids)

    # prompts ------------------------------------------------------------------------------------------
    def _messages(self, turns: Sequence[Turn], final_instruction: str) -> list[dict[str, str]]:
        cfg = self.config
        msgs = [{"role": "user", "content": cfg.question_instruction}]
        for t in turns:
            if not t.question:
                continue
            answer = t.answer or (REPEATED_ANSWER if t.reason == "repeated question" else NO_ANSWER)
            msgs.append({"role": "assistant", "content": f"Question: {t.question}"})
            msgs.append({"role": "user", "content": f"Answer: {answer}"})
        msgs[-1]["content"] += f"\n\n{final_instruction}"
        return msgs

    def _flat_prompt(self, turns: Sequence[Turn], final_instruction: str) -> str:
        log = "\n".join(f"Question: {t.question}\nAnswer: {t.answer or NO_ANSWER}" for t in turns if t.question)
        return f"{self.config.question_instruction}\n{log}\n{final_instruction}\n"

    def prompt(self, turns: Sequence[Turn], summary: bool = False) -> str:
        """The exact text sent to the model for one dialogue (before tokenisation)."""
        final = self.config.summary_instruction if summary else self.config.next_question_instruction
        cue = "Summary:" if summary else "Question:"
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(self._messages(turns, final), tokenize=False,
                                                      add_generation_prompt=True)
        else:
            text = self._flat_prompt(turns, final)
        return text + cue

    # generation ---------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """One left-padded batched greedy (or sampled) ``generate`` call; returns the new text per prompt.

        With ``LLMConfig.prefix_cache`` the KV cache of the previous call is reused for the longest token prefix
        each prompt shares with a prompt (or prompt + generated text) of that call (:meth:`_reuse_prefix`); the
        token ids, attention mask and position ids given to the model are the same as without it.
        """
        import torch

        cfg = self.config
        bos = self.tokenizer.bos_token
        add_special = not (bos and all(p.startswith(bos) for p in prompts))
        enc = self.tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=add_special)
        enc = {k: v.to(self.model.device) for k, v in enc.items()}
        kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=cfg.do_sample,
                                      eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id)
        if cfg.min_new_tokens:
            kwargs["min_new_tokens"] = min(cfg.min_new_tokens, max_new_tokens)
        if cfg.do_sample:
            kwargs["temperature"] = cfg.temperature
        else:  # silence "generation flags are not valid" for checkpoints whose generation_config samples
            kwargs.update(temperature=None, top_p=None, top_k=None)
        cached_tokens = 0
        started = time.perf_counter()
        with torch.inference_mode():
            if cfg.prefix_cache:
                reused = self._reuse_prefix(enc["input_ids"], enc["attention_mask"], max_new_tokens)
                self._prefix = None  # the old cache is consumed (or useless): free it before generating
                if reused is not None:
                    kwargs["cache"], cached_tokens = reused
                out = self.model.generate(**enc, **kwargs, return_dict_in_generate=True)
                sequences = out.sequences
            else:
                sequences = self.model.generate(**enc, **kwargs)
        new = sequences[:, enc["input_ids"].shape[1]:]
        if str(self.model.device).startswith("cuda"):
            torch.cuda.synchronize()
        stop = set(self.stop_ids)
        self.stats.add(GenerationStats(calls=1, sequences=len(prompts),
                                       prompt_tokens=int(enc["attention_mask"].sum()),
                                       generated_tokens=sum(_generated_lengths(new, stop)),
                                       seconds=time.perf_counter() - started, cached_prompt_tokens=cached_tokens))
        if cfg.prefix_cache:
            self._remember(enc["attention_mask"], sequences, out.cache, stop)
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)

    # prefix cache -------------------------------------------------------------------------------------
    # Every round re-sends the whole dialogue, so round r+1's prompt repeats round r's up to the last answer
    # (the next-question instruction is appended to the last user turn, so the shared part ends before it; the
    # common *token* prefix is found per row, whatever the layout). Reuse keeps the left-padded layout of the
    # full prompts: with T = the longest uncached suffix, row i's last T tokens are fed to the model and its
    # first len_i - T tokens (all inside its reusable prefix) are copied from the old cache into the last
    # columns of the first N - T, so token j of a row sits in the same column, with the same position id
    # (attention-mask cumsum; RoPE is applied before caching) and the same mask as in a full prefill. A cached
    # key/value depends only on the tokens before it, so the result is what a full prefill computes, up to
    # floating-point summation order (the same latitude as batching itself).

    def clear_prefix_cache(self) -> None:
        """Drop the KV cache kept from the last call (frees its memory; the next call prefills in full)."""
        self._prefix = None

    def _prefix_cache_usable(self, cache: Any, width: int) -> bool:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

        if not isinstance(cache, DynamicCache) or any(getattr(cache, "is_linear", [False])):
            return False
        return all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer)
                   and getattr(layer, "keys", None) is not None and layer.keys.shape[-2] == width
                   for layer in cache.layers)

    def _remember(self, attention_mask: Any, sequences: Any, cache: Any, stop: set[int]) -> None:
        """Keep ``cache`` and, per row, the tokens whose keys/values it holds (prompt + generated text up to
        the first end token; the last generated token was never fed back) and the column of the first one."""
        import numpy as np

        width = sequences.shape[1] - 1
        if not self._prefix_cache_usable(cache, width):
            return
        n_prompt = attention_mask.shape[1]
        starts = (n_prompt - attention_mask.sum(1)).tolist()
        rows = []
        for start, seq in zip(starts, sequences.tolist(), strict=True):
            gen = seq[n_prompt:width]
            k = next((i for i, t in enumerate(gen) if t in stop), len(gen))
            rows.append(seq[start:n_prompt + k])
        tokens = np.full((len(rows), max(map(len, rows))), -1, dtype=np.int64)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = r
        self._prefix = _PrefixState(cache=cache, tokens=tokens, starts=starts)

    def _reuse_prefix(self, input_ids: Any, attention_mask: Any, max_new_tokens: int) -> tuple[Any, int] | None:
        """A ``DynamicCache`` holding the first ``N - T`` columns of this batch (see the comment above), built
        from the previous call's cache, and the number of prompt tokens it covers; ``None`` when nothing is
        reusable (first call, no shared prefix, or a sliding window the prompt could exceed)."""
        import numpy as np
        import torch
        from transformers import DynamicCache

        prev = self._prefix
        if prev is None:
            return None
        n = input_ids.shape[1]
        window = getattr(self.model.config, "sliding_window", None)
        if window and n + max_new_tokens >= window:
            return None
        lengths = attention_mask.sum(1).tolist()
        ids = input_ids.cpu().numpy()
        old = prev.tokens
        src, shared = [], []
        for i, length in enumerate(lengths):
            x = ids[i, n - length:]
            m = min(length, old.shape[1])
            eq = old[:, :m] == x[:m]
            lcp = np.where(eq.all(1), m, eq.argmin(1))
            j = i if i < len(lcp) and lcp[i] == lcp.max() else int(lcp.argmax())
            src.append(j)
            shared.append(min(int(lcp[j]), length - 1))  # at least one token is fed to the model
        t = max(length - s for length, s in zip(lengths, shared, strict=True))
        p = n - t
        if p <= 0:
            return None
        device = prev.cache.layers[0].keys.device
        keep = [max(0, length - t) for length in lengths]  # row i's cached tokens, all within its shared prefix
        col = torch.arange(p, device=device)
        first = torch.tensor([p - k for k in keep], device=device)  # new column of the row's first cached token
        start = torch.tensor([prev.starts[j] for j in src], device=device)  # its old column
        width = prev.cache.layers[0].keys.shape[-2]
        cols = (start[:, None] + col[None, :] - first[:, None]).clamp(0, width - 1)  # padding columns: masked
        rows = torch.tensor(src, device=device)[:, None]
        data = [(layer.keys[rows, :, cols].transpose(1, 2).contiguous(),
                 layer.values[rows, :, cols].transpose(1, 2).contiguous()) for layer in prev.cache.layers]
        return DynamicCache(ddp_cache_data=data, config=self.model.config), sum(keep)

    def ask(self, histories: Sequence[Sequence[Turn]]) -> list[str]:
        prompts = [self.prompt(h) for h in histories]
        return [clean_question(t) for t in self.generate(prompts, self.config.max_new_tokens)]

    def summarise(self, histories: Sequence[Sequence[Turn]]) -> list[str]:
        prompts = [self.prompt(h, summary=True) for h in histories]
        return [clean_summary(t) for t in self.generate(prompts, self.config.summary_max_new_tokens)]


# ---------------------------------------------------------------------------------------------- VQA answerer

DEFAULT_VQA = "Salesforce/blip-vqa-base"


@dataclass
class VQAConfig:
    """How :class:`VQAAnswerer` loads and decodes."""

    device: str = "auto"
    dtype: str | None = None  # None = bf16 on CUDA, fp32 on CPU
    load_in_4bit: bool = False  # BLIP-2 in NF4 (GPU)
    compute_dtype: str = "bfloat16"
    max_new_tokens: int = 20
    min_new_tokens: int = 0
    context_rounds: int = 1  # BLIP-2: previous Q/A pairs in its prompt (ChatCaptioner's CLI default: 1)
    answer_instruction: str = ANSWER_INSTRUCTION  # BLIP-2 only; BLIP VQA sees the question alone
    revision: str | None = None


class VQAAnswerer:
    """A VQA model as the answerer, chosen by the checkpoint's ``config.model_type``.

    * ``blip`` → ``BlipForQuestionAnswering`` + ``BlipProcessor`` (e.g. ``Salesforce/blip-vqa-base``): terse
      1–3-word answers; only the question is input. In transformers 5.24 the answer decoder attends to the
      question's padding: ``BlipForQuestionAnswering.generate`` passes an all-ones question mask, and
      ``BlipTextAttention`` does not hand the cross-attention mask on to ``BlipTextSelfAttention`` (which reads
      ``encoder_attention_mask``). So padded batches would change answers. The answerer therefore runs the
      model's own parts (vision model → question encoder → ``text_decoder.generate``) with the real question mask
      and a forward pre-hook that passes the cross-attention mask on, as the original BLIP does; a probe at load
      time checks that a padded question gives the same logits as the unpadded one (``batching == "masked"``,
      one call per round). If the probe fails (another transformers version), questions are grouped by token
      length instead (``batching == "length-buckets"``: one call per distinct length, no padding).
    * ``blip-2`` → ``Blip2ForConditionalGeneration`` + ``Blip2Processor`` (e.g. ``Salesforce/blip2-opt-2.7b``):
      ChatCaptioner's prompt (instruction, the last ``context_rounds`` Q/A pairs, ``Question: q``, ``Answer:``),
      left-padded; a decoder-only (OPT) language model returns prompt + answer ids, so the prompt is sliced off.
    """

    SUPPORTED = ("blip", "blip-2")

    def __init__(self, model_id: str = DEFAULT_VQA, config: VQAConfig | None = None) -> None:
        from transformers import AutoConfig, AutoProcessor

        self.config = config or VQAConfig()
        self.model_id = str(model_id)
        self.name = f"vqa:{self.model_id}" + (" (4-bit)" if self.config.load_in_4bit else "")
        self.needs_images = True
        self.device = resolve_device(self.config.device)
        kw = {"revision": self.config.revision} if self.config.revision else {}
        model_type = AutoConfig.from_pretrained(self.model_id, **kw).model_type
        if model_type not in self.SUPPORTED:
            raise ValueError(f"{self.model_id}: config.json model_type {model_type!r} is not a supported VQA "
                             f"answerer; use one of {self.SUPPORTED} (BLIP VQA or BLIP-2)")
        self.kind = model_type
        self.processor = AutoProcessor.from_pretrained(self.model_id, **kw)
        if model_type == "blip":
            from transformers import BlipForQuestionAnswering as cls
        else:
            from transformers import Blip2ForConditionalGeneration as cls
        self.model = _load_model(cls, self.model_id, self.device, self.config.dtype, self.config.load_in_4bit,
                                 self.config.compute_dtype, self.config.revision)
        self.batching = "padded"
        if model_type == "blip-2":
            self.decoder_only = not getattr(self.model.config.text_config, "is_encoder_decoder", False)
            if self.decoder_only:
                self.processor.tokenizer.padding_side = "left"
        else:
            hooked = _pass_blip_cross_attention_mask(self.model.text_decoder)
            self.batching = "masked" if hooked and self._padding_is_masked() else "length-buckets"
        self.stats = GenerationStats()

    def _blip_encode(self, pixel_values: Any, input_ids: Any, attention_mask: Any) -> Any:
        import torch

        image = self.model.vision_model(pixel_values=pixel_values)[0]
        image_mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        return self.model.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                       encoder_hidden_states=image, encoder_attention_mask=image_mask,
                                       return_dict=False)[0]

    def _padding_is_masked(self) -> bool:
        """Probe: do a question and the same question with 16 pad tokens give the same first-token logits?"""
        import torch
        from PIL import Image

        enc = self.processor(images=[Image.new("RGB", (64, 64), (120, 90, 60))], text=["what colour is it?"],
                             return_tensors="pt")
        ids, mask = enc["input_ids"].to(self.model.device), enc["attention_mask"].to(self.model.device)
        pad_id = self.processor.tokenizer.pad_token_id
        ids_p = torch.cat([ids, torch.full((1, 16), pad_id, dtype=ids.dtype, device=ids.device)], dim=1)
        mask_p = torch.cat([mask, torch.zeros((1, 16), dtype=mask.dtype, device=mask.device)], dim=1)
        pixels = enc["pixel_values"].to(self.model.device, self.model.dtype)
        bos = torch.full((1, 1), self.model.decoder_start_token_id, device=ids.device)
        with torch.inference_mode():
            logits = [self.model.text_decoder(input_ids=bos, encoder_hidden_states=self._blip_encode(pixels, i, m),
                                              encoder_attention_mask=m).logits.float()
                      for i, m in ((ids, mask), (ids_p, mask_p))]
        tol = 1e-3 if self.model.dtype == torch.float32 else 5e-2
        return bool((logits[0] - logits[1]).abs().max() <= tol * max(1.0, float(logits[0].abs().max())))

    def _blip_generate(self, enc: dict[str, Any], gen: dict[str, Any]) -> Any:
        import torch

        question = self._blip_encode(enc["pixel_values"], enc["input_ids"], enc["attention_mask"])
        bos = torch.full((question.shape[0], 1), self.model.decoder_start_token_id, device=question.device)
        text_cfg = self.model.config.text_config
        return self.model.text_decoder.generate(input_ids=bos, eos_token_id=text_cfg.sep_token_id,
                                                pad_token_id=text_cfg.pad_token_id, encoder_hidden_states=question,
                                                encoder_attention_mask=enc["attention_mask"], **gen)

    def blip2_prompt(self, question: str, history: Sequence[Turn]) -> str:
        """ChatCaptioner's BLIP-2 prompt: instruction, the last ``context_rounds`` answered rounds, the question."""
        n = self.config.context_rounds
        answered = [t for t in history if t.question and t.answer and t.reason != "repeated question"]
        context = answered[-n:] if n > 0 else (answered if n < 0 else [])
        log = "".join(f"Question: {t.question}\nAnswer: {t.answer}\n" for t in context)
        return f"{self.config.answer_instruction}\n{log}Question: {question}\nAnswer:"

    def _generate(self, images: list[Any], texts: list[str]) -> list[str]:
        import torch

        cfg = self.config
        tok = self.processor.tokenizer
        kwargs: dict[str, Any] = {"return_tensors": "pt", "padding": True}
        if self.kind == "blip":
            kwargs.update(truncation=True, max_length=self.model.config.text_config.max_position_embeddings)
        enc = self.processor(images=images, text=texts, **kwargs)
        enc = {k: v.to(self.model.device) for k, v in enc.items()}
        if "pixel_values" in enc:
            enc["pixel_values"] = enc["pixel_values"].to(self.model.dtype)
        gen: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens, "do_sample": False}
        if cfg.min_new_tokens:
            gen["min_new_tokens"] = cfg.min_new_tokens
        started = time.perf_counter()
        with torch.inference_mode():
            out = self._blip_generate(enc, gen) if self.kind == "blip" else self.model.generate(**enc, **gen)
        if self.kind == "blip-2" and self.decoder_only and out.shape[1] >= enc["input_ids"].shape[1] and \
                bool((out[:, :enc["input_ids"].shape[1]] == enc["input_ids"]).all()):
            out = out[:, enc["input_ids"].shape[1]:]
        self.stats.add(GenerationStats(calls=1, sequences=len(texts),
                                       prompt_tokens=int(enc["attention_mask"].sum()),
                                       generated_tokens=int((out != tok.pad_token_id).sum()),
                                       seconds=time.perf_counter() - started))
        return [clean_answer(t) for t in self.processor.batch_decode(out, skip_special_tokens=True)]

    def answer(self, views: Sequence[ItemView], questions: Sequence[str],
               histories: Sequence[Sequence[Turn]]) -> list[str]:
        if any(v.image is None for v in views):
            raise ValueError("VQAAnswerer needs item images; build the views with load_views(with_images=True)")
        images = [v.image for v in views]
        if self.kind == "blip-2":
            texts = [self.blip2_prompt(q, h) for q, h in zip(questions, histories, strict=True)]
            return self._generate(images, texts)
        if self.batching == "masked":
            return self._generate(images, list(questions))
        # BLIP without a working padding mask: one call per distinct question length (see the class docstring)
        lengths = [len(self.processor.tokenizer(q)["input_ids"]) for q in questions]
        answers: list[str] = [""] * len(questions)
        for length in sorted(set(lengths)):
            idx = [i for i, n in enumerate(lengths) if n == length]
            answers_here = self._generate([images[i] for i in idx], [questions[i] for i in idx])
            for i, a in zip(idx, answers_here, strict=True):
                answers[i] = a
        return answers


def _pass_blip_cross_attention_mask(text_decoder: Any) -> bool:
    """Make BLIP's text decoder apply its cross-attention (question padding) mask; returns whether it hooked.

    ``BlipTextAttention`` calls ``BlipTextSelfAttention`` with ``attention_mask=<the cross mask>`` but the latter
    uses ``encoder_attention_mask`` for cross-attention, which arrives as None. The pre-hook copies one to the
    other for cross-attention calls only, and does nothing when the library already passes it.
    """

    def hook(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if kwargs.get("encoder_hidden_states") is not None and kwargs.get("encoder_attention_mask") is None \
                and kwargs.get("attention_mask") is not None:
            return args, {**kwargs, "encoder_attention_mask": kwargs["attention_mask"]}
        return None

    modules = [m for m in text_decoder.modules() if type(m).__name__ == "BlipTextSelfAttention"]
    for m in modules:
        m.register_forward_pre_hook(hook, with_kwargs=True)
    return bool(modules)


# ---------------------------------------------------------------------------------------------- captioners


@dataclass
class DialogueConfig:
    """The dialogue loop (ChatCaptioner defaults: 10 rounds, fixed first question)."""

    rounds: int = 10  # questions per item, the fixed first one included
    first_question: str = FIRST_QUESTION
    view: str = "crop"  # what the answerer sees: "crop" (GT box + margin) or "image" (the whole photo)
    crop_margin: float = 0.1  # context around the box, fraction of box width/height per side
    filter_answers: bool = True  # drop no / not sure / don't know / empty answers from the summary
    dedupe_questions: bool = True  # do not re-ask a question already asked in this dialogue


class TemplateCaptioner:
    """The original study's template captions as a captioner (no model)."""

    method = "template"
    name = "template"
    columns = ("key", "category_name", *_TEMPLATE_FIELDS)

    def caption_batch(self, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        return [{"key": str(r["key"]), "caption": template_caption(r), "method": self.method} for r in rows]

    def generation_stats(self) -> dict[str, GenerationStats]:
        return {}


class DialogueCaptioner:
    """ChatCaptioner-style dialogue captions in batched lockstep (see the module docstring)."""

    method = "dialogue"

    def __init__(self, questioner: Questioner, answerer: Answerer, config: DialogueConfig | None = None) -> None:
        self.questioner = questioner
        self.answerer = answerer
        self.config = config or DialogueConfig()
        if self.config.rounds < 1:
            raise ValueError(f"DialogueConfig.rounds must be ≥ 1, got {self.config.rounds}")
        self.name = f"{questioner.name} + {answerer.name}"

    @property
    def columns(self) -> tuple[str, ...]:
        base = ("key", "category_name", "viewpoint", "occlusion", "scale", "zoom_in")
        return base + (("path", "x1", "y1", "x2", "y2") if self.answerer.needs_images else ())

    def generation_stats(self) -> dict[str, GenerationStats]:
        out = {}
        for role, obj in (("llm", self.questioner), ("vqa", self.answerer)):
            stats = getattr(obj, "stats", None)
            if isinstance(stats, GenerationStats):
                out[role] = stats
        return out

    def dialogues(self, views: Sequence[ItemView]) -> tuple[list[list[Turn]], list[str]]:
        """Run the lockstep dialogue for a batch of item views; returns the turns and the captions."""
        cfg = self.config
        turns: list[list[Turn]] = [[] for _ in views]
        for rnd in range(cfg.rounds):
            if rnd == 0:
                questions = [clean_question(cfg.first_question)] * len(views)
            else:
                questions = [clean_question(q) for q in self.questioner.ask([list(t) for t in turns])]
            if len(questions) != len(views):
                raise RuntimeError(f"{self.questioner.name} returned {len(questions)} questions for {len(views)}")
            pending: list[int] = []
            for i, q in enumerate(questions):
                if not q:
                    turns[i].append(Turn(q, "", False, "empty question"))
                elif cfg.dedupe_questions and any(same_question(q, t.question) for t in turns[i]):
                    turns[i].append(Turn(q, "", False, "repeated question"))
                else:
                    pending.append(i)
            if pending:
                answers = self.answerer.answer([views[i] for i in pending], [questions[i] for i in pending],
                                               [list(turns[i]) for i in pending])
                if len(answers) != len(pending):
                    raise RuntimeError(f"{self.answerer.name} returned {len(answers)} answers for {len(pending)}")
                for i, a in zip(pending, answers, strict=True):
                    a = clean_answer(a)
                    reason = uninformative_reason(a) if cfg.filter_answers else None
                    turns[i].append(Turn(questions[i], a, reason is None, reason))
        kept = [[t for t in ts if t.kept] for ts in turns]
        todo = [i for i, k in enumerate(kept) if k]
        captions = [""] * len(views)
        if todo:
            for i, s in zip(todo, self.questioner.summarise([kept[i] for i in todo]), strict=True):
                captions[i] = clean_summary(s)
        return turns, captions

    def caption_batch(self, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        cfg = self.config
        views = load_views(rows, cfg.view, cfg.crop_margin, with_images=self.answerer.needs_images)
        turns, captions = self.dialogues(views)
        return [{
            "key": v.key, "caption": c, "method": self.method, "questioner": self.questioner.name,
            "answerer": self.answerer.name, "rounds": cfg.rounds, "view": cfg.view,
            "n_kept": sum(t.kept for t in ts), "dialogue": [t.to_dict() for t in ts],
        } for v, ts, c in zip(views, turns, captions, strict=True)]


# ------------------------------------------------------------------------------------------ caption store

CAPTIONS_FILE = "captions.jsonl"


@dataclass
class StoreReport:
    """What a read of ``captions.jsonl`` found: complete records, a torn last line, duplicate keys."""

    path: str
    records: int = 0
    torn_last_line: bool = False
    torn_bytes: int = 0
    duplicate_keys: list[str] = field(default_factory=list)


def _parse_store(path: Path, data: bytes) -> tuple[list[dict[str, Any]], StoreReport, int]:
    """Parse the bytes of a store; returns the records, a report and the byte length of the complete part."""
    report = StoreReport(str(path))
    end = data.rfind(b"\n") + 1  # bytes up to and including the last newline
    if end < len(data):
        report.torn_last_line, report.torn_bytes = True, len(data) - end
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    for lineno, raw in enumerate(data[:end].split(b"\n")[:-1], 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}:{lineno}: corrupt line in the middle of the caption store ({exc}); "
                             f"only the last line may be torn") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        for fname in ("key", "caption", "method"):
            if not isinstance(obj.get(fname), str):
                raise ValueError(f"{path}:{lineno}: field {fname!r} = {obj.get(fname)!r} is missing or not a string")
        if obj["key"] in seen:
            report.duplicate_keys.append(obj["key"])
        seen.add(obj["key"])
        records.append(obj)
    report.records = len(records)
    return records, report, end


class CaptionStore:
    """``captions.jsonl``: one JSON object per item (``key``, ``caption``, ``method``, + ``dialogue`` …).

    Writes: :meth:`append_batch` writes a whole batch with one ``os.write`` on an ``O_APPEND`` descriptor, then
    ``fsync`` — every line is complete and ends in a newline. The first append takes an exclusive ``flock`` (a
    second writer gets a clear error) and cuts a torn last line left by a killed run, so a resumed run never
    glues its first line onto a fragment. Reads (:meth:`read`, :meth:`records`, :meth:`done_keys`) tolerate a
    torn last line and report it with a warning and in :meth:`report`; a corrupt line anywhere else raises.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        self.path = path / CAPTIONS_FILE if path.is_dir() else path
        self._fd: int | None = None
        self._done: set[str] = set()
        self.last_report: StoreReport | None = None

    # reading --------------------------------------------------------------------------------------------
    def records(self, warn: bool = True) -> list[dict[str, Any]]:
        """All complete records in file order (a torn last line is skipped and reported)."""
        data = self.path.read_bytes() if self.path.is_file() else b""
        records, report, _ = _parse_store(self.path, data)
        self.last_report = report
        if warn and report.torn_last_line:
            warnings.warn(f"{self.path}: torn last line ({report.torn_bytes} bytes, a run was killed while "
                          f"writing) ignored; it is cut off on the next append", RuntimeWarning, stacklevel=2)
        if warn and report.duplicate_keys:
            warnings.warn(f"{self.path}: {len(report.duplicate_keys)} duplicate key(s), the last record wins: "
                          f"{report.duplicate_keys[:5]}", RuntimeWarning, stacklevel=2)
        return records

    def report(self) -> StoreReport:
        """Scan the file and say what is in it (records, torn last line, duplicates)."""
        self.records(warn=False)
        assert self.last_report is not None
        return self.last_report

    def read(self) -> pd.DataFrame:
        """The records as a DataFrame (one row per key, the last record wins); ``df.attrs["report"]`` holds the
        :class:`StoreReport` as a dict."""
        records = self.records()
        df = pd.DataFrame.from_records(records, columns=None if records else ["key", "caption", "method"])
        if len(df):
            df = df.drop_duplicates("key", keep="last").reset_index(drop=True)
        df.attrs["report"] = asdict(self.last_report) if self.last_report else {}
        return df

    def done_keys(self) -> set[str]:
        """Keys already captioned."""
        if self._fd is not None:
            return set(self._done)
        return {r["key"] for r in self.records()}

    def methods(self) -> set[str]:
        return {r["method"] for r in self.records(warn=False)}

    # writing --------------------------------------------------------------------------------------------
    def repair(self) -> int:
        """Cut a torn last line; returns the number of bytes removed (0 when the file was clean)."""
        fd = self._fd
        own = fd is None
        if own:
            if not self.path.exists():
                return 0
            fd = os.open(self.path, os.O_RDWR)
        try:
            data = _read_all(fd)
            _, report, end = _parse_store(self.path, data)
            if report.torn_last_line:
                os.ftruncate(fd, end)
                os.fsync(fd)
                warnings.warn(f"{self.path}: cut a torn last line ({report.torn_bytes} bytes) left by an "
                              f"interrupted run", RuntimeWarning, stacklevel=2)
            return report.torn_bytes
        finally:
            if own:
                os.close(fd)

    def open(self) -> "CaptionStore":
        """Open for appending: lock, repair a torn tail, load the finished keys."""
        if self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RuntimeError(f"{self.path} is being written by another process; wait for it or use "
                                   f"another run_dir") from None
        self._fd = fd
        try:
            self.repair()
            records, report, _ = _parse_store(self.path, _read_all(fd))
            self._done = {r["key"] for r in records}
            if created:
                _fsync_dir(self.path.parent)
        except BaseException:
            self.close()
            raise
        return self

    def append_batch(self, records: Sequence[Mapping[str, Any]]) -> int:
        """Append complete records (one write + fsync for the whole batch); returns the number written.

        Every record needs string ``key``, ``caption`` and ``method``; a key already in the store (or twice in
        the batch) raises ``ValueError`` — the runner only passes keys that are not done.
        """
        if not records:
            return 0
        self.open()
        assert self._fd is not None
        lines, keys = [], set()
        for r in records:
            for fname in ("key", "caption", "method"):
                if not isinstance(r.get(fname), str):
                    raise ValueError(f"record for {r.get('key')!r}: field {fname!r} = {r.get(fname)!r} is not a string")
            if r["key"] in self._done or r["key"] in keys:
                raise ValueError(f"{self.path}: key {r['key']!r} is already in the caption store")
            keys.add(r["key"])
            lines.append(json.dumps(dict(r), ensure_ascii=False, separators=(",", ":")) + "\n")
        view = memoryview("".join(lines).encode("utf-8"))
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        os.fsync(self._fd)
        self._done |= keys
        return len(lines)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            if fcntl is not None:
                with contextlib.suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> "CaptionStore":
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.close()


def _read_all(fd: int) -> bytes:
    chunks = []
    offset = 0
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_captions(path: str | os.PathLike, method: str | None = None) -> dict[str, str]:
    """``{key: caption}`` from a ``captions.jsonl`` (or a run folder holding one).

    A torn last line is skipped with a warning; with duplicate keys the last record wins (warned). ``method``
    keeps only records of that method (``"template"`` / ``"dialogue"``). A missing file raises
    ``FileNotFoundError`` naming it.
    """
    store = CaptionStore(path)
    if not store.path.is_file():
        raise FileNotFoundError(f"caption store {store.path} does not exist (run notebooks/02_captions.ipynb)")
    out: dict[str, str] = {}
    for r in store.records():
        if method is None or r["method"] == method:
            out[r["key"]] = r["caption"]
    return out


# --------------------------------------------------------------------------------------------------- runner


@dataclass
class RunStats:
    """What one :func:`run_captioning` call did and how fast (throughput over the newly captioned items)."""

    method: str
    captioner: str
    items: int = 0  # items asked for
    skipped: int = 0  # already in the store
    new: int = 0  # captioned by this call
    batches: int = 0
    seconds: float = 0.0
    llm: GenerationStats = field(default_factory=GenerationStats)
    vqa: GenerationStats = field(default_factory=GenerationStats)

    @property
    def items_per_s(self) -> float:
        return self.new / self.seconds if self.seconds > 0 else 0.0

    @property
    def llm_tokens_per_s(self) -> float:
        return self.llm.generated_tokens / self.llm.seconds if self.llm.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(items_per_s=self.items_per_s, llm_tokens_per_s=self.llm_tokens_per_s)
        return d


def _batches(seq: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(seq), size):
        yield seq[start:start + size]


def run_captioning(items: pd.DataFrame, store: CaptionStore | str | os.PathLike, captioner: Any,
                   batch_size: int = 16, progress: bool = True, desc: str | None = None) -> RunStats:
    """Caption every item of ``items`` not yet in ``store``, batch by batch, appending each finished batch.

    Resumable: keys already in the store are skipped, so a killed run loses at most the batch in flight. A store
    holding captions of another method raises ``ValueError`` (use another run folder). A tqdm bar shows items/s
    and LLM tokens/s.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    _require_columns(items, captioner.columns, f"{captioner.method} captions")
    if items["key"].duplicated().any():
        dup = items.loc[items["key"].duplicated(), "key"].iloc[0]
        raise ValueError(f"items table has duplicate keys, e.g. {dup!r}")
    store = store if isinstance(store, CaptionStore) else CaptionStore(store)
    other = store.methods() - {captioner.method} if store.path.is_file() else set()
    if other:
        raise ValueError(f"{store.path} holds {sorted(other)} captions; this run writes {captioner.method!r} "
                         f"captions — use another run_dir or file")
    stats = RunStats(method=captioner.method, captioner=captioner.name, items=len(items))
    before = {k: v.copy() for k, v in captioner.generation_stats().items()}
    with store:
        done = store.done_keys()
        rows = [r for r in items.to_dict("records") if r["key"] not in done]
        stats.skipped = len(items) - len(rows)
        started = time.perf_counter()
        bar = tqdm(total=len(items), initial=stats.skipped, disable=not progress, unit="item",
                   desc=desc or f"{captioner.method} captions", smoothing=0.1)
        try:
            for batch in _batches(rows, batch_size):
                records = captioner.caption_batch(batch)
                store.append_batch(records)
                stats.new += len(records)
                stats.batches += 1
                stats.seconds = time.perf_counter() - started
                bar.update(len(records))
                llm = captioner.generation_stats().get("llm")
                postfix = {"items/s": f"{stats.new / max(stats.seconds, 1e-9):.2f}"}
                if llm is not None and llm.seconds > 0:
                    d = llm.minus(before.get("llm", GenerationStats()))
                    postfix["LLM tok/s"] = f"{d.generated_tokens / max(d.seconds, 1e-9):.0f}"
                bar.set_postfix(postfix)
        finally:
            bar.close()
    stats.seconds = time.perf_counter() - started
    after = captioner.generation_stats()
    for role in ("llm", "vqa"):
        if role in after:
            setattr(stats, role, after[role].minus(before.get(role, GenerationStats())))
    return stats


# ------------------------------------------------------------------------------------ notebook-level setup

SPLITS = ("train", "validation")


def resolve_splits(root: str | os.PathLike, split: str | Sequence[str] = "all") -> list[str]:
    """``"all"`` → every split folder present (train, validation); else a name, a comma list, or a list."""
    root = Path(root)
    if isinstance(split, str):
        names = list(SPLITS) if split.strip() in ("", "all") else [s.strip() for s in split.split(",") if s.strip()]
        if split.strip() in ("", "all"):
            names = [s for s in names if (root / s).is_dir()]
    else:
        names = list(split)
    if not names:
        raise FileNotFoundError(f"no split folder under {root} (expected train/ and/or validation/)")
    for s in names:
        if not (root / s).is_dir():
            raise FileNotFoundError(f"split folder {root / s} does not exist (split={s!r})")
    return names


def load_split_items(root: str | os.PathLike, split: str | Sequence[str] = "all") -> pd.DataFrame:
    """The items tables of the requested splits (``capret_utils.df2.load_items``), concatenated."""
    from capret_utils import df2, paths

    frames = [df2.load_items(paths.split_dir(root, s)) for s in resolve_splits(root, split)]
    skipped = [s for f in frames for s in f.attrs.get("skipped", [])]
    items = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    items.attrs["skipped"] = skipped
    return items


def select_items(items: pd.DataFrame, max_items: int = 0, seed: int = 0) -> pd.DataFrame:
    """All items (``max_items`` 0) or a seeded random subset of ``max_items``, kept in table order."""
    if max_items < 0:
        raise ValueError(f"max_items must be ≥ 0, got {max_items}")
    if not max_items or max_items >= len(items):
        return items
    picked = items.sample(n=max_items, random_state=seed).index
    return items.loc[sorted(picked)].reset_index(drop=True)


@dataclass
class CaptionSetup:
    """Notebook 02's captioner parameters, resolved into a captioner by :func:`build_captioner`.

    ``llm`` / ``vqa``: a model id or local folder; empty = the offline :class:`ScriptedQuestioner` /
    :class:`AttributeAnswerer`; ``"tiny"`` = the random tiny Phi-3 / BLIP from :func:`build_tiny_models`
    (``"tiny-blip2"`` for BLIP-2). In smoke mode an empty ``llm`` / ``vqa`` means ``"tiny"`` and the dialogue is
    shortened (≤ 3 rounds, 8 question, 24 summary and 6 answer tokens) so CI exercises the HF code path quickly.
    """

    captioner: str = "template"  # template | dialogue
    llm: str = ""
    vqa: str = ""
    load_in_4bit: bool = False
    rounds: int = 10
    view: str = "crop"
    device: str = "auto"
    question_tokens: int = 30
    summary_tokens: int = 100
    answer_tokens: int = 20
    smoke: bool = False

    def effective(self) -> "CaptionSetup":
        """The setup actually run (smoke defaults applied)."""
        if self.captioner not in ("template", "dialogue"):
            raise ValueError(f"captioner must be 'template' or 'dialogue', got {self.captioner!r}")
        if not self.smoke or self.captioner != "dialogue":
            return self
        return replace(self, llm=self.llm or "tiny", vqa=self.vqa or "tiny", rounds=min(self.rounds, 3),
                       question_tokens=min(self.question_tokens, 8), summary_tokens=min(self.summary_tokens, 24),
                       answer_tokens=min(self.answer_tokens, 6))


def build_captioner(setup: CaptionSetup, attributes: Mapping[str, Mapping[str, Any]] | None = None,
                    model_dir: str | os.PathLike | None = None) -> TemplateCaptioner | DialogueCaptioner:
    """The captioner a :class:`CaptionSetup` describes (``model_dir``: where ``"tiny"`` models are built).

    With a ``"tiny"`` model on CPU this sets ``torch.set_num_threads(1)`` for the process (the notebook kernel):
    at hidden size 64 intra-op threads are pure overhead and, on a busy machine, ~10x slower.
    """
    setup = setup.effective()
    if setup.captioner == "template":
        return TemplateCaptioner()
    tiny_llm = {"tiny": "phi3"}
    tiny_vqa = {"tiny": "blip", "tiny-blip": "blip", "tiny-blip2": "blip2"}
    tiny: dict[str, Path] = {}
    if setup.llm in tiny_llm or setup.vqa in tiny_vqa:
        if model_dir is None:
            raise ValueError("model_dir is needed to build the 'tiny' models")
        tiny = build_tiny_models(model_dir)
        if resolve_device(setup.device) == "cpu":
            import torch

            torch.set_num_threads(1)  # hidden size 64: intra-op threads only add overhead (10x on a busy CPU)
    if setup.llm:
        llm_path = str(tiny[tiny_llm[setup.llm]]) if setup.llm in tiny_llm else setup.llm
        questioner: Questioner = ChatLLMQuestioner(llm_path, LLMConfig(
            device=setup.device, load_in_4bit=setup.load_in_4bit, max_new_tokens=setup.question_tokens,
            summary_max_new_tokens=setup.summary_tokens,
            min_new_tokens=4 if setup.llm == "tiny" else 0))  # random weights often emit eos at once
    else:
        questioner = ScriptedQuestioner()
    if setup.vqa:
        vqa_path = str(tiny[tiny_vqa[setup.vqa]]) if setup.vqa in tiny_vqa else setup.vqa
        answerer: Answerer = VQAAnswerer(vqa_path, VQAConfig(
            device=setup.device, max_new_tokens=setup.answer_tokens,
            min_new_tokens=1 if setup.vqa in tiny_vqa else 0))
    else:
        if not attributes:
            warnings.warn("no attributes.jsonl found: the attribute answerer knows only the items-table fields "
                          "(category, viewpoint, occlusion, scale, zoom) and says \"I don't know\" to colour "
                          "and pattern", RuntimeWarning, stacklevel=2)
        answerer = AttributeAnswerer(attributes)
    return DialogueCaptioner(questioner, answerer, DialogueConfig(rounds=setup.rounds, view=setup.view))


# ----------------------------------------------------------------------------------------- reporting helpers


def caption_lengths(records: pd.DataFrame) -> pd.DataFrame:
    """Per caption: key, method, words and characters."""
    return pd.DataFrame({
        "key": records["key"], "method": records["method"],
        "words": records["caption"].str.split().str.len().fillna(0).astype(int),
        "chars": records["caption"].str.len().astype(int),
    })


def caption_metrics(records: pd.DataFrame, stats: RunStats | None = None) -> dict[str, Any]:
    """Counts, caption lengths, answer-filter rates and throughput for ``metrics.json``."""
    out: dict[str, Any] = {"captions": int(len(records))}
    if len(records):
        lengths = caption_lengths(records)
        out["words"] = {"mean": float(lengths["words"].mean()), "median": float(lengths["words"].median()),
                        "p90": float(lengths["words"].quantile(0.9)), "max": int(lengths["words"].max())}
        out["chars_mean"] = float(lengths["chars"].mean())
        out["empty_captions"] = int((lengths["words"] == 0).sum())
        out["by_method"] = {m: int(n) for m, n in records["method"].value_counts().items()}
    if "dialogue" in records.columns and len(records):
        turns = [t for d in records["dialogue"] if isinstance(d, list) for t in d]
        reasons = pd.Series([t.get("reason") or "kept" for t in turns]).value_counts()
        out["dialogue"] = {
            "turns": len(turns), "kept_fraction": float(reasons.get("kept", 0) / max(len(turns), 1)),
            "filtered": {k: int(v) for k, v in reasons.items() if k != "kept"},
            "kept_per_item_mean": float(records["n_kept"].mean()) if "n_kept" in records else None,
        }
    if stats is not None:
        out["run"] = stats.to_dict()
    return out


def format_dialogue(record: Mapping[str, Any]) -> str:
    """A dialogue record as readable text (questions, answers, ✗ for filtered ones, the caption)."""
    lines = [f"{record['key']}  [{record.get('questioner', '')} + {record.get('answerer', '')}]"]
    for t in record.get("dialogue") or []:
        mark = "  " if t.get("kept") else "✗ "
        why = f"   ({t['reason']})" if t.get("reason") else ""
        lines.append(f"  {mark}Q: {t.get('question')}\n     A: {t.get('answer')}{why}")
    lines.append(f"  → {record['caption']}")
    return "\n".join(lines)


def side_by_side(items: pd.DataFrame, records: pd.DataFrame, n: int = 8, seed: int = 0) -> pd.DataFrame:
    """Template vs stored captions for the same ``n`` items (seeded pick)."""
    have = records.set_index("key")["caption"]
    rows = items[items["key"].isin(have.index)]
    if len(rows) > n:
        rows = rows.sample(n=n, random_state=seed).sort_index()
    method = str(records["method"].iloc[0]) if len(records) else "stored"
    return pd.DataFrame({"key": rows["key"].to_list(),
                         "template": [template_caption(r) for r in rows.to_dict("records")],
                         f"stored ({method})": have.loc[rows["key"]].to_list()})


# ------------------------------------------------------------------------------------------ tiny test models

_TINY_SEED = 0
_TINY_MARKER = "tiny_models.json"
_PHI3_SPECIALS = ["<unk>", "<s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
_PHI3_CHAT_TEMPLATE = (  # mirrors Phi-3-mini-4k-instruct's current template (bos comes from the tokenizer)
    "{% for message in messages %}"
    "{% if message['role'] in ['system', 'user', 'assistant'] %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


_CATEGORY_NAMES = ("short sleeve top", "long sleeve top", "short sleeve outwear", "long sleeve outwear", "vest",
                   "sling", "shorts", "trousers", "skirt", "short sleeve dress", "long sleeve dress", "vest dress",
                   "sling dress")


def _tiny_corpus() -> list[str]:
    words = ["navy", "white", "black", "red", "blue", "green", "grey", "beige", "pink", "yellow", "brown",
             "solid", "horizontal stripes", "vertical stripes", "polka dots", "checks", "cotton", "denim"]
    texts = [QUESTION_INSTRUCTION, NEXT_QUESTION_INSTRUCTION, SUMMARY_INSTRUCTION, ANSWER_INSTRUCTION,
             FIRST_QUESTION, REPEATED_ANSWER, NO_ANSWER, "Question: Answer: Summary:",
             *[q.text for q in DEFAULT_QUESTIONS], *_CATEGORY_NAMES, *words,
             *_SLEEVES_TEXT, *_VIEW_TEXT]
    return texts * 2


_SLEEVES_TEXT = [v for v in _SLEEVES.values() if v]
_VIEW_TEXT = [*[v for v in _VIEW.values() if v], *_WORN.values(), *_OCCLUSION.values(), *_SCALE.values(),
              *_ZOOM.values()]


def _tiny_bpe(specials: list[str], vocab_size: int) -> Any:
    """A deterministic SentencePiece-style (Metaspace) BPE trained offline on the module's own prompt text;
    printable-ASCII alphabet, so random models decode to readable gibberish."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = list(string.ascii_letters + string.digits + string.punctuation + "\n") + ["▁"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  limit_alphabet=len(alphabet), show_progress=False)
    tok.train_from_iterator(_tiny_corpus(), trainer)
    return tok


def tiny_phi3_tokenizer() -> Any:
    """A Phi-3-style tokenizer built offline: bos ``<s>``, eos/pad ``<|endoftext|>``, ``<|user|>`` /
    ``<|assistant|>`` / ``<|end|>`` specials and a chat template mirroring Phi-3's; left padding."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _tiny_bpe(_PHI3_SPECIALS, 900)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>",
                                   unk_token="<unk>", pad_token="<|endoftext|>", chat_template=_PHI3_CHAT_TEMPLATE,
                                   padding_side="left", model_max_length=4096)


PHI3_MINI_CONFIG: dict[str, Any] = dict(
    vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, max_position_embeddings=4096, original_max_position_embeddings=4096,
    rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=2047, hidden_act="silu", tie_word_embeddings=False,
)
"""Phi-3-mini-4k-instruct's architecture (config.json): 3.82 B parameters, no GQA."""


def phi3_config(preset: str, tokenizer: Any) -> Any:
    """A ``Phi3Config``: ``"tiny"`` (hidden 64, 2 layers; ~0.2 M params) or ``"phi3-mini"`` (the real
    architecture, random weights), with the tokenizer's bos/pad and end tokens."""
    from transformers import Phi3Config

    ends = [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|end|>")]
    common = dict(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id, eos_token_id=ends)
    if preset == "tiny":
        return Phi3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                          original_max_position_embeddings=4096, initializer_range=0.2, **common)
    if preset == "phi3-mini":
        cfg = dict(PHI3_MINI_CONFIG)
        cfg["vocab_size"] = max(cfg["vocab_size"], len(tokenizer))
        return Phi3Config(**cfg, **common)
    raise ValueError(f"unknown Phi-3 preset {preset!r}; use 'tiny' or 'phi3-mini'")


def _tiny_blip(out: Path) -> None:
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForQuestionAnswering, BlipImageProcessor, BlipProcessor

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = sorted({w for text in _tiny_corpus() for w in re.findall(r"[a-z]+|[^\sa-z]", text.lower())})
    vocab = {w: i for i, w in enumerate(dict.fromkeys([*specials, *words, "[DEC]", "[ENC]"]))}
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]")
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    init = 0.5  # large enough that answers depend on the image and the question
    config = BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                         bos_token_id=vocab["[DEC]"], pad_token_id=vocab["[PAD]"], sep_token_id=vocab["[SEP]"],
                         eos_token_id=vocab["[SEP]"], initializer_range=init),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, initializer_range=init),
        initializer_range=init)
    with torch.random.fork_rng():
        torch.manual_seed(_TINY_SEED)
        model = BlipForQuestionAnswering(config)
    model.save_pretrained(out)
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(out)


def _tiny_blip2(out: Path) -> None:
    import torch
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor,
                              PreTrainedTokenizerFast)

    tok = _tiny_bpe(["<pad>", "</s>", "<unk>", "<image>"], 600)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", padding_side="left")
    n_query, init = 4, 0.5
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, initializer_range=init),
        qformer_config=dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, encoder_hidden_size=32, initializer_range=init),
        text_config=dict(model_type="opt", vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64,
                         num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32,
                         max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, init_std=init),
        num_query_tokens=n_query, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        initializer_range=init)
    with torch.random.fork_rng():
        torch.manual_seed(_TINY_SEED)
        model = Blip2ForConditionalGeneration(config)
    model.save_pretrained(out)
    Blip2Processor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer,
                   num_query_tokens=n_query).save_pretrained(out)


def _tiny_phi3(out: Path) -> None:
    import torch
    from transformers import Phi3ForCausalLM

    tokenizer = tiny_phi3_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(_TINY_SEED)
        model = Phi3ForCausalLM(phi3_config("tiny", tokenizer))
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def build_tiny_models(out_dir: str | os.PathLike) -> dict[str, Path]:
    """Build (once) tiny random Phi-3, BLIP VQA and BLIP-2 (OPT) checkpoints with offline tokenizers under
    ``out_dir/{phi3,blip,blip2}`` via ``save_pretrained``; returns their folders. Deterministic (seed 0).

    Random weights produce gibberish — these exist to run the real loading, batching and generation code
    without a download (tests, smoke runs, the benchmark). Each model is written to a temporary folder and
    renamed into place, so an interrupted build is rebuilt next time.
    """
    import shutil
    import tempfile

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {}
    for name, builder in (("phi3", _tiny_phi3), ("blip", _tiny_blip), ("blip2", _tiny_blip2)):
        target = out_dir / name
        if not (target / _TINY_MARKER).is_file():
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out_dir))
            try:
                builder(tmp)
                (tmp / _TINY_MARKER).write_text(json.dumps({"model": name, "seed": _TINY_SEED}) + "\n")
                if target.exists():
                    shutil.rmtree(target)
                os.replace(tmp, target)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        result[name] = target
    return result
