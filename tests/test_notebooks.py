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


def test_notebook_03_fine_tunes_a_peer_encoder(tmp_path):
    """``-p encoder tiny-clip``: the X2-VLM cells skip, the peer section trains, selects and tests; notebook 04's
    ``encoders`` parameter takes the fine-tuned folder (``tests/test_encoders.py`` checks that row)."""
    from capret_utils.common import repo_root
    from capret_utils.encoders import load_encoder
    from capret_utils.runs import sweep

    run = tmp_path / "03_peer"
    status = sweep.run_notebook(repo_root() / "notebooks" / "03_finetune.ipynb", run,
                                {"encoder": "tiny-clip", "smoke": True, "use_captions": "template"})
    assert status["status"] == "ok", (status.get("error_type"), status.get("error"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["encoder"] == "tiny-clip" and metrics["weights"] == "fine-tuned" and metrics["steps"] == 3
    for role in ("select", "test"):
        assert {"top1", "mAP", "top1_lo"} <= set(metrics[role]["finetuned"]) <= set(metrics[role]["zero_shot"])
    assert not (run / "train_state").exists()  # no X2-VLM cell ran
    assert load_encoder(metrics["checkpoint"]).weights == "fine-tuned"
