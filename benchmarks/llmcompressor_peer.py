"""llm-compressor compresses a model on calibration windows it is handed: bench_quality's side-by-side rows.

Runs in its own environment (llm-compressor pins its own compressed-tensors), with the library's defaults for
each method, as its user would write the recipe:

    python3 -m venv .venv-llmc && .venv-llmc/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1
    .venv-llmc/bin/python benchmarks/llmcompressor_peer.py MODEL WINDOWS.pt RECIPE OUT

WINDOWS.pt holds a (windows, seqlen) int64 tensor of token ids (the exact windows miaotui calibrates on).
RECIPE is one of NAMES, named like miaotui's built-in recipe it stands beside. OUT receives the
model as llm-compressor saves it (compressed-tensors; pruned models dense with their zeros) and `seconds.txt`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

IGNORE = ["lm_head"]
NAMES = (  # miaotui recipes llm-compressor stands beside (miaotui's w4 is asymmetric, groups of 128)
    "w4-gptq",
    "w4-awq",
    "w8a8-gptq",
    "w8a8-smoothquant",
    "w8a8-smoothquant-gptq",
    "sparse50-wanda",
    "sparse50-sparsegpt",
    "sparse24-sparsegpt",
)


def modifiers(name: str) -> list:
    """The llm-compressor recipe for miaotui's recipe `name`, with the library's defaults otherwise."""
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    w4, w8a8 = (
        {"targets": "Linear", "scheme": "W4A16_ASYM", "ignore": IGNORE},
        {"targets": "Linear", "scheme": "W8A8", "ignore": IGNORE},
    )
    # the pruning modifiers name a layer with a trailing dot ("lm_head.") and iterate a targets string letter by
    # letter (0.14): a list and a regular expression, as their warning advises
    prune = {"sparsity": 0.5, "targets": ["Linear"], "ignore": ["re:.*lm_head"]}
    return {
        "w4-gptq": lambda: [GPTQModifier(**w4)],
        "w4-awq": lambda: [AWQModifier(), QuantizationModifier(**w4)],
        "w8a8-gptq": lambda: [GPTQModifier(**w8a8)],
        "w8a8-smoothquant": lambda: [SmoothQuantModifier(smoothing_strength=0.5), QuantizationModifier(**w8a8)],
        "w8a8-smoothquant-gptq": lambda: [SmoothQuantModifier(smoothing_strength=0.5), GPTQModifier(**w8a8)],
        "sparse50-wanda": lambda: [WandaPruningModifier(**prune)],
        "sparse50-sparsegpt": lambda: [SparseGPTModifier(**prune)],
        "sparse24-sparsegpt": lambda: [SparseGPTModifier(mask_structure="2:4", **prune)],
    }[name]()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("windows", help="a torch file holding a (windows, seqlen) int64 tensor of token ids")
    p.add_argument("recipe", choices=NAMES)
    p.add_argument("out")
    a = p.parse_args()
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not torch.accelerator.is_available():
        # AWQ (0.14) pins its cached activations for faster copies to an accelerator, unconditionally, which
        # fails on a machine without one; pinning changes no value
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    ids = torch.load(a.windows, weights_only=True)  # (W, S)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype="auto")
    t0 = time.perf_counter()
    oneshot(
        model=model,
        dataset=data,
        recipe=modifiers(a.recipe),
        max_seq_length=ids.shape[1],
        num_calibration_samples=ids.shape[0],
    )
    seconds = time.perf_counter() - t0
    model.save_pretrained(a.out, save_compressed=True)
    AutoTokenizer.from_pretrained(a.model).save_pretrained(a.out)
    (Path(a.out) / "seconds.txt").write_text(f"{seconds:.1f}\n")


if __name__ == "__main__":
    main()
