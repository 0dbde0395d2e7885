"""Running a captioner over the items table into the store, notebook 02's setup and its reporting helpers."""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import (
    Any,
    Iterator,
    Mapping,
    Sequence,
)

import pandas as pd

from capret_utils.captions.dialogue import (
    Answerer,
    AttributeAnswerer,
    DialogueCaptioner,
    DialogueConfig,
    GenerationStats,
    Questioner,
    ScriptedQuestioner,
    TemplateCaptioner,
)
from capret_utils.captions.llm import ChatLLMQuestioner, LLMConfig
from capret_utils.captions.pixel import (
    OFFICIAL_SUFFIXES,
    PIXEL_VQA,
    PixelAnswerer,
    PixelVQAConfig,
    load_official_answerer,
    load_or_train,
)
from capret_utils.captions.store import (
    CaptionStore,
    merged_records,
    shard_path,
    store_shards,
)
from capret_utils.captions.template import _require_columns, template_caption
from capret_utils.captions.tiny import build_tiny_models
from capret_utils.captions.vqa import VQAAnswerer, VQAConfig
from capret_utils.common import resolve_device
from capret_utils.data.df2 import SPLITS

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
                   batch_size: int = 16, progress: bool = True, desc: str | None = None,
                   num_workers: int = 0, shard: tuple[int, int] | None = None) -> RunStats:
    """Caption every item of ``items`` not yet in ``store``, batch by batch, appending each finished batch.

    ``shard=(rank, world_size)`` (several processes or GPUs, e.g. ``RANK`` / ``WORLD_SIZE`` under torchrun): this
    process captions rows ``rank, rank + W, …`` of ``items`` (the same table on every rank) into its own file
    ``captions.rank{rank}.jsonl`` (:func:`~capret_utils.captions.store.shard_path`); keys done in any shard are
    skipped, so a killed rank resumes (on any number of ranks) without losing or duplicating an item. Readers
    merge the shards (:func:`~capret_utils.captions.store.load_captions`).

    Resumable: keys already in the store are skipped, so a killed run loses at most the batch in flight. A store
    holding captions of another method raises ``ValueError`` (use another run folder). A tqdm bar shows items/s
    and LLM tokens/s. For a captioner whose answerer looks at images, ``num_workers`` processes (-1 auto, 0 = none)
    decode the next batches' views while the models answer the current one.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    _require_columns(items, captioner.columns, f"{captioner.method} captions")
    if items["key"].duplicated().any():
        dup = items.loc[items["key"].duplicated(), "key"].iloc[0]
        raise ValueError(f"items table has duplicate keys, e.g. {dup!r}")
    store = store if isinstance(store, CaptionStore) else CaptionStore(store)
    rank, world = shard or (0, 1)
    base = store.path
    if world > 1:
        store = CaptionStore(shard_path(base, rank, world))
        items = items.iloc[rank::world]
    shards = store_shards(base)
    other = {r["method"] for r in merged_records(base, warn=False)} - {captioner.method} if shards else set()
    if other:
        raise ValueError(f"{base} holds {sorted(other)} captions; this run writes {captioner.method!r} "
                         f"captions — use another run_dir or file")
    stats = RunStats(method=captioner.method, captioner=captioner.name, items=len(items))
    before = {k: v.copy() for k, v in captioner.generation_stats().items()}
    with store:
        done = store.done_keys() | {r["key"] for f in shards if f != store.path
                                    for r in CaptionStore(f).records(warn=False)}
        rows = [r for r in items.to_dict("records") if r["key"] not in done]
        stats.skipped = len(items) - len(rows)
        started = time.perf_counter()
        bar = tqdm(total=len(items), initial=stats.skipped, disable=not progress, unit="item",
                   desc=desc or f"{captioner.method} captions", smoothing=0.1)
        try:
            batches = list(_batches(rows, batch_size))
            answerer = getattr(captioner, "answerer", None)
            if num_workers and getattr(answerer, "needs_images", False) and hasattr(captioner, "config"):
                from capret_utils.captions.views import prefetch_views

                cfg = captioner.config
                views = prefetch_views(batches, cfg.view, cfg.crop_context, num_workers)
            else:
                views = iter([None] * len(batches))
            for batch, batch_views in zip(batches, views):
                records = (captioner.caption_batch(batch) if batch_views is None
                           else captioner.caption_batch(batch, batch_views))
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


def load_split_items(root: str | os.PathLike, split: str | Sequence[str] = "all", errors: str = "raise",
                     ) -> pd.DataFrame:
    """The items tables of the requested splits from the lean, cached index
    (:func:`capret_utils.data.index.load_index`; ``errors="skip"`` lists bad files in ``attrs["skipped"]``),
    concatenated."""
    from capret_utils.data.index import load_index

    frames = [load_index(Path(root) / s, errors) for s in resolve_splits(root, split)]
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


GROUND_TRUTH_VQA = "ground-truth"
"""``vqa`` value naming the ground-truth attribute answerer explicitly (empty ``vqa`` means it too, except in smoke
mode, where empty means the tiny random BLIP)."""


@dataclass
class CaptionSetup:
    """Notebook 02's captioner parameters, resolved into a captioner by :func:`build_captioner`.

    ``llm`` / ``vqa``: a model id or local folder; empty = the offline :class:`ScriptedQuestioner` /
    :class:`AttributeAnswerer`; ``"tiny"`` = the random tiny Phi-3 / BLIP from :func:`build_tiny_models`
    (``"tiny-blip2"`` for BLIP-2); ``"x2vlm-demo"`` = the pixel answerer (:mod:`capret_utils.captions.pixel`: the
    demo X2-VLM VQA model trained on the train split of ``data_root``, cached under ``model_dir``; its captions are
    labelled ``pixel``); a path ending in ``.th`` / ``.pth`` / ``.pt`` / ``.bin`` = an official X2-VLM VQA checkpoint
    (:func:`~capret_utils.captions.pixel.load_official_answerer`: answer list from ``answer_list.json`` next to it,
    else the DeepFashion2 vocabulary; also labelled ``pixel``); ``"ground-truth"`` = the :class:`AttributeAnswerer`
    explicitly (an oracle, also in smoke mode). In smoke mode an empty ``llm`` / ``vqa`` means ``"tiny"`` and the dialogue is
    shortened (≤ 3 rounds, 8 question, 24 summary and 6 answer tokens, ≤ 3 pixel-answerer training steps) so CI
    exercises the HF code path quickly.
    """

    captioner: str = "template"  # template | dialogue
    llm: str = ""
    vqa: str = ""
    load_in_4bit: bool = False
    rounds: int = 10
    view: str = "crop"
    device: str = "auto"
    question_tokens: int = 30
    summary_tokens: int = 40  # the summary's budget: X2-VLM's text side keeps 30 words / 40 tokens
    answer_tokens: int = 20
    smoke: bool = False
    allow_oracle: bool = False  # with an empty vqa on data without attributes.jsonl: answer from the annotations
    vqa_steps: int = 0  # vqa="x2vlm-demo": training steps of the pixel answerer; 0 = PixelVQAConfig's default
    data_root: str = ""  # vqa="x2vlm-demo": data root whose train split it learns from; empty = $CAPRET_DATA / synthetic
    vqa_cache: str = ""  # vqa="x2vlm-demo": folder caching the trained answerer (by config + train split); empty = model_dir
    vqa_init: str = ""  # vqa="x2vlm-demo": notebook-03 checkpoint folder the answerer starts from; empty = random init

    def effective(self) -> "CaptionSetup":
        """The setup actually run (smoke defaults applied)."""
        if self.captioner not in ("template", "dialogue"):
            raise ValueError(f"captioner must be 'template' or 'dialogue', got {self.captioner!r}")
        if not self.smoke or self.captioner != "dialogue":
            return self
        return replace(self, llm=self.llm or "tiny", vqa=self.vqa or "tiny", rounds=min(self.rounds, 3),
                       question_tokens=min(self.question_tokens, 8), summary_tokens=min(self.summary_tokens, 24),
                       answer_tokens=min(self.answer_tokens, 6), vqa_steps=min(self.vqa_steps or 3, 3))


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
        if resolve_device(setup.device).type == "cpu":
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
    if setup.vqa in PIXEL_VQA:
        answerer: Answerer = _pixel_answerer(setup, model_dir)
    elif setup.vqa.endswith(OFFICIAL_SUFFIXES):
        answerer = load_official_answerer(setup.vqa, device=str(resolve_device(setup.device)))
    elif setup.vqa and setup.vqa != GROUND_TRUTH_VQA:
        vqa_path = str(tiny[tiny_vqa[setup.vqa]]) if setup.vqa in tiny_vqa else setup.vqa
        answerer = VQAAnswerer(vqa_path, VQAConfig(
            device=setup.device, max_new_tokens=setup.answer_tokens,
            min_new_tokens=1 if setup.vqa in tiny_vqa else 0))
    else:
        if not attributes and not setup.allow_oracle:
            raise ValueError("vqa is empty, so the answerer would read the ground-truth annotations (an oracle: "
                             "the query photo does not give them), and this data root has no attributes.jsonl "
                             "(real DeepFashion2). Set vqa to a VQA model (e.g. Salesforce/blip-vqa-base), or "
                             "allow_oracle=True to build oracle captions on purpose (notebook 04 labels them "
                             "'oracle', an upper bound)")
        if not attributes:
            warnings.warn("no attributes.jsonl found: the attribute answerer knows only the items-table fields "
                          "(category, viewpoint, occlusion, scale, zoom) and says \"I don't know\" to colour "
                          "and pattern", RuntimeWarning, stacklevel=2)
        answerer = AttributeAnswerer(attributes)
    return DialogueCaptioner(questioner, answerer, DialogueConfig(rounds=setup.rounds, view=setup.view))


def _pixel_answerer(setup: CaptionSetup, model_dir: str | os.PathLike | None) -> PixelAnswerer:
    """The pixel answerer of ``setup.vqa`` (trained on ``data_root``'s train split on a cache miss)."""
    return PixelAnswerer(pixel_answerer_folder(setup, model_dir), device=str(resolve_device(setup.device)),
                         name=f"x2vlm-vqa:{setup.vqa}")


def pixel_answerer_folder(setup: CaptionSetup, model_dir: str | os.PathLike | None) -> Path:
    """The cached folder of ``setup.vqa``'s pixel answerer, trained on ``data_root``'s train split on a cache miss
    (what several caption ranks load: :func:`capret_utils.captions.cli.launch` fills the cache first)."""
    from capret_utils.runs import paths

    model_dir = setup.vqa_cache or model_dir
    if model_dir is None:
        raise ValueError(f"model_dir (or vqa_cache) is needed to cache the {setup.vqa!r} answerer")
    defaults = PixelVQAConfig()
    config = PixelVQAConfig(preset=PIXEL_VQA[setup.vqa], steps=setup.vqa_steps or defaults.steps,
                            init=setup.vqa_init)
    return load_or_train(paths.data_root(setup.data_root or None, setup.smoke), model_dir, config)


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

