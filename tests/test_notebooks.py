"""The four notebooks, chained as ``make demo`` chains them, in smoke mode through papermill (CPU, tiny data)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from capret_utils.runs import demo

pytestmark = [pytest.mark.notebook, pytest.mark.slow]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-smoke")
    results = demo.run_pipeline(out, smoke=True)
    return out, results


def test_every_notebook_runs_in_smoke_mode(smoke_run):
    out, results = smoke_run
    failed = {k: (v.get("error_type"), v.get("error")) for k, v in results.items() if v.get("status") != "ok"}
    assert not failed, failed
    assert list(results) == [s.name for s in demo.STEPS]
    for step in demo.STEPS:
        run_dir = out / step.name
        params = json.loads((run_dir / "params.json").read_text())
        assert params["params"]["smoke"] is True
        assert params["git_sha"] is None or len(params["git_sha"]) >= 40
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert "_meta" in metrics and "git_sha" in metrics["_meta"]
        assert (run_dir / "notebook.ipynb").is_file()


def test_chain_outputs(smoke_run):
    out, _ = smoke_run
    assert (out / "02_captions" / "captions.jsonl").is_file()
    assert (out / "02_captions_oracle" / "captions.jsonl").is_file()
    assert (out / "03_finetune" / "checkpoint").is_dir()
    finetune = json.loads((out / "03_finetune" / "metrics.json").read_text())
    for role in ("select", "test"):  # selected on one split, reported on the other
        for phase in ("zero_shot", "finetuned"):
            assert {"top1", "top5", "top10", "top20", "mAP"} <= set(finetune[role][phase]), (role, phase)
    assert finetune["splits"] == {"train": "train", "select": "validation", "test": "test"}
    variants = pd.read_csv(out / "04_retrieval" / demo.VARIANTS_FILE)
    assert len(variants) >= 2
    assert "mAP" in variants.columns
    assert {"none", "gallery-only", "pixel", "oracle"} <= set(variants["text_source"])  # pixel and oracle dialogue
    assert "fine-tuned/crop+oracle-dialogue-late" in set(variants["name"])
    text = demo.report(out)
    assert "Retrieval variants" in text
