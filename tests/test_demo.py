"""The demo chain's budgets (runs.demo): which parameters each step gets, without running notebooks."""

from __future__ import annotations

import pytest

from capret_utils.runs import demo, sweep


@pytest.fixture()
def calls(monkeypatch):
    seen: dict[str, dict] = {}

    def fake(notebook, run_dir, params, log_output=False):
        seen[run_dir.name] = dict(params)
        return {"status": "ok", "duration_s": 0.0}

    monkeypatch.setattr(sweep, "run_notebook", fake)
    return seen


def test_quick_budget_shortens_fine_tuning_and_the_answerer_only(tmp_path, calls):
    demo.run_pipeline(tmp_path / "full", log=lambda _: None)
    full = dict(calls)
    calls.clear()
    demo.run_pipeline(tmp_path / "quick", budget="quick", log=lambda _: None)
    assert list(calls) == [s.name for s in demo.STEPS]
    for name, params in calls.items():
        extra = demo.BUDGETS["quick"].get(name, {})
        expected = {k: (str(v).replace(str(tmp_path / "full"), str(tmp_path / "quick")) if isinstance(v, str) else v)
                    for k, v in full[name].items()}
        assert params == {**expected, **extra}, name
    assert "epochs" not in full["03_finetune"] and calls["03_finetune"]["epochs"] < 30
    assert 0 < calls["02_captions"]["vqa_steps"] < demo.PIXEL_VQA_STEPS == full["02_captions"]["vqa_steps"]


def test_smoke_ignores_the_budget_and_an_unknown_budget_is_an_error(tmp_path, calls):
    demo.run_pipeline(tmp_path, smoke=True, budget="quick", log=lambda _: None)
    assert "epochs" not in calls["03_finetune"] and calls["02_captions"]["vqa_steps"] == demo.PIXEL_VQA_STEPS
    with pytest.raises(ValueError, match="budget must be one of"):
        demo.run_pipeline(tmp_path, budget="tiny")
