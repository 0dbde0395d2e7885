"""The ChatCaptioner-style dialogue: prompts, turns, the questioner/answerer protocols, the offline scripted
questioner and attribute answerer, and the captioners that run rounds in lockstep over a batch of items."""

from __future__ import annotations

import json
import os
import re
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import (
    Any,
    Iterable,
    Mapping,
    Protocol,
    Sequence,
    runtime_checkable,
)

from capret_utils.captions.template import _TEMPLATE_FIELDS, template_caption
from capret_utils.captions.views import ItemView, load_views
from capret_utils.data.boxes import CROP_CONTEXT

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
    "Now describe the garment in one or two sentences of at most 30 words, using only what my answers told you. "
    "Leave out questions "
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


def describe_text(category: str | None, colour: str | None, pattern: str | None,
                  pattern_colour: str | None) -> str:
    """The answer to the first ("describe") question from its parts: ``"a navy skirt with white stripes"``.
    Missing parts (``None``, "no", "I don't know") are left out; a ``solid`` pattern is not mentioned."""
    def known(x: str | None) -> str | None:
        return x if x and _norm(x) not in ("no", _norm(NO_ANSWER)) else None

    colour, pattern, pc = known(colour), known(pattern), known(pattern_colour)
    text = _with_article(" ".join(w for w in (colour, known(category) or "garment") if w))
    if pattern and pattern != "solid":
        text += f" with {pc + ' ' if pc else ''}{pattern}"
    return text


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
        return describe_text(row.get("category_name"), attrs.get("colour"), attrs.get("pattern"),
                             attrs.get("pattern_colour"))

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


# ---------------------------------------------------------------------------------------------- captioners


@dataclass
class DialogueConfig:
    """The dialogue loop (ChatCaptioner defaults: 10 rounds, fixed first question)."""

    rounds: int = 10  # questions per item, the fixed first one included
    first_question: str = FIRST_QUESTION
    view: str = "crop"  # what the answerer sees: "crop" (GT box + margin) or "image" (the whole photo)
    crop_context: float = CROP_CONTEXT  # context around the box, fraction of box width/height per side
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

    def caption_batch(self, rows: Sequence[Mapping[str, Any]], views: Sequence[ItemView] | None = None,
                      ) -> list[dict[str, Any]]:
        """Caption a batch of rows; ``views`` = the rows' views loaded ahead (:func:`prefetch_views`), else here."""
        cfg = self.config
        if views is None:
            views = load_views(rows, cfg.view, cfg.crop_context, with_images=self.answerer.needs_images)
        turns, captions = self.dialogues(views)
        return [{
            "key": v.key, "caption": c, "method": self.method, "questioner": self.questioner.name,
            "answerer": self.answerer.name, "rounds": cfg.rounds, "view": cfg.view,
            "n_kept": sum(t.kept for t in ts), "dialogue": [t.to_dict() for t in ts],
        } for v, ts, c in zip(views, turns, captions, strict=True)]


