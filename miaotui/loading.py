"""Load a Hugging Face model and its tokenizer from a local folder or a hub id, safely.

Safetensors only unless the caller opts into pickle checkpoints (then read with `weights_only=True`);
`trust_remote_code` stays off unless asked.

>>> import os
>>> data = os.environ.get("MIAOTUI_DATA", "../shared/data")
>>> m = load_pretrained(f"{data}/ref-llama-16m", dtype="float32")  # doctest: +SKIP
>>> m.kind, m.dtype  # doctest: +SKIP
('causal-lm', torch.float32)
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from miaotui.arch import CAUSAL_LM, ArchInfo, context_length, discover, is_classifier, kind_of
from miaotui.errors import MiaotuiError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' own info logs and loading bars; miaotui reports what matters itself."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


@dataclass
class LoadedModel:
    """A model ready to run: the module, its tokenizer and what miaotui knows about it."""

    model: nn.Module
    tokenizer: Any
    arch: ArchInfo
    source: str
    recipe: dict | None = None  # the recipe applied to it, when it is an optimized model
    meta: dict = field(default_factory=dict)  # the sidecar of an optimized folder

    @property
    def kind(self) -> str:
        return self.arch.kind

    @property
    def config(self):
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int | None:
        return context_length(self.config, self.arch)


def resolve_dtype(dtype: str | torch.dtype | None, config=None) -> torch.dtype:
    """'auto' (the checkpoint's dtype), a name like 'bf16', or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        stored = getattr(config, "dtype", None)
        if isinstance(stored, str):
            stored = DTYPES.get(stored)
        return stored if isinstance(stored, torch.dtype) and stored in DTYPES.values() else torch.float32
    if dtype not in DTYPES:
        raise MiaotuiError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or 'auto' (cuda when available); refuses a device that is not there."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise MiaotuiError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MiaotuiError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise MiaotuiError(f"unsupported device {device!r}; use cpu or cuda")
    return dev


def check_local_folder(path: Path, allow_pickle: bool) -> None:
    """Refuse early a folder that is not a usable Hugging Face model."""
    if not path.is_dir():
        raise MiaotuiError(f"{path} is not a folder")
    if not (path / "config.json").is_file():
        raise MiaotuiError(f"{path} has no config.json: not a Hugging Face model folder")
    if any(path.glob("*.safetensors")):
        return
    if any(f for pattern in _PICKLE_WEIGHTS for f in path.glob(pattern)):
        if allow_pickle:
            return
        raise MiaotuiError(
            f"{path} has only pickle weights (*.bin/*.pt), which can run code when loaded; "
            "convert them to safetensors or pass --allow-pickle to read them with weights_only=True"
        )
    raise MiaotuiError(f"{path} has no weights (no *.safetensors file)")


def refused_by_safe_unpickler(error: BaseException) -> bool:
    """Whether torch.load(weights_only=True) refused a pickle (it holds code or non-tensor objects), as `error`
    or anywhere in its cause chain."""
    while error is not None:
        if "weights only load failed" in str(error).lower() or "weights_only" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def refused_pickle_file(folder: Path) -> Path | None:
    """The first pickle checkpoint in `folder` that the safe unpickler refuses (it runs none of its code)."""
    for file in sorted(f for pattern in _PICKLE_WEIGHTS for f in folder.glob(pattern)):
        try:
            torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
        except Exception as e:  # refused, or unreadable for another reason (then not the file refused)
            if refused_by_safe_unpickler(e):
                return file
    return None


def locate(source: str | os.PathLike) -> tuple[str, bool]:
    """(source, is_local): a local folder as a string path, or a hub id."""
    path = Path(source).expanduser()
    if path.exists():
        return str(path), True
    text = str(source)
    if not _HUB_ID.match(text) or text.startswith((".", "~")):
        raise MiaotuiError(f"no such folder: {source}")
    return text, False


def model_class(config, kind: str):
    """The transformers auto class that builds this model with its own head."""
    if kind == CAUSAL_LM:
        return AutoModelForCausalLM
    return AutoModelForSequenceClassification if is_classifier(config) else AutoModel


def pad_classifier(model: nn.Module, tokenizer) -> None:
    """Tell a decoder's classification head the pad token, without which it cannot find each row's last token."""
    config = model.config
    if is_classifier(config) and getattr(config, "pad_token_id", None) is None and tokenizer is not None:
        config.pad_token_id = tokenizer.pad_token_id


def build_arch(model: nn.Module, kind: str, source) -> ArchInfo:
    """The model's ArchInfo, or a MiaotuiError saying what could not be found."""
    try:
        return discover(model, kind)
    except MiaotuiError as e:
        raise MiaotuiError(f"{source}: {e}") from e


def load_config(source: str, *, trust_remote_code: bool = False, revision: str | None = None):
    """The model's transformers config, with clear errors for unknown or unreadable ones."""
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
    except ValueError as e:
        raise MiaotuiError(f"cannot read the config of {source}: {str(e).splitlines()[0]}") from e
    except OSError as e:
        raise MiaotuiError(
            f"cannot load {source!r}: not a local folder, and the Hugging Face Hub did not provide it "
            f"(offline, or no such model). {str(e).splitlines()[0]}"
        ) from e


def load_tokenizer(source: str, kind: str, *, trust_remote_code: bool = False, revision: str | None = None):
    """The tokenizer, with a pad token set for causal LMs that have none (batched inputs need one)."""
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError, TypeError) as e:
        raise MiaotuiError(f"cannot load the tokenizer of {source}: {str(e).splitlines()[0]}") from e
    if tok.pad_token_id is None and tok.eos_token is not None:  # batches need one (decoders often have none)
        tok.pad_token = tok.eos_token
    return tok


def load_pretrained(
    source: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = "cpu",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> LoadedModel:
    """Load a plain Hugging Face checkpoint (local folder, sharded or not, or hub id)."""
    src, is_local = locate(source)
    if is_local:
        check_local_folder(Path(src), allow_pickle)
    dev = resolve_device(device)
    with quiet_transformers():
        config = load_config(src, trust_remote_code=trust_remote_code, revision=revision)
    kind = kind_of(config)
    cls = model_class(config, kind)
    torch_dtype = resolve_dtype(dtype, config)
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(
                src,
                dtype=torch_dtype,
                use_safetensors=None if allow_pickle else True,
                trust_remote_code=trust_remote_code,
                revision=revision,
                output_loading_info=True,
            )
    except (OSError, ValueError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError, SafetensorError) as e:
        if refused_by_safe_unpickler(e):
            file = refused_pickle_file(Path(src)) if is_local else None
            raise MiaotuiError(
                f"{file or f'a pickle checkpoint of {source}'} was refused by the safe unpickler (weights_only=True): "
                "it contains code or objects other than tensors; convert a checkpoint you trust to safetensors"
            ) from e
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MiaotuiError(f"cannot load the weights of {source}: {first}") from e
    missing = [k for k in info.get("missing_keys", []) if not k.endswith(("position_ids", "inv_freq"))]
    if missing:
        raise MiaotuiError(
            f"the weights in {source} do not match its config: {len(missing)} tensors missing (e.g. {missing[0]})"
        )
    with quiet_transformers():
        tokenizer = load_tokenizer(src, kind, trust_remote_code=trust_remote_code, revision=revision)
    pad_classifier(model, tokenizer)
    model.eval().to(dev)
    return LoadedModel(model=model, tokenizer=tokenizer, arch=build_arch(model, kind, source), source=str(source))
