"""Shared fixtures: the reference data (../shared/data or $MIAOTUI_DATA) and tiny random models."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MIAOTUI_DATA", REPO.parent / "shared" / "data")).resolve()
REF_LLAMA = DATA / "ref-llama-16m"
WIKITEXT = DATA / "wikitext-2-raw" / "wiki.test.raw"
CALIB = DATA / "ref-llama-16m-calibration.txt"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MIAOTUI_NO_PROGRESS", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of `test` against `ref`, in dB."""
    ref, test = ref.float(), test.float()
    return (10 * torch.log10(ref.pow(2).mean() / (ref - test).pow(2).mean())).item()


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"reference data missing: {path} (set MIAOTUI_DATA to the shared data folder)")
    return path


@pytest.fixture(scope="session")
def ref_llama() -> Path:
    return _require(REF_LLAMA)


@pytest.fixture(scope="session")
def wikitext() -> Path:
    return _require(WIKITEXT)


@pytest.fixture(scope="session")
def minilm() -> Path:
    from miaotui.pipeline import default_model

    return Path(default_model())


def tiny_config(model_type: str):
    """A small random config of each supported family (2 blocks, hidden 64)."""
    from transformers import AutoConfig

    common = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128)
    decoder = dict(common, vocab_size=8192, num_key_value_heads=2, max_position_embeddings=256)
    kwargs = {
        "llama": decoder,
        "mistral": decoder,
        "qwen2": decoder,
        "qwen3": dict(decoder, head_dim=16),
        "phi3": dict(decoder, pad_token_id=0),
        "gemma": dict(decoder, head_dim=16),
        "gemma2": dict(decoder, head_dim=16),
        "gpt2": dict(vocab_size=8192, n_embd=64, n_layer=2, n_head=4, n_positions=256),
        "opt": dict(
            vocab_size=8192,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=64,
        ),
        "bert": dict(common, vocab_size=30522, max_position_embeddings=256),
        "roberta": dict(common, vocab_size=30522, max_position_embeddings=258, pad_token_id=0),
    }[model_type]
    return AutoConfig.for_model(model_type, **kwargs)


def build_tiny(model_type: str, folder: Path, tokenizer_source: Path) -> Path:
    """Save a seeded random model of `model_type` with a real tokenizer into `folder`."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from miaotui.arch import CAUSAL_LM, SUPPORTED

    config = tiny_config(model_type)
    torch.manual_seed(0)
    cls = AutoModelForCausalLM if SUPPORTED[model_type].kind == CAUSAL_LM else AutoModel
    model = cls.from_config(config)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, ref_llama, minilm):
    """model_type -> folder of a tiny random model, built once per session."""
    from miaotui.arch import CAUSAL_LM, SUPPORTED

    root = tmp_path_factory.mktemp("tiny")
    return {t: build_tiny(t, root / t, ref_llama if a.kind == CAUSAL_LM else minilm) for t, a in SUPPORTED.items()}


@pytest.fixture
def copy_folder(tmp_path):
    """Copy a model folder into the test's temp dir (to damage it safely)."""

    def _copy(src: Path, name: str = "model") -> Path:
        dst = tmp_path / name
        shutil.copytree(src, dst)
        for f in dst.iterdir():
            f.chmod(0o644)
        return dst

    return _copy


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory, minilm):
    """A seeded random BERT sentiment classifier (labels negative/positive) with a real tokenizer."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-cls") / "bert-cls"
    config = tiny_config("bert")
    config.num_labels = 2
    config.id2label, config.label2id = {0: "negative", 1: "positive"}, {"negative": 0, "positive": 1}
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm).save_pretrained(folder)
    return folder
