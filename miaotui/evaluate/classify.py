"""Classification accuracy on a labelled file: encoder classifiers, and causal LMs by scoring label words.

The file is CSV with `text` and `label` columns, or JSONL with one {"text": ..., "label": ...} object a line.
An encoder with a sequence-classification head predicts the argmax of its logits; labels in the file are
the names in `config.id2label` or integer class ids. A causal LM predicts the label whose text has the
highest log-likelihood after the prompt `template.format(text=...)` (the label follows after one space).

>>> import tempfile, pathlib
>>> f = pathlib.Path(tempfile.mkdtemp()) / "reviews.jsonl"
>>> _ = f.write_text('{"text": "great film", "label": "positive"}\\n{"text": "dull", "label": "negative"}\\n')
>>> read_labelled(f)
[('great film', 'positive'), ('dull', 'negative')]
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import torch

from miaotui.arch import CAUSAL_LM
from miaotui.errors import MiaotuiError
from miaotui.evaluate.loglik import text_logprobs
from miaotui.loading import LoadedModel
from miaotui.progress import track

DEFAULT_TEMPLATE = "Text: {text}\nSentiment:"


def read_labelled(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(text, label) pairs from a .csv (columns text,label) or .jsonl file, with errors naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise MiaotuiError(f"labelled file {path} does not exist")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MiaotuiError(f"cannot read {path} as UTF-8 text: {e}") from e
    rows: list[tuple[str, str]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(raw.splitlines())
        missing = {"text", "label"} - set(reader.fieldnames or [])
        if reader.fieldnames and missing:
            raise MiaotuiError(f"{path}: missing column(s) {', '.join(sorted(missing))}; found {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            rows.append(_row(path, line, row.get("text"), row.get("label")))
    elif path.suffix.lower() in (".jsonl", ".json"):
        for line, text in enumerate(raw.splitlines(), start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise MiaotuiError(f"{path} line {line}: not JSON ({e.msg})") from e
            if not isinstance(obj, dict) or "text" not in obj or "label" not in obj:
                raise MiaotuiError(f'{path} line {line}: expected an object with "text" and "label"')
            rows.append(_row(path, line, obj["text"], obj["label"]))
    else:
        raise MiaotuiError(f"{path}: unknown file type {path.suffix!r}; use .csv (text,label) or .jsonl")
    if not rows:
        raise MiaotuiError(f"{path} has no examples")
    return rows


def _row(path: Path, line: int, text, label) -> tuple[str, str]:
    if not isinstance(text, str) or not text.strip():
        raise MiaotuiError(f"{path} line {line}: empty or missing text")
    if label is None or (isinstance(label, str) and not label.strip()) or isinstance(label, (dict, list)):
        raise MiaotuiError(f"{path} line {line}: empty or missing label")
    return text, str(label).strip()


def _encoder_targets(lm: LoadedModel, labels: list[str]) -> tuple[list[int], list[str]]:
    """Class ids of the file's labels (names from config.id2label, or integers) and the class names."""
    id2label = {int(k): str(v) for k, v in (getattr(lm.config, "id2label", None) or {}).items()}
    names = [id2label.get(i, str(i)) for i in range(lm.config.num_labels)]
    by_name = {n.lower(): i for i, n in enumerate(names)}
    ids = []
    for label in labels:
        if label.lower() in by_name:
            ids.append(by_name[label.lower()])
        elif label.lstrip("-").isdigit() and 0 <= int(label) < len(names):
            ids.append(int(label))
        else:
            raise MiaotuiError(f"label {label!r} is not one of the model's classes {names} (or ids 0-{len(names) - 1})")
    return ids, names


@torch.no_grad()
def _encoder_predict(lm: LoadedModel, texts: list[str], batch_size: int, progress: bool | None) -> list[int]:
    preds = []
    starts = range(0, len(texts), batch_size)
    for i in track(starts, "classifying", enabled=progress):
        enc = lm.tokenizer(
            texts[i : i + batch_size],
            padding=True,
            truncation=True,
            max_length=lm.context_length or 512,
            return_tensors="pt",
        ).to(lm.device)
        preds += lm.model(**enc).logits.argmax(-1).tolist()  # (B,)
    return preds


def classify(
    lm: LoadedModel,
    examples: list[tuple[str, str]],
    *,
    labels: list[str] | None = None,
    template: str = DEFAULT_TEMPLATE,
    batch_size: int = 8,
    progress: bool | None = None,
) -> dict:
    """Accuracy of `lm` on (text, label) examples; returns accuracy, counts, the labels and the predictions.

    labels: the candidate label words of a causal LM (default: the distinct labels of the file, sorted).
    """
    texts, gold = [t for t, _ in examples], [label for _, label in examples]
    if lm.kind == CAUSAL_LM:
        candidates = list(dict.fromkeys(labels)) if labels else sorted(set(gold))
        unknown = sorted(set(gold) - set(candidates))
        if unknown:
            raise MiaotuiError(f"labels {unknown} of the file are not among the candidate labels {candidates}")
        if len(candidates) < 2:
            raise MiaotuiError(f"classification needs at least two candidate labels, got {candidates}")
        if "{text}" not in template:
            raise MiaotuiError("the prompt template must contain {text}")
        prompts = [template.replace("{text}", t) for t in texts]
        pairs = [(p, " " + c) for p in prompts for c in candidates]
        scores = []
        for i in track(range(0, len(pairs), 64), "classifying", enabled=progress):
            scores += [lp for lp, _ in text_logprobs(lm, pairs[i : i + 64], batch_size)]
        k = len(candidates)
        pred = [candidates[max(range(k), key=lambda j: scores[n * k + j])] for n in range(len(texts))]
        names = candidates
    else:
        if not hasattr(lm.model, "classifier") and not hasattr(lm.model, "score"):
            raise MiaotuiError(
                f"{lm.source} has no classification head: classification needs a *ForSequenceClassification model"
            )
        gold_ids, names = _encoder_targets(lm, gold)
        gold = [names[i] for i in gold_ids]
        pred = [names[i] for i in _encoder_predict(lm, texts, batch_size, progress)]
    correct = sum(p == g for p, g in zip(pred, gold, strict=True))
    return {
        "accuracy": correct / len(gold),
        "correct": correct,
        "examples": len(gold),
        "labels": names,
        "predictions": pred,
    }
