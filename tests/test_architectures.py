"""Every supported family: load, w8 and w8a8 quantization, save and exact reload, info."""

import pytest
import torch
import torch.nn.functional as F

import miaotui
from miaotui.arch import CAUSAL_LM, SUPPORTED
from miaotui.checkpoint import save
from miaotui.quantize import PackedLinear
from miaotui.recipe import get_recipe


def _outputs(lm, ids):
    with torch.no_grad():
        out = lm.model(input_ids=ids)
    return out.logits if lm.kind == CAUSAL_LM else out.last_hidden_state


@pytest.mark.parametrize("model_type", sorted(SUPPORTED))
@pytest.mark.parametrize("recipe", ["w8", "w8a8"])
def test_quantize_save_reload(model_type, recipe, tiny_models, tmp_path):
    lm = miaotui.load(tiny_models[model_type], dtype="float32")
    ids = torch.randint(5, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = _outputs(lm, ids)
    summaries = miaotui.apply_recipe(lm, get_recipe(recipe), progress=False)
    packed = [m for m in lm.model.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == summaries[0]["quantized"] >= 2 * 4  # every block's linears
    got = _outputs(lm, ids)
    cos = F.cosine_similarity(got.flatten(), ref.flatten(), 0).item()
    assert cos > 0.999, f"{model_type} {recipe}: cosine {cos}"
    save(lm, tmp_path / "out")
    back = miaotui.load(tmp_path / "out")
    assert back.recipe["name"] == recipe and back.kind == lm.kind
    assert torch.equal(_outputs(back, ids), got)
    info = miaotui.info(back)
    assert info["model_type"] == model_type and info["recipe"] == recipe
    assert info["linear_layers"][packed[0].layer_type] == len(packed)
