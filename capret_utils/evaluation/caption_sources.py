"""A second dialogue caption file in notebook 04: the oracle dialogue next to the pixel one.

Notebook 04's main ``captions_path`` feeds the ``dialogue`` variants (labelled ``pixel`` when a model that saw only
the photo answered, :func:`~capret_utils.captions.store.dialogue_source`). ``oracle_captions_path`` adds the same
query-side dialogue variants a second time with the ground-truth answerer's captions (the upper bound), as the
caption kind :data:`ORACLE_TEXT` (variants ``crop+oracle-dialogue-late`` / ``-cross``, ``text_source`` ``oracle``).
They run through :func:`~capret_utils.evaluation.analysis.run_all` with the others, so the variant table gives
them the same intervals and the same paired tests against the model's image-only ``crop`` on the same queries;
their embeddings are cached under their own names (the image views are shared).
"""

from __future__ import annotations

from typing import Sequence

from capret_utils.evaluation.analysis import RetrievalData, Variant

ORACLE_TEXT = "oracle-dialogue"
"""The caption kind (``RetrievalData.texts`` key and variant ``text``) of the oracle dialogue captions."""


def oracle_variants(chosen: Sequence[Variant]) -> list[Variant]:
    """The query-side dialogue variants of ``chosen`` (late / cross fusion; not gallery-only, not ITM) with the
    oracle captions: ``crop+dialogue-late`` -> ``crop+oracle-dialogue-late``."""
    return [Variant(v.name.replace("dialogue", ORACLE_TEXT), v.level, ORACLE_TEXT, v.fusion, text_side=v.text_side)
            for v in chosen if v.text == "dialogue" and v.text_side == "both" and not v.rerank]


def add_oracle_dialogue(data: RetrievalData, path: str, chosen: Sequence[Variant]) -> list[Variant]:
    """Add the oracle dialogue captions at ``path`` to ``data`` and return their variants (empty ``path``: none).

    The file must be ground-truth answered (its dialogue source ``oracle``) and caption every query and gallery
    item; otherwise ``ValueError`` / ``KeyError`` naming the file.
    """
    from capret_utils.captions import load_dialogue_captions

    if not str(path).strip():
        return []
    captions, source = load_dialogue_captions(path)
    if source != "oracle":
        raise ValueError(f"oracle_captions_path={path!r}: its dialogues were answered by a model (source {source!r}); "
                         f"pass notebook 02's captions.jsonl of the ground-truth answerer (vqa='')")
    keys = list(data.queries["key"]) + list(data.gallery["key"])
    missing = [k for k in keys if k not in captions]
    if missing:
        raise KeyError(f"oracle_captions_path={path!r}: {len(missing)} query/gallery item(s) have no caption, e.g. "
                       f"{missing[:3]}; caption this split with notebook 02")
    data.texts[ORACLE_TEXT] = dict(captions)
    data.sources[ORACLE_TEXT] = "oracle"
    return oracle_variants(chosen)
