"""The lm-evaluation-harness adapter on local task definitions and data files (no downloads)."""

import json

import pytest

import miaotui
from miaotui.recipe import get_recipe

lm_eval = pytest.importorskip("lm_eval")  # installed by the dev extra; the eval extra for users

ROWS = [
    {"question": "The sky is", "choices": [" blue", " green"], "answer": 0, "text": "The sky is blue today."},
    {"question": "Two plus two is", "choices": [" four", " seven"], "answer": 0, "text": "Two plus two is four."},
    {"question": "Cats say", "choices": [" woof", " meow"], "answer": 1, "text": "Cats say meow, dogs woof."},
    {"question": "Fire is", "choices": [" cold", " hot"], "answer": 1, "text": "Fire is hot and bright."},
]
TASKS = {
    "tiny_choice": 'output_type: multiple_choice\ntarget_delimiter: ""\ndoc_to_text: "{{question}}"\n'
    'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n',
    "tiny_rolling": 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
    "metric_list:\n  - metric: word_perplexity\n",
    "tiny_gen": 'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{choices[answer]}}"\n'
    'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 4\nmetric_list:\n  - metric: exact_match\n',
}


@pytest.fixture
def task_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    folder = tmp_path / "tasks"
    folder.mkdir()
    for name, body in TASKS.items():
        head = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        (folder / f"{name}.yaml").write_text(head + body)
    return folder


def _reference(folder):
    """acc and word perplexity of the local tasks computed by hand with a plain forward pass."""
    import math

    import torch

    lm = miaotui.load(folder, dtype="float32")

    def logprob(ids, start):  # sum of log P(ids[i] | ids[:i]) for i >= start
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)  # (T, V)
        return sum(logp[i - 1, ids[i]].item() for i in range(start, len(ids)))

    enc = lambda s: lm.tokenizer(s, add_special_tokens=False)["input_ids"]
    correct = 0
    for r in ROWS:
        scores = [logprob(enc(r["question"] + c), len(enc(r["question"]))) for c in r["choices"]]
        correct += scores.index(max(scores)) == r["answer"]
    eos = lm.tokenizer.eos_token_id
    ll = sum(logprob([eos, *enc(r["text"])], 1) for r in ROWS)
    words = sum(len(r["text"].split()) for r in ROWS)
    return correct / len(ROWS), math.exp(-ll / words)


def test_adapter_scores_local_tasks_as_computed_by_hand(task_dir, tiny_models):
    from miaotui.evaluate.lm_eval_adapter import evaluate_tasks

    folder = tiny_models["llama"]
    ours = evaluate_tasks(str(folder), list(TASKS), include_path=task_dir, dtype="float32")["results"]
    acc, word_ppl = _reference(folder)
    assert ours["tiny_choice"]["acc,none"] == acc
    assert ours["tiny_rolling"]["word_perplexity,none"] == pytest.approx(word_ppl, rel=1e-4)
    assert 0 <= ours["tiny_gen"]["exact_match,none"] <= 1


def test_optimized_folder_and_cli(task_dir, tiny_models, tmp_path):
    from miaotui.errors import MiaotuiError
    from miaotui.evaluate.lm_eval_adapter import MiaotuiLM, evaluate_tasks
    from tests.test_cli import run

    lm = miaotui.load(tiny_models["llama"], dtype="float32")
    miaotui.apply_recipe(lm, get_recipe("w8"), progress=False)
    miaotui.save(lm, tmp_path / "w8")
    p = run("lm-eval", tmp_path / "w8", "--tasks", "tiny_choice,tiny_rolling", "--include-path", task_dir, "--json")
    r = json.loads(p.stdout)["results"]
    assert 0 <= r["tiny_choice"]["acc,none"] <= 1 and r["tiny_rolling"]["word_perplexity,none"] > 1
    with pytest.raises(MiaotuiError, match=r"unknown lm-eval task\(s\) \['nope'\]"):
        evaluate_tasks(lm, ["nope"], include_path=task_dir, builtin_tasks=False)
    with pytest.raises(MiaotuiError, match="task folder .* does not exist"):
        evaluate_tasks(lm, ["tiny_choice"], include_path=tmp_path / "missing")
    with pytest.raises(MiaotuiError, match="lm-eval needs a causal LM"):
        MiaotuiLM(str(tiny_models["bert"]))


def test_generate_until_runs_on_the_engine_and_matches_hugging_face_greedy(tiny_models):
    """Ragged prompts, two rows at a time, one stop string taken from the reference output so it really cuts."""
    import torch
    from lm_eval.api.instance import Instance

    from miaotui.evaluate.lm_eval_adapter import MiaotuiLM

    adapter = MiaotuiLM(str(tiny_models["llama"]), dtype="float32", batch_size=2)
    lm, contexts = adapter.lm, ["The sky is", "Two plus two is four and", "Cats"]

    def hf_greedy(context, n):
        ids = torch.tensor([lm.tokenizer(context, add_special_tokens=False)["input_ids"]])  # (1, T)
        out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
        return lm.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    full = [hf_greedy(c, 12) for c in contexts]
    stop = full[1][len(full[1]) // 2 :][:3]
    assert stop.strip(), full[1]
    kwargs = {"until": [stop], "max_gen_toks": 12}
    requests = [Instance("generate_until", {}, (c, kwargs), i) for i, c in enumerate(contexts)]
    ours = adapter.generate_until(requests)
    assert ours == [t.split(stop)[0] for t in full]
    assert len(ours[1]) < len(full[1])  # the stop string cut the second completion
