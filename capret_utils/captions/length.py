"""How much of each caption the retrieval model sees: X2-VLM's text side keeps 30 words (``pre_caption``) and 40
tokens ([CLS] … [SEP]); :func:`truncation_report` counts the captions that are cut and by how much (notebook 02)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

MAX_WORDS = 30  # X2-VLM's pre_caption word limit (capret_utils.x2vlm.processing.TextSettings.max_words)
MAX_TOKENS = 40  # X2-VLM's text length in tokens, [CLS] and [SEP] included (TextSettings.max_tokens)


def truncation_report(captions: Sequence[str], count_tokens: Callable[[str], int] | None = None,
                      max_words: int = MAX_WORDS, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    """For every caption: words after X2-VLM's cleaning vs ``max_words``, and (with ``count_tokens``: text ->
    WordPiece count without [CLS]/[SEP]) tokens vs ``max_tokens - 2``. Returns the number and share of captions cut
    by each limit, the mean and max words / tokens dropped among the cut ones, and the length quantiles."""
    from capret_utils.x2vlm.processing import clean_or_empty

    texts = [str(c) for c in captions if str(c).strip()]
    words = np.array([len(clean_or_empty(t, 10**6).split()) for t in texts], dtype=np.int64)
    out: dict[str, Any] = {"captions": len(texts), "empty_after_cleaning": int((words == 0).sum()),
                           "max_words": max_words, "max_tokens": max_tokens}

    def cut(lengths: np.ndarray, limit: int, unit: str) -> None:
        over = lengths > limit
        dropped = lengths[over] - limit
        out[f"cut_by_{unit}"] = int(over.sum())
        out[f"cut_by_{unit}_share"] = round(float(over.mean()), 4) if len(lengths) else 0.0
        out[f"{unit}_dropped_mean"] = round(float(dropped.mean()), 2) if len(dropped) else 0.0
        out[f"{unit}_dropped_max"] = int(dropped.max()) if len(dropped) else 0
        out[f"{unit}_p50_p95_max"] = ([int(np.percentile(lengths, q)) for q in (50, 95)] + [int(lengths.max())]
                                      if len(lengths) else [0, 0, 0])

    cut(words, max_words, "words")
    if count_tokens is not None:
        tokens = np.array([count_tokens(clean_or_empty(t, max_words)) if w else 0 for t, w in zip(texts, words)],
                          dtype=np.int64)
        cut(tokens, max_tokens - 2, "tokens")
    return out


def wordpiece_counter(tokenizer: Any) -> Callable[[str], int]:
    """``text -> number of WordPiece tokens`` for an :class:`~capret_utils.x2vlm.X2VLMTokenizer` (or any tokenizer
    with ``.tokenizer.tokenize`` / ``.tokenize``)."""
    inner = getattr(tokenizer, "tokenizer", tokenizer)
    return lambda text: len(inner.tokenize(text))


def default_counter(texts: Sequence[str]) -> tuple[Callable[[str], int], str]:
    """``(token counter, its name)``: ``bert-base-uncased`` (the real checkpoints' tokenizer) when it loads from the
    local Hugging Face cache, else the offline WordPiece vocabulary the demo model builds (fashion corpus + texts)."""
    from huggingface_hub import try_to_load_from_cache

    from capret_utils.x2vlm import (
        COMPACT_SPECIAL_IDS,
        X2VLMConfig,
        X2VLMTokenizer,
        build_wordpiece_tokenizer,
        fashion_caption_corpus,
    )
    from capret_utils.x2vlm.processing import clean_or_empty

    cached = try_to_load_from_cache("bert-base-uncased", "vocab.txt")  # no network call
    if isinstance(cached, str):
        from pathlib import Path

        return wordpiece_counter(X2VLMTokenizer.from_pretrained(str(Path(cached).parent))), "bert-base-uncased"
    else:  # not in the local Hugging Face cache
        vocab = int(X2VLMConfig.preset("demo").vocab_size)
        usable = [str(t) for t in texts if clean_or_empty(str(t), MAX_WORDS)]
        tok = build_wordpiece_tokenizer(fashion_caption_corpus() + usable, vocab,
                                        special_ids=COMPACT_SPECIAL_IDS)
        return wordpiece_counter(tok), f"offline WordPiece ({vocab} entries, as the demo model)"

