"""The Python API as a user calls it."""

import json

import miaotui


def test_public_names_resolve():
    for name in miaotui.__all__:
        assert callable(getattr(miaotui, name)) or isinstance(getattr(miaotui, name), dict)
    assert callable(miaotui.optimize) and callable(miaotui.load)


def test_optimize_from_python(tiny_models, tmp_path):
    report = miaotui.optimize(tiny_models["qwen3"], "w8", tmp_path / "q", bench=False, max_tokens=None)
    assert report["quality"]["perplexity_ratio"] < 1.05
    assert report["recipe"]["name"] == "w8"
    assert json.loads((tmp_path / "q" / "report.json").read_text())["kind"] == "causal-lm"
    assert miaotui.load(tmp_path / "q").recipe["name"] == "w8"
