"""Pruning: masks and exact ratios, N:M validity, the sparse layers (storage, reload, CUDA 2:4), bad input."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from families import CORE
from transformers.pytorch_utils import Conv1D

import miaotui
from miaotui.checkpoint import WEIGHTS, save
from miaotui.evaluate.similarity import sample_text
from miaotui.modules import find_linears, linear_weight
from miaotui.recipe import Recipe
from miaotui.sparsity import PruneConfig, SemiStructuredSparseLinear, SparseLinear, prune_
from miaotui.sparsity.layer import nonzero_mask, pack_bits, unpack_bits
from miaotui.sparsity.masks import prune_mask, pruned_count
from miaotui.sparsity.semi_structured import is_nm_sparse
from miaotui.sparsity.sparsegpt import sparsegpt_prune
from miaotui.sparsity.swaps import refine_mask
from miaotui.sparsity.wanda import wanda_prune


def correlated(k: int, n: int = 1024, seed: int = 0) -> torch.Tensor:
    """Calibration-like inputs (n, k) with correlated channels and a few large-norm features."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g) @ torch.randn(16, k, generator=g) + 0.1 * torch.randn(n, k, generator=g)
    return x * (1 + 4 * (torch.rand(k, generator=g) > 0.9))  # (n, k)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_masks_prune_exact_counts(sparsity):
    scores = torch.rand(48, 256, generator=torch.Generator().manual_seed(0))
    rows = prune_mask(scores, sparsity)
    assert torch.all(rows.sum(1) == pruned_count(256, sparsity))
    assert torch.all(scores[rows].max() <= scores[~rows].max())
    whole = prune_mask(scores, sparsity, per_row=False)
    assert int(whole.sum()) == pruned_count(48 * 256, sparsity)
    assert scores[whole].max() <= scores[~whole].min()  # the lowest scores of the matrix go
    assert not prune_mask(scores, 0.0).any()


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
def test_nm_masks_are_valid(nm):
    w = torch.randn(64, 128)
    for new, mask in (wanda_prune(w, torch.rand(128), 0, nm), sparsegpt_prune(w, 2 * correlated(128).T.cov(), 0, nm)):
        assert is_nm_sparse(new, *nm) and not is_nm_sparse(w, *nm)
        assert torch.all(mask.view(64, -1, nm[1]).sum(-1) == nm[1] - nm[0])  # exactly M - N pruned per group
        assert torch.all(new[mask] == 0) and torch.all(nonzero_mask(new[mask]) == 0)  # +0.0, not -0.0


def test_sparsegpt_reconstructs_and_counts_per_block():
    torch.manual_seed(0)
    w, x = torch.randn(96, 384), correlated(384)
    h = 2 * x.T @ x / len(x)
    err = lambda new: ((new - w) @ x.T).norm().item()
    sgpt, mask = sparsegpt_prune(w, h, 0.5, None)
    wanda, _ = wanda_prune(w, x.pow(2).sum(0), 0.5, None)
    assert err(sgpt) < 0.6 * err(wanda)  # weight reconstruction beats pruning alone (measured 0.40)
    for i in range(0, 384, 128):  # exact count per block of 128 columns, rows chosen adaptively
        assert int(mask[:, i : i + 128].sum()) == pruned_count(96 * 128, 0.5)
    assert torch.equal(sgpt == 0, mask)
    sgpt24, _ = sparsegpt_prune(w, h, 0.5, (2, 4))
    assert is_nm_sparse(sgpt24, 2, 4) and err(sgpt24) < err(wanda_prune(w, x.pow(2).sum(0), 0, (2, 4))[0])


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_swaps_lower_the_reconstruction_error_and_keep_the_pattern(nm):
    torch.manual_seed(0)
    w, x = torch.randn(96, 256), correlated(256)
    h = 2 * x.T @ x / len(x)
    err = lambda mask: ((w * mask) @ x.T).pow(2).sum().item() / len(x)  # sum over rows of r^T (X^T X / n) r
    start = wanda_prune(w, x.pow(2).sum(0), 0.5, nm)[1]
    mask, (before, after) = refine_mask(w, h, start.clone(), 100, nm)
    assert before == pytest.approx(2 * err(start), rel=1e-3) and after == pytest.approx(2 * err(mask), rel=1e-3)
    assert after < 0.5 * before  # measured 0.24 unstructured, 0.35 for 2:4, 0.29 for 4:8
    assert torch.equal(mask.sum(1), start.sum(1)) and not torch.equal(mask, start)
    if nm:
        assert torch.all(mask.view(96, -1, nm[1]).sum(-1) == nm[1] - nm[0])
    assert torch.equal(refine_mask(w, h, start.clone(), 0, nm)[0], start)  # no rounds: unchanged
    assert torch.equal(refine_mask(w, torch.zeros_like(h), start.clone(), 100, nm)[0], start)  # no data: no swap


def test_gptq_keeps_pruned_weights_at_zero_and_compensates():
    """The sparse24-w4-gptq composition at the kernel level: GPTQ after SparseGPT leaves the 2:4 pattern intact."""
    from miaotui.quantize.gptq import dequantize_codes, gptq_quantize

    torch.manual_seed(0)
    w, x = torch.randn(64, 256), correlated(256)
    h = 2 * x.T @ x / len(x)
    pruned, mask = sparsegpt_prune(w, h, 0.5, (2, 4))
    err = lambda codes: ((dequantize_codes(*codes, group_size=32) - w) @ x.T).norm().item()
    gptq = gptq_quantize(pruned, h, bits=4, group_size=32)
    rtn = gptq_quantize(pruned, torch.eye(256), bits=4, group_size=32)  # identity Hessian: round-to-nearest
    for codes in (gptq, rtn):
        deq = dequantize_codes(*codes, group_size=32)
        assert torch.all(deq[mask] == 0) and is_nm_sparse(deq, 2, 4)
    assert err(gptq) < 0.85 * err(rtn)  # measured 0.69


def test_bitmask_packing_is_lossless():
    mask = torch.rand(1001) > 0.5
    assert torch.equal(unpack_bits(pack_bits(mask), 1001), mask)
    w = torch.tensor([[0.0, -0.0, 1.5, 0.0], [2.0, 0.0, 0.0, -3.0]], dtype=torch.bfloat16)
    lin = nn.Linear(4, 2, bias=False).to(torch.bfloat16)
    lin.weight.data.copy_(w)
    layer = SparseLinear.from_float(lin)
    saved = layer.portable_tensors()
    assert saved["weight"].numel() == layer.describe()["nnz"] == 4  # -0.0 is kept: its bits are not zero
    back = SparseLinear(4, 2, False, torch.bfloat16, nnz=4)
    back.weight, back.bitmask = saved["weight"], saved["bitmask"]
    dense = back.dense_weight()
    assert torch.equal(dense.view(torch.int16), w.view(torch.int16)) and back.layout == "dense"


def test_magnitude_prunes_conv1d_and_linear_in_place():
    torch.manual_seed(0)
    conv = Conv1D(96, 64)  # GPT-2 layout: weight (in=64, out=96)
    nn.init.normal_(conv.weight)
    model = nn.ModuleDict({"conv": conv, "lin": nn.Linear(64, 32), "lm_head": nn.Linear(32, 8)})
    dense = {n: m.weight.detach().clone() for n, m in model.items()}
    summary = prune_(model, PruneConfig(sparsity=0.5), progress=False)
    assert summary["layers"] == {"conv": 0.5, "lin": 0.5} and summary["pruned"] == 2
    assert "saves no time" in summary["note"]
    assert isinstance(model["conv"], SparseLinear) and isinstance(model["lm_head"], nn.Linear)  # ignored
    w = model["conv"].dense_weight()  # (out, in)
    assert w.shape == (96, 64) and int((w == 0).sum()) == 96 * 32
    assert torch.equal(w[w != 0], dense["conv"].t()[w != 0])  # kept weights untouched
    x = torch.randn(3, 64)
    assert torch.equal(model["conv"](x), F.linear(x, w, conv.bias))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\), got 1.0"),
        ({"sparsity": -0.1}, r"sparsity must be in \[0, 1\)"),
        ({"sparsity": "half"}, "sparsity must be a number"),
        ({"pattern": "4:2"}, "need 0 < N < M"),
        ({"pattern": "2:2"}, "need 0 < N < M"),
        ({"pattern": "2-4"}, "use 'unstructured' or 'N:M'"),
        ({"pattern": "1:4"}, "keeps 1 of every 4 weights, sparsity 0.75; set sparsity to that"),
        ({"method": "obs"}, "method 'obs' is not supported; choose one of magnitude, wanda, sparsegpt"),
        ({"ratios": "owl", "pattern": "2:4"}, "owl ratios .* need pattern unstructured"),
        ({"ratios": "owl", "owl_lambda": 0.3}, "owl_lambda 0.3 would push block ratios outside"),
        ({"layer": "semi_structured"}, "layer semi_structured needs pattern 2:4"),
        ({"layer": "csr"}, "layer 'csr' is not supported"),
        ({"targets": ()}, "targets must name at least one pattern"),
        ({"damp": 0}, "damp must be a positive number, got 0"),
        ({"damp": "a lot"}, "damp must be a positive number"),
        ({"swaps": -1}, "swaps must be a whole number >= 0"),
        ({"swaps": True}, "swaps must be a whole number >= 0"),
        ({"swaps": 10, "method": "sparsegpt"}, "swaps refine the masks of methods that keep the surviving weights"),
    ],
)
def test_config_validates(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruneConfig(**kwargs)


def test_bad_input_fails_before_any_work(tiny_models):
    model = nn.ModuleDict({"a": nn.Linear(64, 32), "odd": nn.Linear(30, 32), "narrow": nn.Linear(64, 24)})
    before = {n: m.weight.detach().clone() for n, m in model.items()}
    with pytest.raises(ValueError, match="needs input features divisible by 4; layer odd has 30"):
        prune_(model, PruneConfig(pattern="2:4"), progress=False)
    with pytest.raises(ValueError, match=r"match no linear layer \(.* named like a, odd, narrow"):
        prune_(model, PruneConfig(targets=("*.mlp.*",)), progress=False)
    with pytest.raises(ValueError, match="layer narrow: the 2:4 kernels need out_features a multiple of 32"):
        prune_(model, PruneConfig(pattern="2:4", layer="semi_structured", targets=("narrow",)), progress=False)
    with pytest.raises(ValueError, match="method wanda calibrates block by block; pass a LoadedModel"):
        prune_(model, PruneConfig(method="wanda"), progress=False)
    assert all(torch.equal(m.weight, before[n]) and isinstance(m, nn.Linear) for n, m in model.items())
    lm = miaotui.load(tiny_models["llama"], dtype="float32")
    with pytest.raises(ValueError, match=r"method sparsegpt needs calibration text \(--calib FILE\)"):
        prune_(lm, PruneConfig(method="sparsegpt"), progress=False)
    with pytest.raises(ValueError, match=r"swaps needs calibration text"):
        prune_(lm, PruneConfig(swaps=10), progress=False)


def _outputs(lm, ids):
    with torch.no_grad():
        out = lm.model(input_ids=ids)
    return out.logits if lm.kind == "causal-lm" else out.last_hidden_state


@pytest.mark.parametrize("model_type", CORE)
def test_sparsegpt_24_every_family_saves_smaller_and_reloads(model_type, tiny_models, tmp_path):
    """2:4 SparseGPT through each family's own blocks (GPT-2: Conv1D); N:M valid per layer; exact reload."""
    from miaotui.calibration import Calibration

    lm = miaotui.load(tiny_models[model_type], dtype="float32")
    ids = torch.randint(5, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = _outputs(lm, ids)
    recipe = miaotui.get_recipe("sparse24-sparsegpt")
    summary = miaotui.apply_recipe(lm, recipe, progress=False, calibration=Calibration(sample_text(), 4, 64))[0]
    layers = [m for m in lm.model.modules() if isinstance(m, SparseLinear)]
    assert len(layers) == summary["pruned"] >= 8 and summary["overall_sparsity"] == 0.5
    assert summary["layer_types"] == {"sparse_2to4": len(layers)}  # every tiny shape suits the 2:4 kernels
    assert all(type(m) is SemiStructuredSparseLinear and is_nm_sparse(m.dense_weight(), 2, 4) for m in layers)
    got = _outputs(lm, ids)
    cos = F.cosine_similarity(got.flatten(), ref.flatten(), 0).item()
    assert cos > 0.5, f"{model_type}: cosine {cos}"  # random weights at 50 %: gemma2 0.58 (softcapped logits)
    save(lm, tmp_path / "s")
    back = miaotui.load(tmp_path / "s")
    assert torch.equal(_outputs(back, ids), got)
    assert miaotui.info(back)["linear_layers"]["sparse_2to4"] == len(layers)
    dense_bytes = sum(4 * m.weight_numel for m in layers)
    saved_bytes = sum(4 * m.weight_numel // 2 + m.weight_numel // 8 for m in layers)  # fp32 values + bitmask
    lm_dense = miaotui.load(tiny_models[model_type], dtype="float32")
    save(lm_dense, tmp_path / "d")
    shrink = (tmp_path / "d" / WEIGHTS).stat().st_size - (tmp_path / "s" / WEIGHTS).stat().st_size
    assert shrink == pytest.approx(dense_bytes - saved_bytes, rel=0.02)  # plus the file header of more tensors


@pytest.mark.parametrize("model_type", CORE)
def test_wanda_swaps_every_family_keep_weights_and_counts(model_type, tiny_models):
    """Swaps through each family's own blocks (GPT-2: Conv1D): exact 50 % per row, kept weights untouched."""
    from miaotui.calibration import Calibration

    lm = miaotui.load(tiny_models[model_type], dtype="float32")
    dense = {name: linear_weight(m).detach().clone() for name, m in find_linears(lm.model)}
    calib = Calibration(sample_text(), 4, 64)
    summary = prune_(lm, PruneConfig(method="wanda", swaps=50), calibration=calib, progress=False)
    assert summary["pruned"] >= 8 and set(summary["layers"].values()) == {0.5}
    assert summary["swap_error_ratio"] < 0.85, summary["swap_error_ratio"]  # measured 0.38 (gemma2) to 0.70 (qwen3)
    for name, layer in lm.model.named_modules():
        if isinstance(layer, SparseLinear):
            w = layer.dense_weight()  # (N, K)
            assert torch.all((w == 0).sum(1) == w.shape[1] // 2)
            assert torch.equal(w[w != 0], dense[name][w != 0])


def test_owl_ratios_vary_per_block_and_keep_the_mean(tiny_models):
    from miaotui.calibration import Calibration

    lm = miaotui.load(tiny_models["llama"], dtype="float32")
    cfg = PruneConfig(method="wanda", sparsity=0.5, ratios="owl", owl_lambda=0.1)
    summary = prune_(lm, cfg, calibration=Calibration(sample_text(), 4, 64), progress=False)
    r = summary["block_ratios"]
    assert len(r) == 2 and sum(r) / 2 == pytest.approx(0.5, abs=1e-3) and max(r) - min(r) == pytest.approx(0.2)
    for name, ratio in summary["layers"].items():
        assert ratio == pytest.approx(r[int(name.split(".")[2])], abs=1 / 64)  # model.layers.<i>. ...


def test_semi_structured_layer_refuses_dense_weights():
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        SemiStructuredSparseLinear.from_float(nn.Linear(64, 32))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_24_layer_runs_sparse_kernel_and_round_trips():
    torch.manual_seed(0)
    lin = nn.Linear(512, 256).cuda().to(torch.bfloat16)
    prune_(nn.ModuleDict({"l": lin}), PruneConfig(pattern="2:4", layer="dense"), progress=False)
    layer = SemiStructuredSparseLinear.from_float(lin)
    dense = layer.dense_weight().clone()
    for m in (1, 64, 1000):
        x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
        y = layer(x)
        assert layer._sparse is not None and layer.weight is None  # compressed form in use
        cos = F.cosine_similarity(y.float().flatten(), lin(x).float().flatten(), 0).item()
        assert cos > 0.999 and y.shape == (m, 256)
    saved = layer.portable_tensors()
    assert torch.equal(layer.dense_weight(), dense)  # decompresses exactly
    layer.cpu()
    assert layer._sparse is None and torch.equal(layer.weight, dense.cpu())
    assert torch.equal(saved["weight"].cpu(), dense[dense != 0].cpu())


@pytest.fixture(scope="module")
def ref_quality(ref_llama, wikitext):
    """Prune ref-llama-16m (fp32) with a recipe, calibrating on 8 windows of 512 tokens from the model's training
    text mixed with the WikiText-2 validation split, and compare with the original on the first 4,096 WikiText-2
    test tokens (seqlen 512). Calibrating on the training text alone (Python documentation) left SparseGPT's
    reconstruction fitted to the wrong domain: +10.1 % perplexity instead of +4.9 %. All windows cut from that text
    (generated=0): with text like the evaluation text, the algorithms are compared on it alone (the default, most
    windows generated, is for text unlike it: `off_domain` below; with 6 of these 8 windows generated Wanda lands
    at +8.16 % against magnitude's +7.96 %)."""
    from miaotui.calibration import Calibration
    from miaotui.evaluate import compare_causal, read_text, read_texts

    ref = miaotui.load(ref_llama, dtype="float32")
    data = ref_llama.parent
    mix = read_texts([data / "ref-llama-16m-calibration.txt", data / "wikitext-2" / "wiki.valid.tokens"])
    calib = Calibration(mix, samples=8, seqlen=512, generated=0)
    text = read_text(wikitext)

    cache = {}

    def run(recipe):
        name = recipe if isinstance(recipe, str) else recipe.name
        if name not in cache:
            lm = miaotui.load(ref_llama, dtype="float32")
            summaries = miaotui.apply_recipe(lm, miaotui.get_recipe(recipe), progress=False, calibration=calib)
            cache[name] = lm, summaries, compare_causal(lm, text, baseline=ref, seqlen=512, max_tokens=4096)
        return cache[name]

    return run


MAG24 = Recipe(steps=(PruneConfig(method="magnitude", pattern="2:4"),), name="magnitude-2:4")


@pytest.mark.slow
def test_sparsegpt_50_beats_magnitude(ref_quality):
    """Measured on this protocol: magnitude ppl +7.96 %, KL 0.173, top-1 69.0 %; SparseGPT +4.87 %, KL 0.0895,
    top-1 77.4 % (the issue's bound is +6 %; on 65,536 tokens with 128 windows +3.26 %)."""
    _, _, mag = ref_quality("sparse50-magnitude")
    _, summaries, sgpt = ref_quality("sparse50-sparsegpt")
    assert summaries[0]["overall_sparsity"] == 0.5 and set(summaries[0]["layers"].values()) == {0.5}
    assert sgpt["kl_mean"] < 0.6 * mag["kl_mean"] and sgpt["top1_agreement"] > mag["top1_agreement"] + 0.06
    assert sgpt["perplexity_ratio"] < 1.06


def test_sparsegpt_damp_reaches_the_solver(tiny_models, monkeypatch):
    """prune_ hands PruneConfig.damp (default 0.01, the paper's) to the SparseGPT solver."""
    import miaotui.sparsity.prune as prune_module
    from miaotui.calibration import Calibration

    seen = []
    real = prune_module.sparsegpt_prune
    monkeypatch.setattr(prune_module, "sparsegpt_prune", lambda *a, **kw: seen.append(kw["damp"]) or real(*a, **kw))
    assert PruneConfig().damp == 0.01
    for damp in (0.01, 1.0):
        lm = miaotui.load(tiny_models["llama"], dtype="float32")
        cfg = PruneConfig(method="sparsegpt", damp=damp) if damp != 0.01 else PruneConfig(method="sparsegpt")
        prune_(lm, cfg, calibration=Calibration(sample_text(), 4, 64), progress=False)
        assert seen and set(seen) == {damp}
        seen.clear()


@pytest.mark.slow
def test_wanda_50_quality(ref_quality):
    """Measured on this protocol: Wanda ppl +7.55 %, KL 0.161, top-1 70.2 %; magnitude +7.96 %, KL 0.173,
    top-1 69.0 %. ref-llama-16m has no outlier features (largest input norm 1.5-5.5x the median), so Wanda's
    activation weighting helps only a little here (65,536 tokens: +9.17 % vs +10.93 %)."""
    _, _, mag = ref_quality("sparse50-magnitude")
    _, summaries, wanda = ref_quality("sparse50-wanda")
    assert summaries[0]["overall_sparsity"] == 0.5
    assert wanda["perplexity_ratio"] < min(1.09, mag["perplexity_ratio"]) and wanda["kl_mean"] < 0.97 * mag["kl_mean"]
    assert wanda["top1_agreement"] > mag["top1_agreement"] + 0.005


@pytest.mark.slow
def test_wanda_with_swaps_quality(ref_quality):
    """Measured on this protocol: Wanda + swaps (at most 200 rounds; every layer settles within 100) ppl
    +2.63 %, KL 0.109, top-1 75.3 % (Wanda alone +7.55 %, KL 0.161); each layer's reconstruction error falls to
    0.44x of Wanda's on average. The issue's Wanda bound is +7 %; on 65,536 tokens with 128 windows the swaps
    give +3.40 % against Wanda's +9.20 % (from the bf16 checkpoint)."""
    _, _, wanda = ref_quality("sparse50-wanda")
    lm, summaries, swaps = ref_quality("sparse50-wanda-swaps")
    assert summaries[0]["overall_sparsity"] == 0.5 and set(summaries[0]["layers"].values()) == {0.5}
    assert summaries[0]["swap_error_ratio"] < 0.55
    assert swaps["perplexity_ratio"] < 1.04 and swaps["kl_mean"] < 0.75 * wanda["kl_mean"]
    assert swaps["top1_agreement"] > wanda["top1_agreement"] + 0.03


@pytest.mark.parametrize("algorithm", ["rtn", "gptq"])
def test_w4_after_24_pruning_keeps_pruned_weights_at_the_zero_code(algorithm, tiny_models):
    """The sparse24-w4 and sparse24-w4-gptq compositions (magnitude here, groups of 32 for the tiny model's 64
    input features)."""
    from miaotui.calibration import Calibration
    from miaotui.quantize import Int4WeightOnlyLinear, QuantizeConfig

    lm = miaotui.load(tiny_models["llama"], dtype="bfloat16")
    prune_(lm, PruneConfig(pattern="2:4", layer="dense"), progress=False)
    pruned = {name: linear_weight(m) == 0 for name, m in find_linears(lm.model, ignore=("lm_head",))}
    cfg = QuantizeConfig(scheme="w4", group_size=32, algorithm=algorithm)
    cfg.apply(lm, calibration=Calibration(sample_text(), 4, 64), progress=False)
    exact = total = 0
    for name, mask in pruned.items():
        layer = lm.model.get_submodule(name)
        assert isinstance(layer, Int4WeightOnlyLinear)
        scale = layer.scales.float().repeat_interleave(32, 1)  # (N, K)
        zero_code = torch.round(8 - layer.zeros.float() / layer.scales.float()).repeat_interleave(32, 1)
        assert torch.equal(layer.codes().float()[mask], zero_code[mask])  # 2:4 survives in the codes
        deq = layer.dequantize()
        assert torch.all(deq[mask].abs() <= scale[mask] / 64)  # the bf16 zero offset's rounding, at most
        exact, total = exact + int((deq[mask] == 0).sum()), total + int(mask.sum())
    assert total > 0 and exact < total  # not all exact: why the residual is documented


@pytest.mark.slow
def test_sparsegpt_24_quality(ref_quality):
    """Measured on this protocol: 2:4 SparseGPT ppl +9.22 %, KL 0.182, top-1 69.9 %; 2:4 magnitude +24.4 %,
    KL 0.382, top-1 57.5 % (the issue's bound is +18 %; on 65,536 tokens with 128 windows +7.40 %)."""
    _, _, mag = ref_quality(MAG24)
    lm, summaries, r = ref_quality("sparse24-sparsegpt")
    layers = [m for m in lm.model.modules() if isinstance(m, SparseLinear)]
    assert len(layers) == 42 and all(is_nm_sparse(m.dense_weight(), 2, 4) for m in layers)
    assert summaries[0]["layer_types"] == {"sparse_2to4": 42}
    assert r["perplexity_ratio"] < 1.12 and r["kl_mean"] < 0.55 * mag["kl_mean"]
    assert r["top1_agreement"] > mag["top1_agreement"] + 0.1


@pytest.fixture(scope="module")
def off_domain(ref_llama, wikitext):
    """Prune ref-llama-16m (fp32) calibrating on 16 windows of 512 tokens that hold no WikiText at all: cut from
    the model's training text alone (Python documentation), three quarters of them (the default) or none written
    by the model itself; compare with the original on the first 8,192 WikiText-2 test tokens (seqlen 512)."""
    from miaotui.calibration import Calibration
    from miaotui.evaluate import compare_causal, read_text

    ref = miaotui.load(ref_llama, dtype="float32")
    python_docs = read_text(ref_llama.parent / "ref-llama-16m-calibration.txt")
    calib = {g: Calibration(python_docs, samples=16, seqlen=512, generated=g) for g in (0.0, 0.75)}
    text = read_text(wikitext)
    cache = {}

    def run(cfg: PruneConfig, generated: float = 0.75):
        if (cfg, generated) not in cache:
            lm = miaotui.load(ref_llama, dtype="float32")
            summary = prune_(lm, cfg, calibration=calib[generated], progress=False)
            cache[cfg, generated] = summary, compare_causal(lm, text, baseline=ref, seqlen=512, max_tokens=8192)
        return cache[cfg, generated]

    return run


@pytest.mark.slow
def test_generated_calibration_steers_wanda_off_domain(off_domain):
    """Calibrated on Python documentation alone, Wanda ranks weights by the wrong activations and falls behind
    plain magnitude pruning on WikiText-2; three quarters of the windows written by the model pull it back. On this
    protocol: magnitude ppl +8.38 %, KL 0.1829; Wanda on the text alone +10.32 %, KL 0.1884; with generated
    windows +9.71 %, KL 0.1786 (65,536 tokens, 128 windows: +12.76 % -> +10.64 %, KL 0.179 -> 0.164;
    magnitude +10.93 %, KL 0.172)."""
    _, mag = off_domain(PruneConfig())
    _, text_only = off_domain(PruneConfig(method="wanda"), generated=0.0)
    summary, mixed = off_domain(PruneConfig(method="wanda"))
    assert summary["calibration"] == {"windows": 16, "tokens_per_window": 512, "generated_windows": 12}
    assert text_only["perplexity_ratio"] > mag["perplexity_ratio"]  # the failure this protects against
    assert mixed["perplexity_ratio"] < text_only["perplexity_ratio"] - 0.004
    assert mixed["kl_mean"] < 0.98 * min(mag["kl_mean"], text_only["kl_mean"])


@pytest.mark.slow
def test_generated_calibration_rescues_sparsegpt_off_domain(off_domain):
    """Measured on this protocol: 2:4 SparseGPT on the text alone ppl +21.28 %, KL 0.312; with generated windows
    +9.36 %, KL 0.205 (65,536 tokens, 128 windows: +21.27 % -> +10.95 %); 50 % SparseGPT +4.73 %, KL 0.104 against
    magnitude's +8.38 %, 0.183."""
    _, text_only = off_domain(PruneConfig(method="sparsegpt", pattern="2:4"), generated=0.0)
    _, mixed = off_domain(PruneConfig(method="sparsegpt", pattern="2:4"))
    _, mag = off_domain(PruneConfig())
    _, unstructured = off_domain(PruneConfig(method="sparsegpt"))
    assert mixed["perplexity_ratio"] < min(1.12, text_only["perplexity_ratio"] - 0.08)
    assert mixed["kl_mean"] < 0.75 * text_only["kl_mean"]
    assert unstructured["perplexity_ratio"] < mag["perplexity_ratio"] - 0.025
    assert unstructured["kl_mean"] < 0.65 * mag["kl_mean"]


def test_generated_windows_are_sampled_once_and_encoders_use_text(tiny_models):
    """The model writes round(samples x generated) windows, once per model, the same for the same seed; an
    encoder cannot, so it calibrates on text alone (and says so); bad fractions fail early."""
    from miaotui.calibration import Calibration, calibration_summary
    from miaotui.errors import MiaotuiError

    lm = miaotui.load(tiny_models["llama"], dtype="float32")
    from miaotui.cli.common import CALIB_GENERATED

    assert Calibration("x").generated == CALIB_GENERATED  # the CLI's default is the library's
    calib = Calibration(sample_text(), samples=4, seqlen=32)
    ids = calib.token_ids(lm)  # (4, 32): 1 cut from the text, 3 written
    assert ids.shape == (4, 32) and calib.generated_windows(lm) == 3
    assert ids.max() < lm.model.get_input_embeddings().num_embeddings
    assert calib.token_ids(lm) is not ids and torch.equal(calib.token_ids(lm), ids)  # kept, not resampled
    assert torch.equal(Calibration(sample_text(), samples=4, seqlen=32).token_ids(lm), ids)  # seeded
    text_only = Calibration(sample_text(), samples=4, seqlen=32, generated=0).token_ids(lm)
    assert torch.equal(text_only[:1], ids[:1]) and not torch.equal(text_only, ids)
    assert Calibration("", samples=2, seqlen=16, generated=1.0).token_ids(lm).shape == (2, 16)
    encoder = miaotui.load(tiny_models["bert"], dtype="float32")
    assert calib.generated_windows(encoder) == 0 and calib.token_ids(encoder).shape == (4, 32)
    assert "text only" in calibration_summary(encoder, calib, calib.token_ids(encoder))["note"]
    with pytest.raises(MiaotuiError, match="cannot write its own"):
        Calibration("", samples=2, seqlen=16, generated=1.0).token_ids(encoder)
    for bad in (-0.1, 1.5, True, "half"):
        with pytest.raises(MiaotuiError, match="fraction in"):
            Calibration(sample_text(), generated=bad)
    with pytest.raises(MiaotuiError, match="empty"):
        Calibration("  ", generated=0.5)
