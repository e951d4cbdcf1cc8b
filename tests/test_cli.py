"""The `miaotui` command as a user runs it: a real subprocess, real files."""

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import miaotui


def env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", MIAOTUI_NO_PROGRESS="1")


def run(*args, cwd=None, ok=True, stdin=None, max_data=None):
    """Run `miaotui ARGS...`; max_data: bytes of memory the process may allocate (RLIMIT_DATA)."""

    def limit():
        hard = resource.getrlimit(resource.RLIMIT_DATA)[1]
        resource.setrlimit(resource.RLIMIT_DATA, (max_data if hard < 0 else min(max_data, hard), hard))

    p = subprocess.run(
        [sys.executable, "-m", "miaotui.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env(),
        input=stdin,
        timeout=600,
        preexec_fn=limit if max_data else None,
    )
    if ok:
        assert p.returncode == 0, p.stderr
    return p


QUICK = ["--repeats", "1", "--new-tokens", "4", "--prompt-len", "16", "--seqlen-encoder", "16", "--encoder-batch", "2"]


@pytest.mark.slow
def test_optimize_reference_model_end_to_end(ref_llama, wikitext, tmp_path):
    out = tmp_path / "ref-w8"
    p = run(
        "optimize",
        ref_llama,
        "--recipe",
        "w8",
        "--out",
        out,
        "--ppl",
        wikitext,
        "--seqlen",
        "512",
        "--max-tokens",
        "4096",
        "--json",
        *QUICK,
    )
    report = json.loads(p.stdout)
    assert report["quality"]["perplexity_ratio"] < 1.003
    assert (
        report["speed"]["models"]["optimized"]["linear_bytes"] * 1.9
        < report["speed"]["models"]["original"]["linear_bytes"]
    )
    assert {"report.md", "report.json", "model.safetensors", "miaotui.json", "config.json"} <= {
        f.name for f in out.iterdir()
    }
    assert "## Quality" in (out / "report.md").read_text()
    saved = json.loads((out / "report.json").read_text())
    assert saved["report_version"] == 2 and saved["report_type"] == "optimize" and saved["recipe"]["name"] == "w8"
    assert saved["quality"]["kl_p50"] <= saved["quality"]["kl_p99"] and (out / "report.html").is_file()
    info = json.loads(run("info", out, "--json").stdout)
    assert info["recipe"] == "w8" and info["linear_layers"] == {"int8_weight_only": 42, "float_linear": 1}  # lm_head
    ev = json.loads(
        run(
            "eval", out, "--ppl", wikitext, "--seqlen", "512", "--max-tokens", "4096", "--baseline", ref_llama, "--json"
        ).stdout
    )
    assert ev["perplexity"] == pytest.approx(report["quality"]["perplexity"], rel=1e-6)
    assert ev["top1_agreement"] > 0.98
    bench = json.loads(run("bench", out, "--json", *QUICK).stdout)
    assert bench["models"][str(out)]["decode_tokens_per_s"] > 0


def test_optimize_default_model_and_recipe_file(tmp_path, tiny_models):
    out = tmp_path / "demo"
    p = run("optimize", "--out", out, *QUICK)
    assert "Cosine similarity" in p.stdout and (out / "report.json").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["name"] == "w8a8" and report["quality"]["cosine_mean"] > 0.99
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(miaotui.get_recipe("w8").to_yaml().replace("name: w8", "name: mine"))
    run("optimize", tiny_models["opt"], "--recipe", recipe, "--out", tmp_path / "opt", "--no-bench")
    assert json.loads((tmp_path / "opt" / "report.json").read_text())["recipe"]["name"] == "mine"


def test_recipes_and_help():
    assert "w8a8" in run("recipes").stdout
    assert "algorithm: rtn" in run("recipes", "--show", "w8").stdout
    assert "--recipe" in run("optimize", "--help").stdout


def _assert_clean_failure(p, message, tmp_path):
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("miaotui: error:"), p.stderr
    assert message in lines[0]
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".out.")]  # no temp folder left


@pytest.mark.parametrize(
    "case", ["missing", "no-weights", "corrupt", "recipe-name", "recipe-field", "arch", "empty-text", "seqlen"]
)
def test_bad_input_fails_cleanly(case, tmp_path, tiny_models, copy_folder):
    model = tiny_models["llama"]
    args, message = [], ""
    if case == "missing":
        model, message = tmp_path / "nope", "no such folder"
    elif case == "no-weights":
        model = copy_folder(tiny_models["llama"], "m")
        (model / "model.safetensors").unlink()
        message = "has no weights"
    elif case == "corrupt":
        model = copy_folder(tiny_models["llama"], "m")
        (model / "model.safetensors").write_bytes(b"\x00" * 64)
        message = "cannot load the weights"
    elif case == "recipe-name":
        args, message = ["--recipe", "w5"], "unknown recipe 'w5'"
    elif case == "recipe-field":
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"steps": [{"type": "quantize", "scheme": "w8", "group": 7}]}))
        args, message = ["--recipe", bad], "unknown field(s) group"
    elif case == "arch":
        model = copy_folder(tiny_models["llama"], "m")
        cfg = json.loads((model / "config.json").read_text())
        cfg["model_type"] = "nonesuch"
        (model / "config.json").write_text(json.dumps(cfg))
        message = "nonesuch"
    elif case == "empty-text":
        (tmp_path / "e.txt").write_text("")
        args, message = ["--ppl", tmp_path / "e.txt"], "is empty"
    elif case == "seqlen":
        args, message = ["--seqlen", "100000"], "larger than the model's context of 256"
    p = run("optimize", model, "--out", tmp_path / "out", *args, ok=False)
    _assert_clean_failure(p, message, tmp_path)


def test_calibrated_recipe_needs_data(tmp_path, tiny_models):
    p = run("optimize", tiny_models["llama"], "--recipe", "w4-gptq", "--out", tmp_path / "out", ok=False)
    _assert_clean_failure(p, "calibrates on data: pass --calib TEXTFILE", tmp_path)
    (tmp_path / "c.txt").write_text("too short")
    args = ["--recipe", "w4-gptq", "--calib", tmp_path / "c.txt", "--out", tmp_path / "out"]
    p = run("optimize", tiny_models["llama"], *args, "--calib-seqlen", "64", ok=False)
    _assert_clean_failure(p, "need more than calib-seqlen 64", tmp_path)
    p = run("optimize", tiny_models["llama"], *args, ok=False)
    _assert_clean_failure(p, "calib-seqlen 512 is larger than the model's context of 256", tmp_path)


def test_eval_and_bench_bad_input(tmp_path, tiny_models):
    p = run("eval", tiny_models["bert"], ok=False)
    assert p.returncode == 2 and "pass --baseline" in p.stderr
    p = run("bench", tiny_models["gpt2"], "--prompt-len", "300", ok=False)
    assert p.returncode == 2 and "exceed the model's context" in p.stderr
    p = run("optimize", tiny_models["gpt2"], "--out", tmp_path, ok=False)
    assert p.returncode == 2 and "already exists" in p.stderr


def test_generate_prints_the_engines_greedy_completion(ref_llama):
    lm = miaotui.load(ref_llama, dtype="float32")
    expected = miaotui.Engine(lm, max_len=64).generate("The history of", miaotui.SamplingParams(max_tokens=12))[0]
    p = run("generate", ref_llama, "The history of", "--max-tokens", "12", "--dtype", "float32", "--json")
    out = json.loads(p.stdout)
    assert out["token_ids"] == expected.token_ids and out["text"] == expected.text
    assert out["completion_tokens"] == 12 and out["finish_reason"] == "length"
    streamed = run("generate", ref_llama, "The history of", "--max-tokens", "12", "--dtype", "float32", "--stream")
    assert streamed.stdout.rstrip("\n") == expected.text
    seeded = ["generate", ref_llama, "-", "--temperature", "0.8", "--seed", "3", "--json"]
    sampled = [json.loads(run(*seeded, stdin="Rain").stdout) for _ in range(2)]
    assert sampled[0]["token_ids"] == sampled[1]["token_ids"]
    assert sampled[0]["prompt_tokens"] == len(lm.tokenizer("Rain")["input_ids"])
    for draft in ("ngram", str(ref_llama)):  # speculative: the same greedy tokens, streamed too
        spec = ["generate", ref_llama, "The history of", "--max-tokens", "12", "--dtype", "float32", "--draft", draft]
        out = json.loads(run(*spec, "--num-draft", "3", "--json").stdout)
        assert out["token_ids"] == expected.token_ids and out["speculative"]["proposed"] > 0
        assert run(*spec, "--stream").stdout.rstrip("\n") == expected.text
    assert out["speculative"]["acceptance_rate"] == 1.0  # the model drafting for itself


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-tokens", "100000"], "exceeds the model's context"),
        (["--max-tokens", "0"], "argument --max-tokens: expected a positive integer, got 0"),
        (["--temperature", "-1"], "argument --temperature: expected a finite number >= 0, got '-1'"),
        (["--temperature", "inf"], "argument --temperature: expected a finite number >= 0, got 'inf'"),
        (["--temperature", "nan"], "argument --temperature: expected a finite number >= 0, got 'nan'"),
        (["--top-p", "0"], "argument --top-p: expected a number > 0 and <= 1, got '0'"),
        (["--top-p", "1.5"], "argument --top-p: expected a number > 0 and <= 1, got '1.5'"),
        (["--top-k", "-1"], "argument --top-k: expected an integer >= 0, got -1"),
        (["--repetition-penalty", "1e999"], "argument --repetition-penalty: expected a finite number > 0"),
        (["--draft", "ngram", "--tp", "2"], "--draft runs in one process"),
    ],
)
def test_generate_bad_input(ref_llama, args, message):
    p = run("generate", ref_llama, "Hello", *args, ok=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert message in p.stderr and "Traceback" not in p.stderr


def test_recipe_with_yaml_aliases_is_refused_before_it_grows(tmp_path, tiny_models):
    """A "billion laughs" recipe: 9 levels of 10 aliases stand for 10^9 strings in a few lines."""
    lines = ["description:", "  - &l0 [" + ", ".join(["lol"] * 10) + "]"]
    lines += [f"  - &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 9)]
    recipe = tmp_path / "laughs.yaml"
    recipe.write_text("\n".join([*lines, "steps:", "  - {type: quantize, scheme: w8}", ""]))
    args = ["--recipe", recipe, "--out", tmp_path / "out", "--no-bench"]
    p = run("optimize", tiny_models["llama"], *args, ok=False, max_data=4 << 30)  # fails, not swaps, if it grows
    _assert_clean_failure(p, "laughs.yaml: recipe files may not use YAML anchors/aliases", tmp_path)
    assert p.returncode == 2


class _Marker:
    """Unpickled without the safe unpickler, this creates the file `path`: code a checkpoint must not run."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pickle_that_runs_code_is_refused_without_running_it(tmp_path, tiny_models):
    import pickletools
    import zipfile

    import torch

    folder = tmp_path / "evil"
    folder.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / f).write_bytes((tiny_models["llama"] / f).read_bytes())
    marker = tmp_path / "code-ran"
    torch.save({"model.embed_tokens.weight": _Marker(marker)}, folder / "pytorch_model.bin")
    with zipfile.ZipFile(folder / "pytorch_model.bin") as z:  # the payload is live: it calls open()
        (pkl,) = [n for n in z.namelist() if n.endswith("data.pkl")]
        calls = [arg for op, arg, _ in pickletools.genops(z.read(pkl)) if op.name == "GLOBAL"]
    assert calls == ["io open"]
    p = run("info", folder, "--allow-pickle", ok=False)
    assert p.returncode == 2 and not marker.exists()
    assert p.stderr.strip().splitlines() == [
        f"miaotui: error: {folder / 'pytorch_model.bin'} was refused by the safe unpickler (weights_only=True): "
        "it contains code or objects other than tensors; convert a checkpoint you trust to safetensors"
    ]


@pytest.mark.parametrize("entry", ["python -m miaotui", "console script"])
def test_ctrl_c_prints_one_line_and_exits_130(entry, ref_llama):
    """Interrupts land while torch and transformers import, while arguments parse, while the model loads."""
    if entry == "console script":
        script = Path(sys.executable).with_name("miaotui")
        if not script.exists():
            pytest.skip("the miaotui console script is not installed next to this Python")
        command = [str(script)]
    else:
        command = [sys.executable, "-m", "miaotui"]
    for delay in (0.2, 0.5, 1.0, 2.0):
        args = ["generate", str(ref_llama), "Once upon a time", "--max-tokens", "900"]
        p = subprocess.Popen([*command, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
        time.sleep(delay)
        assert p.poll() is None, f"the command ended within {delay} s: {p.communicate()}"
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
        assert p.returncode == 130, f"after {delay} s: {err}"
        assert "miaotui: interrupted" in err and "Traceback" not in err, f"after {delay} s: {err}"


def test_an_interrupt_behind_another_error_is_reported_as_the_interrupt(monkeypatch, capsys):
    """A Ctrl-C in the middle of an import can surface as another error: chained to the KeyboardInterrupt, or
    later, after a library swallowed it ("cannot load module more than once per process")."""
    from miaotui import cli

    def chained(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise RuntimeError("Failed to import transformers.models.llama") from e

    def swallowed(args):
        with contextlib.suppress(KeyboardInterrupt):  # as torch does when numpy's import is interrupted
            signal.raise_signal(signal.SIGINT)
        raise ImportError("cannot load module more than once per process")

    def broken(args):
        raise ImportError("numpy is broken")

    for command, status, line in [
        (chained, 130, "miaotui: interrupted"),
        (swallowed, 130, "miaotui: interrupted"),
        (broken, 1, "miaotui: internal error: ImportError: numpy is broken"),
    ]:
        monkeypatch.setattr(cli.compress, "cmd_recipes", command)
        assert cli.main(["recipes"]) == status
        assert capsys.readouterr().err.strip().startswith(line)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_while_torch_starts_is_held_until_it_has():
    from miaotui.cli.interrupt import InterruptWatch

    steps = []
    with InterruptWatch() as watch, pytest.raises(KeyboardInterrupt), watch.held():
        signal.raise_signal(signal.SIGINT)
        steps.append("the import went on")
    assert steps == ["the import went on"] and watch.seen
    with InterruptWatch() as watch, pytest.raises(KeyboardInterrupt), watch.held():
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)  # a second Ctrl-C does not wait
        steps.append("never")
    assert steps == ["the import went on"]
