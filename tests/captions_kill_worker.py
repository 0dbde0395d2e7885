"""Subprocess for the kill/resume test: dialogue-captions a data root into a store, slowly, until killed.

Usage: python tests/captions_kill_worker.py DATA_ROOT STORE BATCH_SIZE DELAY_S [RANK WORLD_SIZE]
Uses the offline pair (ScriptedQuestioner + AttributeAnswerer) — deterministic — with ``DELAY_S`` of sleep per
answer call so a SIGKILL lands while a batch is in flight. With ``RANK WORLD_SIZE`` it is one rank of a sharded run
(its share of the items into ``<store stem>.rank<RANK>.jsonl``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from capret_utils import captions as C


class SlowAttributeAnswerer(C.AttributeAnswerer):
    """The ground-truth answerer, slowed down (stands in for a slow VQA model)."""

    def __init__(self, attributes, delay: float) -> None:
        super().__init__(attributes)
        self.delay = delay

    def answer(self, views, questions, histories=None):
        time.sleep(self.delay)
        return super().answer(views, questions, histories)


def main(argv: list[str]) -> int:
    root, store, batch_size, delay = Path(argv[0]), Path(argv[1]), int(argv[2]), float(argv[3])
    shard = (int(argv[4]), int(argv[5])) if len(argv) > 5 else None
    splits = C.resolve_splits(root, "all")
    items = C.load_split_items(root, splits)
    attrs = C.load_attributes([root / s for s in splits])
    captioner = C.DialogueCaptioner(C.ScriptedQuestioner(), SlowAttributeAnswerer(attrs, delay),
                                    C.DialogueConfig(rounds=10))
    print("started", flush=True)
    stats = C.run_captioning(items, store, captioner, batch_size=batch_size, progress=False, shard=shard)
    print(f"done new={stats.new} skipped={stats.skipped}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
