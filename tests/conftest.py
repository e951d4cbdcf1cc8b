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
if os.environ.get("PYTEST_XDIST_WORKER"):  # one of several test processes: one thread each, subprocesses too
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
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


def build_tiny(family: str, folder: Path, tokenizer_source: Path) -> Path:
    """Save a seeded random model of `family` (tests/families.py) with a real tokenizer into `folder`."""
    from families import ENCODER_TYPES, tiny_config
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    config = tiny_config(family)
    torch.manual_seed(0)
    if family in ENCODER_TYPES:
        cls = AutoModel
    else:
        cls = AutoModelForSequenceClassification if family.endswith("-cls") else AutoModelForCausalLM
    model = cls.from_config(config)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(folder)
    return folder


class _TinyModels(dict):
    """family -> folder of a tiny random model, each built on first use."""

    def __init__(self, root: Path, decoder_tokenizer: Path, encoder_tokenizer: Path):
        super().__init__()
        self.root, self.tokenizers = root, (decoder_tokenizer, encoder_tokenizer)

    def __missing__(self, family: str) -> Path:
        from families import ENCODER_TYPES

        tokenizer = self.tokenizers[family in ENCODER_TYPES]
        self[family] = build_tiny(family, self.root / family, tokenizer)
        return self[family]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, ref_llama, minilm):
    """family -> folder of a tiny random model (tests/families.py), built once per session."""
    return _TinyModels(tmp_path_factory.mktemp("tiny"), ref_llama, minilm)


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
    from families import tiny_config
    from transformers import AutoTokenizer, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-cls") / "bert-cls"
    config = tiny_config("bert")
    config.num_labels = 2
    config.id2label, config.label2id = {0: "negative", 1: "positive"}, {"negative": 0, "positive": 1}
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm).save_pretrained(folder)
    return folder
