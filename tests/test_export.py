"""Export to compressed-tensors and to plain folders: plain transformers loads the result and computes what miaotui
computes."""

import json

import pytest
import torch
import torch.nn.functional as F

import miaotui
from miaotui.checkpoint import save
from miaotui.cli import main
from miaotui.errors import MiaotuiError
from miaotui.lowrank.config import FactorizeConfig
from miaotui.quantize import PackedLinear, QuantizeConfig
from miaotui.recipe import Recipe, get_recipe
from miaotui.sparsity.config import PruneConfig
from miaotui.sparsity.semi_structured import is_nm_sparse


def _quantized_folder(source, recipe, folder):
    lm = miaotui.load(source)
    miaotui.apply_recipe(lm, get_recipe(recipe), progress=False)
    save(lm, folder)
    return folder


def _hf_logits(folder, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=ids).logits, model


def _compare(folder, out, ids):
    ours = miaotui.load(folder, dtype="float32")
    with torch.no_grad():
        a = ours.model(input_ids=ids).logits
    b, hf = _hf_logits(out, ids)
    weights = {}
    for name, m in ours.model.named_modules():
        if isinstance(m, PackedLinear) and hasattr(m, "dequantize"):  # quantized, not pruned
            deq = m.dequantize().float()  # (N, K): the weight miaotui's kernels compute with
            weights[name] = (hf.get_submodule(name).weight.float() - deq).abs().max().item() / deq.abs().max().item()
    kl = F.kl_div(F.log_softmax(b, -1), F.log_softmax(a, -1), log_target=True, reduction="none").sum(-1).mean()
    return {
        "max_abs": (a - b).abs().max().item(),
        "top1": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        "kl": kl.item(),
        "weight_rel": max(weights.values()),
    }


SYM4 = Recipe(steps=(QuantizeConfig(scheme="w4", group_size=32, symmetric=True),), name="w4-sym")
ASYM4 = Recipe(steps=(QuantizeConfig(scheme="w4", group_size=32),), name="w4-g32")
ASYM3 = Recipe(steps=(QuantizeConfig(scheme="w3", group_size=32),), name="w3-g32")
FP8 = Recipe(steps=(QuantizeConfig(scheme="fp8", emulate=True),), name="fp8")  # PyTorch's CPU fp8 kernels


@pytest.mark.parametrize(
    "recipe", ["w8", "w8a8", FP8, ASYM4, SYM4, ASYM3], ids=["w8", "w8a8", "fp8", "w4-asym", "w4-sym", "w3-asym"]
)
def test_transformers_loads_export_of_tiny_llama(recipe, tiny_models, tmp_path):
    folder = _quantized_folder(tiny_models["llama"], recipe, tmp_path / "q")
    summary = miaotui.export(folder, tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    group = config["config_groups"]["group_0"]
    assert summary["layers"] == 14 and config["quantization_status"] == "compressed" and config["ignore"] == ["lm_head"]
    ids = torch.randint(5, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    r = _compare(folder, tmp_path / "ct", ids)
    if get_recipe(recipe).name == "w8a8":  # per token, symmetric: max/127.5 to [-128, 127] there, max/127 here (vLLM)
        assert group["input_activations"]["strategy"] == "token" and config["format"] == "int-quantized"
        assert r["weight_rel"] < 1e-6 and r["top1"] > 0.9 and r["kl"] < 1e-5, r  # measured top-1 97 %, KL 3e-7
    elif get_recipe(recipe).name == "fp8":  # the same e4m3 codes, activations per token on both sides
        assert group["input_activations"]["type"] == "float" and config["format"] == "float-quantized"
        assert r["weight_rel"] == 0 and r["top1"] == 1.0 and r["max_abs"] < 1e-4, r
    else:  # weight-only: the same weights; int4 zero points differ by bf16 rounding at most
        name = get_recipe(recipe).name
        assert group["weights"]["symmetric"] == (name in ("w8", "w4-sym")) and group["weights"]["num_bits"] == int(
            name[1]
        )
        assert r["weight_rel"] < 2e-3 and r["top1"] == 1.0 and r["kl"] < 1e-5, r


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["w8", "w4-rtn", "w8a8"])
def test_ref_llama_export_matches(recipe, ref_llama, tmp_path):
    """Measured (2 x 128 tokens, fp32): w8 max |diff| 1e-5, w4-rtn 0.004 (top-1 100 %), w8a8 top-1 98.4 %, KL
    0.0010 (activation rounding: compressed-tensors' reference in transformers scales each token by max/127.5 and
    rounds to [-128, 127]; miaotui, as vLLM, by max/127 to [-127, 127])."""
    folder = _quantized_folder(ref_llama, recipe, tmp_path / "q")
    if recipe == "w4-rtn":  # o_proj: 384 input features = 3 groups of 128, not shareable by 2 ranks
        with pytest.raises(MiaotuiError, match="o_proj has 384 input features"):
            miaotui.export(folder, tmp_path / "ct", tp=2)
    miaotui.export(folder, tmp_path / "ct", tp=None if recipe == "w4-rtn" else 2)
    ids = torch.randint(5, 8000, (2, 128), generator=torch.Generator().manual_seed(0))
    r = _compare(folder, tmp_path / "ct", ids)
    if recipe == "w8a8":
        assert r["weight_rel"] < 1e-6 and r["top1"] > 0.97 and r["kl"] < 0.002, r
    else:
        assert r["max_abs"] < (1e-3 if recipe == "w8" else 0.02) and r["top1"] > 0.99 and r["kl"] < 1e-4, r


def test_export_refusals(tiny_models, tmp_path):
    with pytest.raises(MiaotuiError, match="not a miaotui-optimized folder"):
        miaotui.export(tiny_models["llama"], tmp_path / "x")
    folder = _quantized_folder(tiny_models["llama"], ASYM4, tmp_path / "q")
    with pytest.raises(MiaotuiError, match="format 'gguf' is not supported"):
        miaotui.export(folder, tmp_path / "x", format="gguf")
    with pytest.raises(MiaotuiError, match="--tp 3: the 4 attention heads"):
        miaotui.export(folder, tmp_path / "x", tp=3)
    with pytest.raises(MiaotuiError, match="o_proj has 64 input features; each rank needs a whole number of groups"):
        miaotui.export(folder, tmp_path / "x", tp=4)  # 16 input features per rank < one group of 32
    gpt2 = _quantized_folder(tiny_models["gpt2"], "w8", tmp_path / "g")
    with pytest.raises(MiaotuiError, match="is a Conv1D in GPT2LMHeadModel"):
        miaotui.export(gpt2, tmp_path / "x")
    lm = miaotui.load(folder)
    layer = lm.model.model.layers[0].mlp.up_proj
    layer.zeros += 0.3 * layer.scales  # float zero points (as HQQ makes) have no integer equivalent
    save(lm, tmp_path / "f")
    with pytest.raises(MiaotuiError, match="up_proj: its zero points are not whole quantization steps"):
        miaotui.export(tmp_path / "f", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cli_export(tiny_models, tmp_path, capsys):
    folder = _quantized_folder(tiny_models["llama"], "w8", tmp_path / "q")
    assert main(["export", str(folder), "--out", str(tmp_path / "ct"), "--tp", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["schemes"] == {"w8": 14} and "CPU build has no 8-bit weight-only kernel" in summary["vllm"]
    assert main(["export", str(folder), "--out", str(tmp_path / "ct")]) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err


# Pruned models: compressed-tensors has no sparse format left, so they export as plain folders (--dense), or as the
# quantized codes when a quantize step follows the prune step

SP24 = Recipe(steps=(PruneConfig(pattern="2:4"),), name="sparse24-magnitude")
SP24_W4 = Recipe(
    steps=(PruneConfig(pattern="2:4", layer="dense"), QuantizeConfig(scheme="w4", group_size=32)), name="sp24-w4"
)
MLP_SPARSE_W8 = Recipe(steps=(PruneConfig(targets=("*mlp*",)), QuantizeConfig(scheme="w8")), name="mlp-sparse-w8")


@pytest.mark.parametrize(
    "family,recipe,pattern",
    [("llama", "sparse50-magnitude", "unstructured"), ("llama", SP24, "2:4"), ("gpt2", "sparse50-magnitude", None)],
    ids=["llama-bitmask", "llama-2to4", "gpt2-conv1d"],
)
def test_dense_export_of_pruned_model_loads_in_plain_transformers(family, recipe, pattern, tiny_models, tmp_path):
    folder = _quantized_folder(tiny_models[family], recipe, tmp_path / "p")
    summary = miaotui.export(folder, tmp_path / "hf", format="dense")
    assert summary["sparsity"]["zeros"] == 0.5 and summary["sparsity"]["layers"] == summary["layers"] > 0
    assert pattern is None or summary["sparsity"]["pattern"] == pattern
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert "miaotui.json" not in files and "model.safetensors" in files and "tokenizer.json" in files
    assert "quantization_config" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    ours = miaotui.load(folder, dtype="float32")
    ids = torch.randint(5, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ours.model(input_ids=ids).logits
    b, hf = _hf_logits(tmp_path / "hf", ids)
    assert torch.equal(a, b)  # the same float weights, zeros included (Conv1D ones stored (in, out) again)
    name = "transformer.h.0.mlp.c_fc" if family == "gpt2" else "model.layers.0.mlp.up_proj"
    assert (hf.get_submodule(name).weight == 0).float().mean().item() == 0.5


def test_quantized_after_pruning_exports_its_codes(tiny_models, tmp_path):
    """2:4 zeros kept at the zero code through int4 (a dense prune step, then quantize): pack-quantized, no
    sparsity_config (vLLM refuses any 2:4 one), the zeros still there after transformers loads it."""
    folder = _quantized_folder(tiny_models["llama"], SP24_W4, tmp_path / "q")
    summary = miaotui.export(folder, tmp_path / "ct")
    assert summary["schemes"] == {"w4-g32-asym": 14} and summary["sparsity"]["pattern"] == "2:4"
    assert summary["sparsity"]["zeros"] >= 0.5
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert not config.get("sparsity_config")
    ids = torch.randint(5, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    r = _compare(folder, tmp_path / "ct", ids)
    assert r["weight_rel"] < 2e-3 and r["top1"] == 1.0 and r["kl"] < 1e-5, r  # measured max |diff| 3e-7
    with torch.no_grad():
        _, hf = _hf_logits(tmp_path / "ct", ids)
    assert is_nm_sparse(hf.model.layers[1].self_attn.o_proj.weight, 2, 4)


def test_pruned_layers_beside_quantized_ones_are_kept_in_full_precision(tiny_models, tmp_path):
    folder = _quantized_folder(tiny_models["llama"], MLP_SPARSE_W8, tmp_path / "q")
    summary = miaotui.export(folder, tmp_path / "ct")
    assert summary["schemes"] == {"w8": 8} and "model.layers.1.mlp.down_proj" in summary["kept_in_full_precision"]
    ids = torch.randint(5, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    r = _compare(folder, tmp_path / "ct", ids)
    assert r["max_abs"] < 1e-5 and r["top1"] == 1.0, r  # measured 3e-7


@pytest.mark.slow
def test_ref_llama_pruned_exports_match(ref_llama, tmp_path):
    """Measured (2 x 128 tokens, fp32): 50 % magnitude --dense gives the same logits to the bit; 2:4 magnitude then
    int4 g128 RTN as compressed-tensors max |diff| 0.005 (int4 zero points rounded to bf16), top-1 100 %, KL 2e-7."""
    ids = torch.randint(5, 8000, (2, 128), generator=torch.Generator().manual_seed(0))
    pruned = _quantized_folder(ref_llama, "sparse50-magnitude", tmp_path / "p")
    assert miaotui.export(pruned, tmp_path / "hf", format="dense")["sparsity"]["zeros"] == 0.5
    with torch.no_grad():
        a = miaotui.load(pruned, dtype="float32").model(input_ids=ids).logits
    assert torch.equal(a, _hf_logits(tmp_path / "hf", ids)[0])
    recipe = Recipe(steps=(PruneConfig(pattern="2:4", layer="dense"), QuantizeConfig(scheme="w4")), name="24-w4")
    folder = _quantized_folder(ref_llama, recipe, tmp_path / "q")
    assert miaotui.export(folder, tmp_path / "ct")["sparsity"]["pattern"] == "2:4"
    r = _compare(folder, tmp_path / "ct", ids)
    assert r["max_abs"] < 0.02 and r["top1"] > 0.99 and r["kl"] < 1e-4, r


def test_sparse_export_refusals(tiny_models, tmp_path, capsys):
    pruned = _quantized_folder(tiny_models["llama"], "sparse50-magnitude", tmp_path / "p")
    with pytest.raises(
        MiaotuiError, match="pruned, not quantized .14 sparse_bitmask layers.*no sparse format.*--dense"
    ):
        miaotui.export(pruned, tmp_path / "x")
    quantized = _quantized_folder(tiny_models["llama"], MLP_SPARSE_W8, tmp_path / "q")
    with pytest.raises(
        MiaotuiError, match="q_proj is quantized .int8_weight_only; 8 quantized layers.*compressed-tensors"
    ):
        miaotui.export(quantized, tmp_path / "x", format="dense")
    factorized = _quantized_folder(tiny_models["llama"], Recipe(steps=(FactorizeConfig(method="svd"),)), tmp_path / "f")
    with pytest.raises(MiaotuiError, match="is a LowRankLinear, which config.json cannot describe"):
        miaotui.export(factorized, tmp_path / "x", format="dense")
    with pytest.raises(MiaotuiError, match="not a miaotui-optimized folder"):
        miaotui.export(tiny_models["llama"], tmp_path / "x", format="dense")
    gpt2 = _quantized_folder(tiny_models["gpt2"], "w4-rtn", tmp_path / "g")
    with pytest.raises(MiaotuiError, match="Conv1D in GPT2LMHeadModel; .*attaches quantization to nn.Linear"):
        miaotui.export(gpt2, tmp_path / "x")
    assert not (tmp_path / "x").exists()

    # the command line: exit 2 with the reason on stderr, no output folder
    x = str(tmp_path / "x")
    assert main(["export", str(pruned), "--out", x]) == 2
    assert "Export a plain Hugging Face folder with --dense" in capsys.readouterr().err
    assert main(["export", str(quantized), "--out", x, "--dense"]) == 2
    assert "is quantized" in capsys.readouterr().err
    assert main(["export", str(pruned), "--out", x, "--dense", "--format", "compressed-tensors"]) == 2
    assert "does not combine with --format" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["export", str(pruned), "--out", x, "--dense", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "dense"
    assert main(["export", str(pruned), "--out", x, "--dense"]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(pruned), "--out", x, "--format", "dense", "--overwrite"]) == 0
