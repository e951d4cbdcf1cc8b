"""Every supported family: load, w8 and w8a8 quantization, save and exact reload, info."""

import pytest
import torch
import torch.nn.functional as F
from families import CORE

import miaotui
from miaotui.arch import CAUSAL_LM
from miaotui.checkpoint import save
from miaotui.quantize import PackedLinear, QuantizeConfig
from miaotui.recipe import Recipe, get_recipe


def _outputs(lm, ids):
    with torch.no_grad():
        out = lm.model(input_ids=ids)
    return out.logits if lm.kind == CAUSAL_LM else out.last_hidden_state


W4_G32 = Recipe(steps=(QuantizeConfig(scheme="w4", group_size=32),), name="w4-g32")  # tiny models: K = 64


@pytest.mark.parametrize("model_type", CORE)
@pytest.mark.parametrize("recipe", ["w8", "w8a8", W4_G32], ids=["w8", "w8a8", "w4-g32"])
def test_quantize_save_reload(model_type, recipe, tiny_models, tmp_path):
    lm = miaotui.load(tiny_models[model_type], dtype="float32")
    ids = torch.randint(5, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = _outputs(lm, ids)
    recipe = get_recipe(recipe)
    summaries = miaotui.apply_recipe(lm, recipe, progress=False)
    packed = [m for m in lm.model.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == summaries[0]["quantized"] >= 2 * 4  # every block's linears
    got = _outputs(lm, ids)
    cos = F.cosine_similarity(got.flatten(), ref.flatten(), 0).item()
    # random tiny models: 4 bits measured >= 0.978 (gemma2, the lowest), 8 bits >= 0.999
    assert cos > (0.97 if recipe.name == "w4-g32" else 0.999), f"{model_type} {recipe.name}: cosine {cos}"
    save(lm, tmp_path / "out")
    back = miaotui.load(tmp_path / "out")
    assert back.recipe["name"] == recipe.name and back.kind == lm.kind
    assert torch.equal(_outputs(back, ids), got)
    info = miaotui.info(back)
    assert info["model_type"] == model_type and info["recipe"] == recipe.name
    assert info["linear_layers"][packed[0].layer_type] == len(packed)


GPTQ_CASES = [(t, "w4") for t in CORE] + [("llama", "w8"), ("gpt2", "w8")]


@pytest.mark.parametrize("model_type, scheme", GPTQ_CASES)
def test_gptq_every_family(model_type, scheme, tiny_models, tmp_path):
    """GPTQ runs block by block through every family's own block signature, and its result reloads."""
    from miaotui.calibration import Calibration
    from miaotui.evaluate.similarity import sample_text

    lm = miaotui.load(tiny_models[model_type], dtype="float32")
    ids = torch.randint(5, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = _outputs(lm, ids)
    recipe = Recipe(steps=(QuantizeConfig(scheme=scheme, algorithm="gptq", group_size=32),), name="g")
    calibration = Calibration(sample_text(), samples=4, seqlen=64)
    summary = miaotui.apply_recipe(lm, recipe, progress=False, calibration=calibration)[0]
    assert summary["algorithm"] == "gptq" and summary["quantized"] >= 8
    got = _outputs(lm, ids)
    assert F.cosine_similarity(got.flatten(), ref.flatten(), 0).item() > 0.95  # random weights; measured >= 0.968
    save(lm, tmp_path / "g")
    assert torch.equal(_outputs(miaotui.load(tmp_path / "g"), ids), got)


def test_gptq_targets_match_full_module_names(tiny_models):
    """`targets` name layers as the whole model does (model.layers.0.mlp.up_proj), under GPTQ as under RTN."""
    from miaotui.calibration import Calibration
    from miaotui.evaluate.similarity import sample_text
    from miaotui.quantize import PackedLinear

    lm = miaotui.load(tiny_models["llama"], dtype="float32")
    recipe = Recipe(steps=(QuantizeConfig(scheme="w8", algorithm="gptq", targets=("model.layers.*.mlp.*",)),))
    calibration = Calibration(sample_text(), samples=4, seqlen=64)
    summary = miaotui.apply_recipe(lm, recipe, progress=False, calibration=calibration)[0]
    packed = [n for n, m in lm.model.named_modules() if isinstance(m, PackedLinear)]
    assert summary["quantized"] == 6 and all(".mlp." in n for n in packed) and len(packed) == 6
