"""capret_utils.runs.seeds: collecting every data seed's test results and their mean ± sd."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from capret_utils.runs import seeds


def _fake_run(out, seed, crop_top1, gallery_top1):
    run = out / f"data-seed{seed}"
    (run / "04_retrieval").mkdir(parents=True)
    (run / "03_finetune").mkdir()
    pd.DataFrame([{"name": "fine-tuned/crop", "text_source": "none", "top1": crop_top1, "mAP": crop_top1 + 0.01},
                  {"name": "fine-tuned/crop+dialogue-gallery", "text_source": "gallery-only", "top1": gallery_top1,
                   "mAP": gallery_top1, "delta_mAP": gallery_top1 - crop_top1 - 0.01,
                   "p_top1": 0.01 if gallery_top1 < crop_top1 else 0.5},
                  {"name": "fine-tuned/crop@detected", "text_source": "none", "top1": float("nan"), "mAP": float("nan"),
                   "official_top1": crop_top1 / 10, "official_top20": 0.3}]).to_csv(run / "04_retrieval" / "variants.csv", index=False)
    (run / "03_finetune" / "metrics.json").write_text(json.dumps(
        {"test": {"zero_shot": {"top1": 0.05, "mAP": 0.1}, "finetuned": {"top1": crop_top1, "mAP": 0.9}},
         "select": {"finetuned": {"top1": 1.0, "mAP": 1.0}}}))


def test_summary_is_mean_and_sample_sd_over_seeds(tmp_path):
    for seed, a, b in ((0, 0.8, 0.9), (1, 0.9, 0.9), (2, 1.0, 0.6)):
        _fake_run(tmp_path, seed, a, b)
    summary = seeds.write_summary(tmp_path).set_index("name")
    crop = summary.loc["fine-tuned/crop"]
    assert crop["n_seeds"] == 3 and crop["seeds"] == "0 1 2"
    assert crop["top1_mean"] == pytest.approx(0.9) and crop["top1_sd"] == pytest.approx(0.1)
    assert summary.loc["fine-tuned/crop+dialogue-gallery", "top1_mean"] == pytest.approx(0.8)
    assert summary.loc["fine-tuned/crop+dialogue-gallery", "text_source"] == "gallery-only"
    # t interval of the mean, by hand: 0.9 ± t(0.975, 2) · 0.1 / sqrt(3), t = 4.302653
    half = 4.302653 * 0.1 / 3 ** 0.5
    assert crop["top1_ci_lo"] == pytest.approx(0.9 - half, abs=1e-5)
    assert crop["top1_ci_hi"] == pytest.approx(0.9 + half, abs=1e-5)
    gallery = summary.loc["fine-tuned/crop+dialogue-gallery"]  # ΔmAP per seed: 0.09, -0.01, -0.41
    assert gallery["delta_mAP_mean"] == pytest.approx(-0.11) and gallery["seeds_p_below_0.05"] == 1
    detected = summary.loc["fine-tuned/crop@detected"]  # official-protocol rows carry official_top1 / top20 only
    assert detected["official_top1_mean"] == pytest.approx(0.09) and detected["official_top1_sd"] == pytest.approx(0.01)
    assert detected["official_top20_mean"] == pytest.approx(0.3)
    table = seeds.markdown_table(summary.reset_index())
    assert "| `fine-tuned/crop` | none | 3 | 0.900 ± 0.100 [0.652, 1.000] |" in table  # t-interval clipped to [0, 1]
    assert "| `fine-tuned/crop@detected` | none | 3 | official top-1 0.090 ± 0.010 |" in table
    assert "-0.110 ± 0.265 | 1 |" in table  # the gallery row: paired ΔmAP and the seeds with p < 0.05
    # notebook 03's test numbers, never its select numbers
    assert summary.loc["03 finetuned (test)", "mAP_mean"] == pytest.approx(0.9)
    assert (tmp_path / "seeds_summary.csv").is_file() and (tmp_path / "seeds_summary.json").is_file()
    assert not (tmp_path / "summary.csv").exists()  # notebook 04 would take it for a sweep summary


def test_empty_folder_gives_an_empty_summary(tmp_path):
    assert seeds.write_summary(tmp_path).empty
