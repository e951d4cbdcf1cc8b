"""Structured slimming on every supported family: smaller shapes, a consistent config, a checkpoint that plain
transformers loads with the same outputs, a working KV cache; impossible requests refused before any work."""

import pytest
import torch
from families import CORE
from transformers import AutoModel, AutoModelForCausalLM

import miaotui
from miaotui.arch import CAUSAL_LM
from miaotui.calibration import Calibration
from miaotui.checkpoint import save
from miaotui.errors import MiaotuiError
from miaotui.evaluate.similarity import sample_text
from miaotui.recipe import Recipe, get_recipe
from miaotui.sparsity.structured import SlimConfig

# the families whose attention takes head counts and head_dim from the config (heads can go)
HEADS = ("gemma", "gemma2", "llama", "mistral", "phi3", "qwen2", "qwen3")
SIZE_ATTR = {"gpt2": "n_inner", "opt": "ffn_dim"}  # else intermediate_size
CASES = (
    [(t, SlimConfig(mlp=0.25)) for t in CORE]
    + [(t, SlimConfig(heads=0.5)) for t in HEADS]
    + [(t, SlimConfig(heads=0.5, head_unit="group")) for t in ("gemma2", "phi3", "qwen2")]  # bias, fused, 1 KV
    + [(t, SlimConfig(blocks=1)) for t in CORE]
)
IDS = torch.randint(5, 1000, (2, 16), generator=torch.Generator().manual_seed(0))


def _calib():
    return Calibration(sample_text(), samples=4, seqlen=64)


def _outputs(model, kind, ids=IDS):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if kind == CAUSAL_LM else out.last_hidden_state


def _slim(lm, cfg):
    return miaotui.apply_recipe(lm, Recipe(steps=(cfg,)), progress=False, calibration=_calib())[0]


def _case_id(case):
    t, cfg = case
    what = f"mlp{cfg.mlp}" if cfg.mlp else f"heads{cfg.heads}-{cfg.head_unit}" if cfg.heads else f"blocks{cfg.blocks}"
    return f"{t}-{what}"


@pytest.mark.parametrize("model_type, cfg", CASES, ids=[_case_id(c) for c in CASES])
def test_slim_reloads_in_plain_transformers(model_type, cfg, tiny_models, tmp_path):
    lm = miaotui.load(tiny_models[model_type], dtype="float32")
    config = lm.config
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    summary = _slim(lm, cfg)
    before, after = summary["parameters"]
    assert after < before == summary["parameters"][0]
    assert after == sum(p.numel() for p in lm.model.parameters())
    if cfg.mlp:
        size_attr = SIZE_ATTR.get(model_type, "intermediate_size")
        assert getattr(config, size_attr) == summary["mlp_channels"][1] == 96 * (2 if model_type == "gpt2" else 1)
    if cfg.heads:
        assert config.head_dim == 16
        expected = (heads // 2, kv) if cfg.head_unit == "query" else (heads // 2, kv // 2)
        assert (config.num_attention_heads, config.num_key_value_heads) == expected
    if cfg.blocks:
        assert config.num_hidden_layers == 1 and len(summary["dropped_blocks"]) == 1
        assert len(getattr(config, "layer_types", None) or [0]) == 1
    got = _outputs(lm.model, lm.kind)
    assert torch.isfinite(got).all()
    save(lm, tmp_path / "slim")
    cls = AutoModelForCausalLM if lm.kind == CAUSAL_LM else AutoModel
    plain = cls.from_pretrained(tmp_path / "slim", dtype=torch.float32).eval()
    assert sum(p.numel() for p in plain.parameters()) == after
    torch.testing.assert_close(_outputs(plain, lm.kind), got, rtol=0, atol=1e-5)  # measured: identical
    assert torch.equal(_outputs(miaotui.load(tmp_path / "slim").model, lm.kind), got)
    if lm.kind == CAUSAL_LM:  # the KV cache follows the renumbered blocks: cached decoding == full forward
        with torch.no_grad():
            out = lm.model(input_ids=IDS[:, :12], use_cache=True)
            step = lm.model(input_ids=IDS[:, 12:13], past_key_values=out.past_key_values, use_cache=True)
        torch.testing.assert_close(step.logits[:, -1], got[:, 12], rtol=1e-4, atol=1e-4)


def test_slim_keeps_the_important_parts(tiny_models):
    """The removed blocks and channels are the ones calibration ranked lowest."""
    lm = miaotui.load(tiny_models["llama"], dtype="float32")
    summary = _slim(lm, SlimConfig(blocks=1))
    change = summary["block_change"]
    assert summary["dropped_blocks"] == [change.index(min(change))]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mlp": 1.0}, "mlp must be a fraction in \\[0, 1\\)"),
        ({"heads": -0.1}, "heads must be a fraction"),
        ({"mlp": True}, "mlp must be a fraction"),
        ({"heads": 0.5, "head_unit": "kv"}, "head_unit 'kv' is not supported"),
        ({"blocks": -1}, "blocks must be a whole number >= 0"),
        ({"blocks": 1.5}, "blocks must be a whole number"),
        ({"mlp": 0.5, "round_to": 0}, "round_to must be a whole number >= 1"),
        ({}, "nothing to remove"),
    ],
)
def test_slim_config_validates(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SlimConfig(**kwargs)


@pytest.mark.parametrize(
    "model_type, cfg, message",
    [
        ("llama", SlimConfig(blocks=2), "removing 2 blocks of 2 leaves none"),
        ("gpt2", SlimConfig(heads=0.5), "heads of this gpt2 cannot be slimmed: the attention does not take its head"),
        ("bert", SlimConfig(heads=0.25), "heads of this bert cannot be slimmed"),
        ("llama", SlimConfig(heads=0.1), "removes 0 of the 2 query heads in each of the 2 KV groups"),
        ("llama", SlimConfig(heads=0.9), "removes 2 of the 2 query heads"),
        ("qwen3", SlimConfig(heads=0.9, head_unit="group"), "removes 2 of 2 KV groups"),
        ("llama", SlimConfig(mlp=0.01), "mlp 0.01 removes no channel of 128"),
    ],
)
def test_impossible_slimming_is_refused_before_any_work(model_type, cfg, message, tiny_models):
    lm = miaotui.load(tiny_models[model_type], dtype="float32")
    before = _outputs(lm.model, lm.kind)
    with pytest.raises(MiaotuiError, match=message):
        _slim(lm, cfg)
    assert torch.equal(_outputs(lm.model, lm.kind), before)


def test_multi_head_attention_needs_whole_groups(tiny_models):
    lm = miaotui.load(tiny_models["llama"], dtype="float32")
    lm.model = AutoModelForCausalLM.from_config(type(lm.config)(**{**lm.config.to_dict(), "num_key_value_heads": 4}))
    with pytest.raises(MiaotuiError, match="use head_unit: group"):
        _slim(lm, SlimConfig(heads=0.5))
    assert _slim(lm, SlimConfig(heads=0.5, head_unit="group"))["heads"] == [[4, 4], [2, 2]]


def test_slim_refuses_quantized_layers_and_missing_data(tiny_models):
    lm = miaotui.load(tiny_models["llama"], dtype="float32")
    with pytest.raises(ValueError, match="calibration text"):
        SlimConfig(mlp=0.25).apply(lm)
    miaotui.apply_recipe(lm, get_recipe("w8"), progress=False)
    with pytest.raises(MiaotuiError, match="slim before quantizing"):
        _slim(lm, SlimConfig(mlp=0.25))


def test_gpt2_inverse_layer_scaling_refuses_dropping_blocks(tiny_models):
    lm = miaotui.load(tiny_models["gpt2"], dtype="float32")
    lm.config.scale_attn_by_inverse_layer_idx = True
    with pytest.raises(MiaotuiError, match="scales attention by 1/layer index"):
        _slim(lm, SlimConfig(blocks=1))
