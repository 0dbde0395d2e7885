"""evaluation.caption_sources: notebook 04's oracle dialogue rows next to the pixel ones (labels, bad input) and
the demo chain's two runs of notebook 02."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def oracle_file(smoke_root, tmp_path_factory):
    from capret_utils.captions import (
        CaptionSetup,
        CaptionStore,
        build_captioner,
        load_attributes,
        load_split_items,
        run_captioning,
    )

    items = load_split_items(smoke_root, "test")
    cap = build_captioner(CaptionSetup(captioner="dialogue", rounds=4), load_attributes(smoke_root / "test"))
    path = tmp_path_factory.mktemp("oracle") / "captions.jsonl"
    run_captioning(items, CaptionStore(path), cap, batch_size=64, progress=False)
    return items, path


def test_oracle_dialogue_variants_are_labelled_oracle(oracle_file):
    from capret_utils.evaluation import analysis, caption_sources

    items, path = oracle_file
    data = analysis.RetrievalData.build(items)
    chosen = analysis.select_variants("all")
    added = caption_sources.add_oracle_dialogue(data, str(path), chosen)
    assert [v.name for v in added] == ["crop+oracle-dialogue-late", "crop+oracle-dialogue-cross"]
    assert all(v.text == caption_sources.ORACLE_TEXT for v in added)
    assert [analysis.text_source(v, data.sources) for v in added] == ["oracle", "oracle"]
    q = data.queries["key"].iloc[0]
    assert data.text_of(data.queries.head(1), caption_sources.ORACLE_TEXT) == [data.texts["oracle-dialogue"][q]]
    assert caption_sources.add_oracle_dialogue(data, "", chosen) == []
    assert caption_sources.oracle_variants(analysis.select_variants("crop,crop+itm")) == []


def test_oracle_dialogue_bad_input(oracle_file, tmp_path):
    from capret_utils.evaluation import analysis, caption_sources

    items, path = oracle_file
    data = analysis.RetrievalData.build(items)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    pixel = tmp_path / "pixel.jsonl"
    pixel.write_text("".join(json.dumps({**r, "answerer": "x2vlm-vqa:x2vlm-demo"}) + "\n" for r in records))
    with pytest.raises(ValueError, match="answered by a model"):
        caption_sources.add_oracle_dialogue(data, str(pixel), analysis.select_variants("all"))
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps(r) + "\n" for r in records[1:]))
    with pytest.raises(KeyError, match="have no caption"):
        caption_sources.add_oracle_dialogue(data, str(short), analysis.select_variants("all"))


def test_demo_runs_pixel_and_oracle_dialogues(tmp_path):
    from capret_utils.runs import demo

    steps = {s.name: s for s in demo.STEPS}
    pixel, oracle = steps["02_captions"].params(tmp_path), steps["02_captions_oracle"].params(tmp_path)
    assert pixel["vqa"] == "x2vlm-demo" and oracle.get("vqa") == "ground-truth"  # explicit: smoke turns "" into tiny
    assert pixel["vqa_init"] == str(tmp_path / "03_finetune" / "checkpoint")  # 02 pixel runs after 03
    names = [s.name for s in demo.STEPS]
    assert names.index("02_captions_oracle") < names.index("03_finetune") < names.index("02_captions")
    assert steps["02_captions_oracle"].notebook == steps["02_captions"].notebook
    retrieval = steps["04_retrieval"].params(tmp_path)
    assert retrieval["captions_path"].startswith(str(tmp_path / "02_captions" / ""))
    assert retrieval["oracle_captions_path"].startswith(str(tmp_path / "02_captions_oracle" / ""))
    assert steps["03_finetune"].params(tmp_path)["captions_path"] == retrieval["oracle_captions_path"]
