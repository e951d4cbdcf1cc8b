"""Classification accuracy from labelled files: encoder classifiers and causal LMs scoring label words."""

import json

import pytest
import torch

import miaotui
from miaotui.errors import MiaotuiError
from miaotui.evaluate import classify, read_labelled
from miaotui.evaluate.loglik import text_logprobs

REVIEWS = [
    ("A wonderful, moving film.", "positive"),
    ("Dull and far too long.", "negative"),
    ("I loved every minute of it.", "positive"),
    ("The plot made no sense at all.", "negative"),
    ("Great acting and a clever story.", "positive"),
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in rows))
    return path


def test_read_labelled_formats_and_errors(tmp_path):
    csv = tmp_path / "r.csv"
    csv.write_text('text,label\n"Good, really",positive\nbad,negative\n')
    assert read_labelled(csv) == [("Good, really", "positive"), ("bad", "negative")]
    assert read_labelled(write_jsonl(tmp_path / "r.jsonl", REVIEWS)) == REVIEWS
    cases = {
        "missing.csv": (None, "does not exist"),
        "cols.csv": ("sentence,label\nhi,1\n", r"missing column\(s\) text"),
        "empty.csv": ("text,label\n", "has no examples"),
        "blank.jsonl": ("\n\n", "has no examples"),
        "bad.jsonl": ('{"text": "a", "label": 1}\n{oops\n', "line 2: not JSON"),
        "keys.jsonl": ('{"review": "a", "label": 1}\n', 'line 1: expected an object with "text" and "label"'),
        "nolabel.csv": ("text,label\nhello,\n", "line 2: empty or missing label"),
        "notext.jsonl": ('{"text": " ", "label": "x"}\n', "line 1: empty or missing text"),
        "r.txt": ("text,label\n", "unknown file type"),
    }
    for name, (content, message) in cases.items():
        if content is not None:
            (tmp_path / name).write_text(content)
        with pytest.raises(MiaotuiError, match=message):
            read_labelled(tmp_path / name)


def test_encoder_classifier_accuracy(tiny_classifier, tiny_models):
    lm = miaotui.load(tiny_classifier)
    with torch.no_grad():
        enc = lm.tokenizer([t for t, _ in REVIEWS], padding=True, return_tensors="pt")
        pred = lm.model(**enc).logits.argmax(-1).tolist()
    names = ["negative", "positive"]
    expected = sum(names[p] == g for p, (_, g) in zip(pred, REVIEWS, strict=True)) / len(REVIEWS)
    r = classify(lm, REVIEWS, batch_size=2)
    assert r["accuracy"] == pytest.approx(expected) and r["predictions"] == [names[p] for p in pred]
    ids = [(t, str(names.index(g))) for t, g in REVIEWS]  # integer labels name the same classes
    assert classify(lm, ids)["accuracy"] == r["accuracy"]
    with pytest.raises(MiaotuiError, match=r"label 'neutral' is not one of the model's classes \['negative'"):
        classify(lm, [*REVIEWS, ("meh", "neutral")])
    with pytest.raises(MiaotuiError, match="no classification head"):
        classify(miaotui.load(tiny_models["bert"]), REVIEWS)  # a plain encoder: embeddings, no classes


def test_causal_lm_scores_label_words(ref_llama):
    lm = miaotui.load(ref_llama, dtype="float32")
    template = "Review: {text}\nSentiment:"
    r = classify(lm, REVIEWS, template=template, batch_size=3)
    # by hand: the label with the larger log P(" label" | prompt)
    for (text, _), pred in zip(REVIEWS, r["predictions"], strict=True):
        prompt = template.replace("{text}", text)
        scores = {c: text_logprobs(lm, [(prompt, " " + c)])[0][0] for c in ("negative", "positive")}
        assert pred == max(scores, key=scores.get)
    assert r["labels"] == ["negative", "positive"] and r["examples"] == 5
    with pytest.raises(MiaotuiError, match=r"labels \['positive'\] of the file are not among"):
        classify(lm, REVIEWS, labels=["negative", "neutral"])
    with pytest.raises(MiaotuiError, match="must contain"):
        classify(lm, REVIEWS, template="no placeholder")


def test_continuation_logprob_matches_a_plain_forward(ref_llama):
    lm = miaotui.load(ref_llama, dtype="float32")
    ctx, cont = "The cat sat on the", " mat today"
    ids = lm.tokenizer(ctx + cont)["input_ids"]
    n_ctx = len(lm.tokenizer(ctx)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)  # (T, V)
    expected = sum(logp[i - 1, ids[i]].item() for i in range(n_ctx, len(ids)))
    (lp, greedy), (lp2, _) = text_logprobs(lm, [(ctx, cont), ("A longer context that pads the batch:", " x")])
    assert lp == pytest.approx(expected, abs=1e-4)
    assert greedy == all(logp[i - 1].argmax().item() == ids[i] for i in range(n_ctx, len(ids)))
