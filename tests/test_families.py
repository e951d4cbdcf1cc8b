"""Every family of tests/families.py end to end on a tiny random model: info; every built-in recipe (shapes
fitted to the tiny models) with exact reload, or its clear refusal where the family cannot take it; the engine's
greedy decoding against Hugging Face `generate` (decoders); the compressed-tensors export loaded back by
transformers; `miaotui serve` answering."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from families import CLASSIFIERS, CORE, ENCODER_TYPES, FAMILIES, MOE, model_type
from test_engine import hf_greedy
from test_serve import Server

import miaotui
from miaotui.calibration import Calibration
from miaotui.checkpoint import save
from miaotui.engine.generate import Engine
from miaotui.engine.sampling import SamplingParams
from miaotui.errors import MiaotuiError
from miaotui.evaluate.similarity import sample_text
from miaotui.experts import ExpertLinears
from miaotui.quantize import PackedLinear
from miaotui.recipe import BUILTIN_RECIPES, Recipe, step_from_dict

IDS = torch.randint(5, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
CLS_IDS = torch.randint(5, 1000, (32, 12), generator=torch.Generator().manual_seed(1))  # 2 logits a row: more rows


def _fitted(step: dict) -> dict:
    """A built-in recipe's step fitted to the tiny models: groups of 32 (64 input channels), a short distillation."""
    step = dict(step)
    if "group_size" in step:
        step["group_size"] = 32
    if step["type"] == "distill":
        step.update(steps=2, seqlen=32, batch=2)
    return step


RECIPES = {
    name: Recipe(steps=tuple(step_from_dict(_fitted(s)) for s in r["steps"]), name=name)
    for name, r in BUILTIN_RECIPES.items()
}
# compressed-tensors has no layout for: experts their checkpoints store as 3-D tensors; linear layers of other
# classes (GPT-2's Conv1D, Falcon's own Linear, whose forward reads the float weight)
NOT_EXPORTED = {
    "gpt_oss": "checkpoints keep the experts fused",
    "llama4_text": "checkpoints keep the experts fused",
    "gpt2": "is a Conv1D in GPT2LMHeadModel; compressed-tensors quantizes nn.Linear layers only",
    "falcon": "is a FalconLinear in FalconForCausalLM; compressed-tensors quantizes nn.Linear layers only",
}
# cosine of the outputs to the float model's, random tiny models (measured lowest: see each family's run); other
# compressing recipes 0.5 (lowest measured 0.63, 2:4 on gemma2); none after slimming (2 blocks: dropping one of
# them and 2 distillation steps leave little of a random model)
MIN_COSINE = {"w8": 0.999, "w4-rtn": 0.95, "w4-gptq": 0.95, "w8a8-smoothquant": 0.99, "sparse50-wanda": 0.7}


def _refused(family: str, recipe: str) -> bool:
    """Whether the family cannot take the recipe on this CPU (so it must be refused with a MiaotuiError): FP8
    needs a CUDA GPU; distillation a causal LM; expert slimming experts; channel slimming an MLP split by channels
    in blocks alike (not a mixture of experts)."""
    slim = recipe.startswith("slim-")
    return (
        recipe == "fp8"
        or (slim and not _is_decoder(family))
        or (recipe == "slim-experts50" and family not in MOE)
        or (recipe == "slim-mlp25" and family in MOE)
    )


def _is_decoder(family: str) -> bool:
    return family not in ENCODER_TYPES and family not in CLASSIFIERS


def _outputs(lm, ids=None) -> torch.Tensor:
    if ids is None:
        ids = CLS_IDS if lm.config.architectures[0].endswith("ForSequenceClassification") else IDS
    with torch.no_grad():
        out = lm.model(input_ids=ids)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


CALIBRATION = Calibration(sample_text(), samples=4, seqlen=64)  # its generated windows: sampled once per family


def _engine_matches_hf(lm) -> None:
    prompts = [IDS[0, :6].tolist(), IDS[1, :9].tolist(), IDS[0].tolist() + IDS[1, :8].tolist()]
    want = hf_greedy(lm, prompts, 6)
    engine = Engine(lm, max_batch=2, max_len=32)
    greedy = SamplingParams(max_tokens=6)
    assert [c.token_ids for c in engine.generate(prompts, greedy)] == want
    # a paged cache with room for one full sequence (2 blocks), prompts prefilled 4 tokens a step, the long
    # prompt's first block reused from the prefix cache the second time
    room = 2 * engine.runner.cache.block_size * engine.runner.cache.token_bytes()
    tight = Engine(lm, max_batch=2, max_len=32, kv_cache_memory=room, prefill_chunk=4)
    assert [c.token_ids for c in tight.generate(prompts + prompts[2:], greedy)] == want + want[2:]
    assert tight.scheduler.blocks.hit_tokens == tight.runner.cache.block_size
    assert tight.scheduler.blocks.used == 0


@pytest.fixture(scope="module")
def float_models():
    """family -> its float32 LoadedModel, loaded once (each case works on a deep copy)."""
    return {}


def _float(family, tiny_models, float_models):
    if family not in float_models:
        float_models[family] = miaotui.load(tiny_models[family], dtype="float32")
    return float_models[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_info_and_engine(family, tiny_models, float_models):
    lm = _float(family, tiny_models, float_models)
    info = miaotui.info(lm)
    assert info["model_type"] == model_type(family)
    assert info["kind"] == ("causal-lm" if _is_decoder(family) else "encoder")
    assert info["linear_layers"]["float_linear"] >= 2 * 4
    if family in MOE:
        assert info["experts"]["modules"] >= 1 and info["experts"]["per_token"] >= 1
    if _is_decoder(family):
        _engine_matches_hf(lm)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_recipe_and_reload(family, recipe, tiny_models, float_models, tmp_path):
    base = _float(family, tiny_models, float_models)
    lm = copy.deepcopy(base)
    steps = RECIPES[recipe]
    if _refused(family, recipe):
        with pytest.raises(MiaotuiError, match=r"^(quantize|slim|distill): "):
            miaotui.apply_recipe(lm, steps, progress=False, calibration=CALIBRATION, teacher=base)
        return
    summaries = miaotui.apply_recipe(lm, steps, progress=False, calibration=CALIBRATION, teacher=base)
    last, kind = summaries[-1], steps.steps[-1].to_dict()["type"]
    if kind == "prune":
        assert last["pruned"] >= 8 and abs(last["overall_sparsity"] - 0.5) < 0.01
    elif kind == "quantize":
        packed = [m for m in lm.model.modules() if isinstance(m, PackedLinear)]
        assert len(packed) == last["quantized"] >= 8
    if family in MOE and not recipe.startswith("slim-"):  # every expert's weights were reached
        experts = [m for m in lm.model.modules() if isinstance(m, ExpertLinears)]
        assert experts and not [n for n, p in lm.model.named_parameters() if p.dim() == 3]
        reports = [s["experts"] for s in summaries if "experts" in s]  # the calibrated steps report
        if recipe in ("w4-gptq", "w8a8-smoothquant", "sparse50-wanda"):
            assert reports  # routed contract: every expert sees every token; the dense one: its routed ones
            assert all(r["statistics_tokens_per_expert"] >= 128 or "warning" in r for r in reports)
            if all(m.routed for m in experts):
                assert all(r["statistics_tokens_per_expert"] == 4 * 64 for r in reports)
    got = _outputs(lm)
    assert torch.isfinite(got).all()
    if not recipe.startswith("slim-"):
        cos = F.cosine_similarity(got.flatten(), _outputs(base).flatten(), 0).item()
        assert cos > MIN_COSINE.get(recipe, 0.5), f"{family} {recipe}: cosine {cos}"
    save(lm, tmp_path / "out")
    back = miaotui.load(tmp_path / "out")
    assert torch.equal(_outputs(back), got)
    if _is_decoder(family) and recipe == "w4-rtn":
        _engine_matches_hf(back)


@pytest.mark.parametrize("family", [f for f in FAMILIES if _is_decoder(f)])
def test_export_loads_in_transformers(family, tiny_models, float_models, tmp_path):
    from transformers import AutoModelForCausalLM

    lm = copy.deepcopy(_float(family, tiny_models, float_models))
    miaotui.apply_recipe(lm, RECIPES["w8"], progress=False)
    save(lm, tmp_path / "q")
    if family in NOT_EXPORTED:  # refused by name, nothing written
        with pytest.raises(MiaotuiError, match=NOT_EXPORTED[family]):
            miaotui.export(tmp_path / "q", tmp_path / "ct")
        assert not (tmp_path / "ct").exists()
        return
    miaotui.export(tmp_path / "q", tmp_path / "ct")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(input_ids=IDS).logits
    ours = _outputs(miaotui.load(tmp_path / "q", dtype="float32"))
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() > 0.95
    assert F.cosine_similarity(theirs.flatten(), ours.flatten(), 0) > 0.9999


# The server is the same code for every family, on the engine test_info_and_engine checks for each one; a server
# process costs seconds, so it answers for the core decoders and every mixture of experts
@pytest.mark.parametrize("family", [f for f in FAMILIES if _is_decoder(f) and (f in CORE or f in MOE)])
def test_serve_answers(family, tiny_models, float_models, tmp_path):
    lm = copy.deepcopy(_float(family, tiny_models, float_models))
    miaotui.apply_recipe(lm, RECIPES["w4-rtn"], progress=False)
    save(lm, tmp_path / "q")
    server = Server(tmp_path / "log", "--no-compile", "--max-batch", "4", model=tmp_path / "q")  # compiled: test_engine
    try:
        out = server.openai().completions.create(model="q", prompt="The city of", max_tokens=4, temperature=0)
        assert out.usage.completion_tokens == 4 and out.choices[0].finish_reason == "length"
    finally:
        server.stop()
