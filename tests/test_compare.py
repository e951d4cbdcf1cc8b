"""`miaotui compare` and `miaotui report`: several models, one protocol, one report; failures write nothing."""

import json
import re

import pytest

import miaotui
from miaotui.cli import main
from miaotui.errors import MiaotuiError
from miaotui.recipe import get_recipe
from miaotui.report import read_report, render_folder
from tests.test_cli import QUICK


def cli(capsys, *args):
    """The command in-process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def llama_w8(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "llama-w8"
    lm = miaotui.load(tiny_models["llama"])
    miaotui.apply_recipe(lm, get_recipe("w8"), progress=False)
    miaotui.save(lm, out)
    return out


def test_compare_causal_models(tiny_models, llama_w8, tmp_path):
    labelled = tmp_path / "s.jsonl"
    labelled.write_text('{"text": "good", "label": "yes"}\n{"text": "bad", "label": "no"}\n')
    out = tmp_path / "cmp"
    r = miaotui.compare(
        [tiny_models["llama"], llama_w8, tiny_models["llama"]],
        out,
        seqlen=32,
        stride=16,
        classify_path=labelled,
        batch_sizes=[1, 2],
        bench_options=dict(prompt_len=8, new_tokens=3, repeats=1),
        progress=False,
    )
    names = ["llama", "llama-w8", "llama-2"]
    assert list(r["models"]) == names and r["baseline"] == "llama"
    q = r["quality"]["models"]
    assert q["llama-2"]["kl_mean"] == 0 and q["llama-2"]["top1_agreement"] == 1  # the same model twice
    assert 0 < q["llama-w8"]["kl_mean"] < 0.05 and q["llama-w8"]["kl_p99"] >= q["llama-w8"]["kl_p50"]
    assert r["quality"]["protocol"]["stride"] == 16 and r["models"]["llama-w8"]["recipe"] == "w8"
    assert [p["batch_size"] for p in r["sweep"]["models"]["llama"]] == [1, 2]
    assert r["classification"]["models"]["llama"]["examples"] == 2
    plots = ["plot-quality_vs_speed.png", "plot-sizes.png", "plot-throughput_vs_batch.png"]
    assert sorted(p.name for p in out.iterdir()) == [*plots, "report.html", "report.json", "report.md"]
    assert all((out / p).read_bytes().startswith(b"\x89PNG") for p in plots)
    report = read_report(out)
    assert report["report_version"] == 2 and report["report_type"] == "compare"
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "llama-w8" in html
    md = (out / "report.md").read_text()
    assert "| llama-w8 |" in md and "KL p99" in md and "b=2" in md
    (out / "report.md").unlink()
    render_folder(out)
    assert (out / "report.md").read_text() == md


def test_compare_encoders_and_report_cli(tiny_models, tmp_path, capsys):
    sentences = tmp_path / "s.txt"
    sentences.write_text("\n".join(f"sentence number {i} about topic {i % 3}" for i in range(12)))
    out = tmp_path / "enc"
    args = ("compare", tiny_models["bert"], tiny_models["bert"], "--sentences", sentences, "--out", out, "--json")
    code, stdout, _ = cli(capsys, *args, *QUICK)
    r = json.loads(stdout)
    assert r["quality"]["models"]["bert-2"]["retrieval_agreement"] == 1.0 and r["kind"] == "encoder"
    assert "top-k neighbour overlap" in (out / "report.md").read_text()
    assert cli(capsys, "report", out)[1].startswith("re-rendered")


def test_v1_optimize_report_renders(tmp_path):
    v1 = {
        "report_version": 1,
        "model": "m",
        "kind": "causal-lm",
        "recipe": {"name": "w8"},
        "quality": {
            "text": "t",
            "tokens": 64,
            "seqlen": 32,
            "windows": 2,
            "perplexity": 10.5,
            "baseline_perplexity": 10.0,
            "perplexity_ratio": 1.05,
            "kl_mean": 0.01,
            "top1_agreement": 0.9,
        },
    }
    (tmp_path / "report.json").write_text(json.dumps(v1))
    render_folder(tmp_path)
    assert "| optimized | 10.500 | +5.000 %" in (tmp_path / "report.md").read_text()
    assert "data:image/png;base64," not in (tmp_path / "report.html").read_text()  # no speed: no scatter
    (tmp_path / "report.json").write_text(json.dumps({**v1, "report_version": 9}))
    with pytest.raises(MiaotuiError, match="report version 9; this miaotui reads versions 1 and 2"):
        read_report(tmp_path)
    with pytest.raises(MiaotuiError, match="has no report.json"):
        read_report(tmp_path / "nothing")


def test_compare_recipes_in_one_command(tiny_models, tmp_path, capsys):
    """compare MODEL --recipes ...: the baseline compressed in memory by each recipe, calibrated on a mix of files
    given by repeating --calib; the same numbers as a folder saved by optimize."""
    calib = [tmp_path / "a.txt", tmp_path / "b.txt"]
    calib[0].write_text("the quick brown fox jumps over the lazy dog. " * 40)
    calib[1].write_text("a stitch in time saves nine, said the tailor. " * 40)
    out, llama = tmp_path / "cmp", tiny_models["llama"]
    args = ("compare", llama, "--recipes", "w8,sparse50-wanda", "--calib", calib[0], "--calib", calib[1])
    code, stdout, _ = cli(
        capsys, *args, "--calib-samples", 2, "--calib-seqlen", 32, "--seqlen", 32, "--out", out, "--json", *QUICK
    )
    r = json.loads(stdout)
    assert code == 0 and list(r["models"]) == ["llama", "w8", "sparse50-wanda"]
    assert r["models"]["sparse50-wanda"]["recipe"] == "sparse50-wanda"
    assert r["models"]["w8"]["source"].endswith("+ recipe w8")
    q = r["quality"]["models"]
    assert 0 < q["w8"]["kl_mean"] < q["sparse50-wanda"]["kl_mean"]  # half the weights gone costs more than int8
    lm = miaotui.load(llama)
    miaotui.apply_recipe(lm, get_recipe("w8"), progress=False)
    saved = tmp_path / "w8"
    miaotui.save(lm, saved)
    r2 = miaotui.compare([llama, saved], tmp_path / "cmp2", seqlen=32, bench=False, progress=False)
    assert r2["quality"]["models"]["w8"]["kl_mean"] == pytest.approx(q["w8"]["kl_mean"], rel=1e-4)
    from miaotui.evaluate import read_texts

    text = read_texts(calib)  # the files joined by a blank line
    assert text == calib[0].read_text() + "\n\n" + calib[1].read_text()


def test_compare_failures_write_nothing(tiny_models, tmp_path, capsys):
    out, llama = tmp_path / "out", tiny_models["llama"]
    cases = [
        ((llama, tmp_path / "missing"), r"model 2 \(.*missing\) failed to load: no such folder"),
        ((llama, tiny_models["bert"]), r"cannot compare bert \(a encoder\) with the baseline llama"),
        ((llama, "--ppl", tmp_path / "none.txt"), "text file .*none.txt does not exist"),
        ((llama, "--seqlen", 64, "--stride", 65), r"stride must be between 1 and seqlen \(64\)"),
        ((llama, "--classify", tmp_path / "none.csv"), "labelled file .* does not exist"),
        ((llama, "--recipes", "w9"), "unknown recipe 'w9': not a built-in"),
        ((llama, "--recipes", "w8,w4-gptq"), "recipe w4-gptq calibrates on data: pass --calib TEXTFILE"),
        ((llama, "--recipes", "w4-gptq", "--calib", tmp_path / "none.txt"), "text file .*none.txt does not exist"),
    ]
    for args, message in cases:
        code, _, err = cli(capsys, "compare", *args, "--out", out, "--no-bench")
        assert code == 2 and re.search(message, err), err
    code, _, err = cli(capsys, "report", tmp_path)
    assert code == 2 and "has no report.json" in err
    assert not out.exists() and [f.name for f in tmp_path.iterdir()] == []


def test_eval_shows_kl_distribution_and_accuracy(tiny_models, llama_w8, tiny_classifier, tmp_path, capsys):
    code, out, _ = cli(capsys, "eval", llama_w8, "--baseline", tiny_models["llama"], "--seqlen", 32, "--json")
    r = json.loads(out)
    assert code == 0 and {"kl_mean", "kl_p50", "kl_p90", "kl_p99", "kl_max", "tokens", "stride"} <= set(r)
    labelled = tmp_path / "l.csv"
    labelled.write_text("text,label\nfine film,positive\nawful,negative\n")
    code, out, _ = cli(capsys, "eval", tiny_classifier, "--classify", labelled, "--baseline", tiny_classifier, "--json")
    r = json.loads(out)
    assert code == 0 and r["accuracy"] == r["baseline_accuracy"] and r["examples"] == 2
    labelled.write_text("text,label\nfine film,great\n")
    code, _, err = cli(capsys, "eval", tiny_classifier, "--classify", labelled)
    assert code == 2 and "label 'great' is not one of the model's classes" in err
    code, out, _ = cli(
        capsys,
        "eval",
        tiny_models["llama"],
        "--classify",
        labelled,
        "--labels",
        "great,awful",
        "--template",
        "Review: {text}. Verdict:",
        "--json",
    )
    assert code == 0 and json.loads(out)["labels"] == ["great", "awful"]


@pytest.mark.slow
def test_compare_reference_model_w8(ref_llama, wikitext, tmp_path):
    """ref-llama-16m vs its w8 folder, WikiText-2 first 4,096 tokens, 512-token windows, fp32 compute."""
    lm = miaotui.load(ref_llama)
    miaotui.apply_recipe(lm, get_recipe("w8"), progress=False)
    miaotui.save(lm, tmp_path / "ref-w8")
    r = miaotui.compare(
        [ref_llama, tmp_path / "ref-w8"], tmp_path / "cmp", text_path=wikitext, seqlen=512, max_tokens=4096, bench=False
    )
    q = r["quality"]["models"]["ref-w8"]
    assert r["quality"]["protocol"]["tokens"] == 4096 and r["quality"]["models"]["ref-llama-16m"]["perplexity"] > 50
    assert q["perplexity_ratio"] < 1.003 and q["kl_mean"] < 1e-3 and q["top1_agreement"] > 0.98
    assert q["kl_p50"] <= q["kl_p99"] <= q["kl_max"] < 0.1
