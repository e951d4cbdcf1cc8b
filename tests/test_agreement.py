"""Perplexity and agreement against hand-computed values on tiny inputs; the streaming KL distribution."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from miaotui.arch import CAUSAL_LM, ArchInfo
from miaotui.evaluate import score_windows
from miaotui.evaluate.agreement import LogHistogram
from miaotui.loading import LoadedModel

V = 16


class FixedLM(nn.Module):
    """Next-token logits from a rule: the next token of a cycle (oracle) or one fixed distribution."""

    def __init__(self, logits: torch.Tensor | None = None):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.fixed = logits

    def forward(self, input_ids, **_):
        if self.fixed is None:
            logits = 50.0 * nn.functional.one_hot((input_ids + 1) % V, V).float()  # (B, S, V)
        else:
            logits = self.fixed.expand(*input_ids.shape, V).clone()  # (B, S, V)
        return SimpleNamespace(logits=logits + 0 * self.anchor)


def lm_of(module):
    return LoadedModel(model=module, tokenizer=None, arch=ArchInfo("llama", CAUSAL_LM, "model.layers"), source="fixed")


WINDOWS = (torch.arange(4 * 32) % V).view(4, 32)  # (W, S) a cycle the oracle predicts


def test_oracle_has_perplexity_one_and_identical_models_agree():
    oracle = lm_of(FixedLM())
    r = score_windows(oracle, WINDOWS, baseline=oracle)
    assert r["perplexity"] == pytest.approx(1.0, abs=1e-9)
    assert r["kl_mean"] == 0 and r["kl_p99"] == 0 and r["kl_max"] == 0 and r["top1_agreement"] == 1
    assert (r["windows"], r["tokens"], r["predicted_tokens"]) == (4, 128, 4 * 31)


def test_kl_of_fixed_distributions_matches_hand_computation():
    q = torch.tensor([0.4, 0.3, 0.2, 0.1] + [1e-9] * (V - 4))
    q = q / q.sum()
    uniform = lm_of(FixedLM(torch.zeros(V)))
    skewed = lm_of(FixedLM(q.log()))
    r = score_windows(skewed, WINDOWS, baseline=uniform, batch_size=3)
    expected = sum((1 / V) * math.log((1 / V) / qi) for qi in q.tolist())  # KL(uniform || q)
    assert r["kl_mean"] == pytest.approx(expected, rel=1e-5)
    assert r["kl_p50"] == pytest.approx(expected, rel=0.012) and r["kl_max"] == pytest.approx(expected, rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(-sum(math.log(q[t % V]) for t in range(1, 32)) / 31), rel=1e-5)
    assert r["baseline_perplexity"] == pytest.approx(V, rel=1e-6)
    assert r["top1_agreement"] == 1.0  # both pick token 0 (the uniform one by its first index)


def test_stride_scores_only_new_tokens():
    oracle = lm_of(FixedLM())
    ids = torch.arange(100) % V
    windows = ids.unfold(0, 32, 8)  # (W, 32), a window every 8 tokens
    r = score_windows(oracle, windows, stride=8, batch_size=2)
    assert r["predicted_tokens"] == 31 + (len(windows) - 1) * 8  # every token after the first, once
    assert r["tokens"] == (len(windows) - 1) * 8 + 32 and r["stride"] == 8
    uniform = lm_of(FixedLM(torch.zeros(V)))
    assert score_windows(uniform, windows, stride=8)["perplexity"] == pytest.approx(V)


def test_histogram_quantiles_and_bounded_memory():
    torch.manual_seed(0)
    values = torch.exp(torch.randn(200_000) * 3 - 6)  # log-normal, like per-token KL
    h = LogHistogram()
    for chunk in values.split(7_777):
        h.add(chunk)
    assert h.counts.numel() == 1601 and h.count == 200_000
    for q in (0.5, 0.9, 0.99):
        assert h.quantile(q) == pytest.approx(torch.quantile(values.double(), q).item(), rel=0.025)
    assert h.max == pytest.approx(values.max().item()) and h.quantile(1.0) == pytest.approx(h.max, rel=0.025)
    assert h.total == pytest.approx(values.double().sum().item(), rel=1e-9)
    h.add(torch.tensor([0.0, -1e-9]))  # exact zeros and rounding below zero count as 0
    assert LogHistogram().summary()["kl_max"] == 0.0 and math.isnan(LogHistogram().quantile(0.5))
    with pytest.raises(ValueError, match="quantile must be in"):
        h.quantile(1.5)
