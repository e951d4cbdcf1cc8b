"""The Python API as a user calls it."""

import json

import pytest
from families import CORE, ENCODER_TYPES

import miaotui
from miaotui.recipe import AUTO_RECIPE


def test_public_names_resolve():
    for name in miaotui.__all__:
        assert callable(getattr(miaotui, name)) or isinstance(getattr(miaotui, name), dict)
    assert callable(miaotui.optimize) and callable(miaotui.load)


@pytest.mark.parametrize("model_type", CORE)
def test_optimize_every_architecture(model_type, tiny_models, tmp_path):
    quick = {"prompt_len": 8, "new_tokens": 3, "repeats": 1, "warmup": 0, "seqlen": 16, "encoder_batch": 2}
    report = miaotui.optimize(tiny_models[model_type], out=tmp_path / "o", bench_options=quick, max_tokens=None)
    kind = "encoder" if model_type in ENCODER_TYPES else "causal-lm"
    assert report["recipe"]["name"] == AUTO_RECIPE[kind]
    if kind == "causal-lm":
        assert report["quality"]["perplexity_ratio"] < 1.05  # random tiny models: a loose bound
        assert report["speed"]["models"]["optimized"]["decode_tokens_per_s"] > 0
    else:
        assert report["quality"]["cosine_mean"] > 0.99
        assert report["speed"]["models"]["optimized"]["throughput_seq_per_s"] > 0
    assert json.loads((tmp_path / "o" / "report.json").read_text())["kind"] == kind
    assert miaotui.load(tmp_path / "o").recipe["name"] == AUTO_RECIPE[kind]
