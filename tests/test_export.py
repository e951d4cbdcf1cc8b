"""Export to compressed-tensors: plain transformers loads the result and computes what miaotui computes."""

import json

import pytest
import torch
import torch.nn.functional as F

import miaotui
from miaotui.checkpoint import save
from miaotui.cli import main
from miaotui.errors import MiaotuiError
from miaotui.quantize import PackedLinear, QuantizeConfig
from miaotui.recipe import Recipe, get_recipe


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
        if isinstance(m, PackedLinear):
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
    if get_recipe(recipe).name == "w8a8":  # activations per token, symmetric (transformers) or not (fbgemm)
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
    0.0007 (activation rounding: symmetric int8 there, asymmetric uint8 in fbgemm)."""
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
