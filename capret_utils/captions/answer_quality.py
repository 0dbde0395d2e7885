"""Answer quality: a model answerer's answers against the ground truth, per question topic.

:func:`answer_accuracy` asks an answerer (e.g. :class:`~capret_utils.captions.pixel.PixelAnswerer`) every
scripted question about every item of an evaluated split, and compares each answer with what the ground-truth
answerer (:class:`~capret_utils.captions.dialogue.AttributeAnswerer`, reading ``attributes.jsonl`` and the
items table) says. An answer counts as correct when it equals the truth up to case, punctuation and spacing.

Counted skips, never silent: items without ground-truth attributes (``skipped_no_attributes``) and questions whose
truth is "I don't know" (no ground truth for the topic, e.g. material: ``skipped_unknown_truth``). A truth the
answerer's closed answer list cannot produce (an answer never seen in training) is kept (it is a wrong answer)
and counted per topic in ``truth_outside_list``. :func:`evaluate_answerer` is notebook 02's entry point.
:class:`PriorAnswerer` is the class-prior baseline: it answers every question of a topic with the topic's most
frequent train answer, without looking at the image (what a model that ignores the pixels would score).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from capret_utils.captions.dialogue import NO_ANSWER, AttributeAnswerer, _norm, question_topic
from capret_utils.captions.views import load_views
from capret_utils.data.boxes import CROP_CONTEXT


@dataclass
class AnswerQuality:
    """Per-(item, question) answers (``table``) and the per-topic summary (``by_topic``)."""

    table: pd.DataFrame  # key, question, topic, truth, answer, correct, truth_in_list
    by_topic: pd.DataFrame  # topic -> n, correct, accuracy, truth_outside_list
    skipped: dict[str, int] = field(default_factory=dict)

    def accuracy(self) -> dict[str, float]:
        """``{topic: accuracy}`` for ``metrics.json``."""
        return {str(t): float(a) for t, a in self.by_topic["accuracy"].items()}

    def confusion(self, topic: str = "colour") -> pd.DataFrame:
        """Counts of (truth, answer) for one topic: rows = truth, columns = answer."""
        sub = self.table[self.table["topic"] == topic]
        return pd.crosstab(sub["truth"], sub["answer"]).rename_axis(index="truth", columns="answer")


class PriorAnswerer:
    """The class-prior baseline (the Answerer protocol): each question gets the most frequent answer of its topic
    among the train triples (:func:`~capret_utils.captions.pixel.vqa_triples`), ties broken alphabetically;
    a question of a topic never seen in training gets "I don't know."."""

    needs_images = False

    def __init__(self, triples: pd.DataFrame) -> None:
        missing = {"topic", "answer"} - set(triples.columns)
        if missing:
            raise ValueError(f"PriorAnswerer: train triples lack the columns {sorted(missing)}")
        counts = triples.groupby(["topic", "answer"]).size().reset_index(name="n")
        counts = counts.sort_values(["topic", "n", "answer"], ascending=[True, False, True])
        self.majority = {str(t): str(g["answer"].iloc[0]) for t, g in counts.groupby("topic")}
        self.name = "prior"

    def answer(self, views: Sequence[Any], questions: Sequence[str],
               histories: Sequence[Sequence[Any]] | None = None) -> list[str]:
        return [self.majority.get(question_topic(q) or "other", NO_ANSWER) for q in questions]


def answer_accuracy(answerer: Any, items: pd.DataFrame, attributes: Mapping[str, Mapping[str, Any]],
                    questions: Sequence[str] | None = None, view: str = "crop", context: float = CROP_CONTEXT,
                    batch_items: int = 64) -> AnswerQuality:
    """Ask ``answerer`` every question about every item of ``items`` and score the answers per topic.

    ``questions`` defaults to the scripted questioner's (:func:`~capret_utils.captions.pixel.dialogue_questions`).
    """
    from capret_utils.captions.pixel import dialogue_questions

    questions = list(questions or dialogue_questions())
    oracle = AttributeAnswerer(attributes)
    known = set(getattr(answerer, "answer_list", []) or [])
    composed = set(getattr(answerer, "composed_topics", ()) or ())  # answers built from other answers, not a list
    rows = items.to_dict("records")
    have = [r for r in rows if str(r["key"]) in attributes]
    skipped = {"skipped_no_attributes": len(rows) - len(have), "skipped_unknown_truth": 0}
    out = []
    for start in range(0, len(have), batch_items):
        batch = have[start:start + batch_items]
        views = load_views(batch, view, context, with_images=getattr(answerer, "needs_images", True))
        pairs = [(v, q, oracle.answer_one(v.row, q)) for v in views for q in questions]
        unknown = [p for p in pairs if _norm(p[2]) == _norm(NO_ANSWER)]
        skipped["skipped_unknown_truth"] += len(unknown)
        pairs = [p for p in pairs if _norm(p[2]) != _norm(NO_ANSWER)]
        if not pairs:
            continue
        answers = answerer.answer([p[0] for p in pairs], [p[1] for p in pairs], [[] for _ in pairs])
        for (v, q, truth), ans in zip(pairs, answers, strict=True):
            out.append({"key": v.key, "question": q, "topic": question_topic(q) or "other", "truth": truth,
                        "answer": ans, "correct": _norm(ans) == _norm(truth),
                        "truth_in_list": (truth in known) if known and question_topic(q) not in composed else True})
    table = pd.DataFrame(out, columns=["key", "question", "topic", "truth", "answer", "correct", "truth_in_list"])
    by_topic = table.groupby("topic").agg(n=("correct", "size"), correct=("correct", "sum"),
                                          accuracy=("correct", "mean"),
                                          truth_outside_list=("truth_in_list", lambda s: int((~s).sum())))
    by_topic["correct"] = by_topic["correct"].astype(int)
    return AnswerQuality(table, by_topic, skipped)


def evaluate_answerer(captioner: Any, root: Any, split: str = "test", sources: Sequence[str] = ("user",),
                      max_items: int = 0, seed: int = 0) -> AnswerQuality | None:
    """Notebook 02's answer-quality check: the captioner's answerer on ``split``'s items of ``sources`` (the
    query side: ``user``) against ``<split>/attributes.jsonl``. ``None`` (with the reason printed) when there is
    nothing to score: no split given, a template captioner, the ground-truth answerer itself, or no attributes.
    ``max_items`` > 0 scores a seeded random subset."""
    from capret_utils.captions.dialogue import load_attributes
    from capret_utils.captions.runner import load_split_items, select_items

    answerer = getattr(captioner, "answerer", None)
    reason = None
    if not split:
        reason = "answer_quality_split is empty"
    elif answerer is None:
        reason = "template captions have no answerer"
    elif isinstance(answerer, AttributeAnswerer):
        reason = "the answerer is the ground truth itself (oracle)"
    attributes = {} if reason else load_attributes(Path(root) / split)
    if not reason and not attributes:
        reason = f"{Path(root) / split / 'attributes.jsonl'} does not exist (real DeepFashion2 has no colour labels)"
    if reason:
        print(f"answer quality not measured: {reason}")
        return None
    items = load_split_items(root, split)
    items = items[items["source"].isin(list(sources))].reset_index(drop=True)
    return answer_accuracy(answerer, select_items(items, max_items, seed), attributes,
                           view=getattr(getattr(captioner, "config", None), "view", "crop"))
