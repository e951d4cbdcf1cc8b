"""Export an optimized folder for Hugging Face transformers and vLLM: compressed-tensors, or a plain folder.

The packed codes are copied, never re-quantized: each packed layer maps to a compressed-tensors scheme that
dequantizes to the same weights (`_layer_scheme`). Pruned layers have no compressed-tensors format left (see below):
they are written as float weights with their zeros.

| miaotui layer | compressed-tensors scheme | format |
|---|---|---|
| int8_weight_only | int8 weights, symmetric, per channel | pack-quantized (vLLM's W8A16 path) |
| int8_dynamic | int8 weights per channel x int8 activations per token, dynamic | int-quantized |
| fp8_dynamic | e4m3 weights per channel x e4m3 activations per token, dynamic | float-quantized |
| int4_weight_only, int3_weight_only | groups, integer zero points (symmetric when all are 0) | pack-quantized |
| sparse_bitmask, sparse_2to4 beside quantized layers | none: float weights with zeros, in `ignore` | (dense) |
| sparse_bitmask, sparse_2to4 only | refused: export `--dense` (`export_dense`) | - |
| quantized after a prune step with layer: dense | as its quantized layer; zeros stay at the zero point | as above |
| a quantized layer transformers builds as another class (GPT-2's Conv1D, Falcon's Linear) | refused | - |

Sparse formats: compressed-tensors removed its sparse-bitmask, sparse-24-bitmask and marlin-24 compressors (the
pinned version keeps only their config classes and writes an empty `sparsity_config`), transformers 5 no longer
reads a sparsity_config (with only one, loading fails), and vLLM turned its 2:4 scheme into one that raises
"Sparse24 models are no longer supported by vLLM" for any checkpoint that declares 2:4 sparsity. So exports never
carry a sparsity_config; the summary's `sparsity` reports the zeros stored (shares and whether they are 2:4).
GPT-2: compressed-tensors attaches quantization to `nn.Linear` and `nn.Embedding` modules only and transformers keeps
GPT-2's `Conv1D` layers, so transformers would drop the codes and leave those weights uninitialized (checked).
`export_dense` writes the pruned model (Conv1D weights back in their (in, out) layout) as a plain folder.

Our int4 layers store w = (q - 8) * scale + zero with a float zero; compressed-tensors stores
w = (q_signed - zero_point) * scale with an integer zero point, so zero_point = -zero / scale. RTN and GPTQ
zeros are whole steps, rounded to the scale's dtype; a layer whose zeros are not (within that rounding) is
refused instead of being exported approximately. W8A8: activations per token, symmetric int8 on both sides
(compressed-tensors' reference scales by max/127.5, miaotui and vLLM by max/127), so logits differ only by that
rounding.

>>> export_compressed_tensors("ref-w4", "ref-w4-ct")["schemes"]  # doctest: +SKIP
{'w4-g128-asym': 42}
>>> export_dense("ref-sparse50", "ref-sparse50-hf")["sparsity"]  # doctest: +SKIP
{'layers': 42, 'zeros': 0.5, 'pattern': 'unstructured'}
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file
from transformers.pytorch_utils import Conv1D

from miaotui import hub_names
from miaotui.atomic import atomic_dir, check_out_dir
from miaotui.checkpoint import SIDECAR, WEIGHTS, is_optimized_folder, load_optimized
from miaotui.errors import MiaotuiError
from miaotui.experts import ExpertLinears
from miaotui.loading import model_class, quiet_transformers
from miaotui.modules import STRUCTURAL_MODULES, linear_weight
from miaotui.quantize import PackedLinear
from miaotui.sparsity.layer import SparseLinear

FORMATS = ("compressed-tensors", "dense")
COMPRESSED_TENSORS = "compressed-tensors==0.20.0"  # the version tested; pyproject's `export` extra
ZERO_TOLERANCE = 0.05  # in quantization steps: zeros rounded to bf16 stay within 8 * 2^-9 = 0.016 of a step
ROW_PARALLEL = ("o_proj", "down_proj", "out_proj", "fc2", "c_proj", "dense")  # vLLM splits their input features
NOT_COPIED = {WEIGHTS, SIDECAR, "config.json", "report.md", "report.json", "report.html"}
NO_SPARSE = (
    f"{COMPRESSED_TENSORS} has no sparse format to describe it: its sparse-bitmask and sparse-24-bitmask "
    "compressors were removed (in 0.15), transformers 5 no longer reads a sparsity_config, and vLLM refuses "
    "2:4 checkpoints ('Sparse24 models are no longer supported'). Export a plain Hugging Face folder with "
    "--dense (the zeros stored as weights; transformers and vLLM load it as it is), or quantize after pruning "
    "(a prune step with layer: dense, then a quantize step, as recipe sparse24-w4 does) and export the codes"
)
NOT_LINEAR = (
    f"{COMPRESSED_TENSORS} attaches quantization to nn.Linear and nn.Embedding modules, and transformers builds "
    "this layer as its own class, so it would drop the layer's codes and leave its weight uninitialized. Serve "
    "the optimized folder with miaotui, or export an un-quantized (e.g. pruned) model with --dense"
)


def _ct():
    try:
        import compressed_tensors.compressors.pack_quantized.helpers as helpers
        import compressed_tensors.quantization as quantization
    except ImportError as e:
        raise MiaotuiError(
            f"export to compressed-tensors needs the compressed-tensors package: pip install '{COMPRESSED_TENSORS}' "
            "(or pip install 'miaotui[export]')"
        ) from e
    return quantization, helpers


def _int_groups(name: str, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int):
    """Codes q (N, K) in [0, 2^bits) with w = (q - mid) * scale + zero -> signed codes and integer zero points."""
    mid = 2 ** (bits - 1)
    signed = (q.to(torch.int16) - mid).to(torch.int8)  # (N, K)
    if not torch.any(zeros != 0):
        return signed, None
    zp = -zeros.float() / scales.float()  # (N, G)
    zp_int = torch.round(zp)
    off = (zp - zp_int).abs().max().item()
    if off > ZERO_TOLERANCE or zp_int.min() < -mid or zp_int.max() > mid - 1:
        raise MiaotuiError(
            f"layer {name}: its zero points are not whole quantization steps (off by up to {off:.3f} step); "
            "compressed-tensors stores integer zero points, so this layer cannot be exported exactly"
        )
    return signed, zp_int.to(torch.int8)


def _shape(layer: PackedLinear) -> torch.Tensor:
    return torch.tensor([layer.out_features, layer.in_features])


def _layer_scheme(name: str, layer: PackedLinear, pack):
    """(scheme key, weight args, input-activation args, format, tensors by local name) of one packed layer."""
    kind = layer.layer_type
    if kind in ("int8_weight_only", "int8_dynamic"):
        scale = layer.scale[:, None]  # (N, 1)
        if kind == "int8_dynamic":
            weights = dict(num_bits=8, type="int", symmetric=True, strategy="channel")
            acts = dict(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
            return ("w8a8", weights, acts, "int-quantized", {"weight": layer.qweight, "weight_scale": scale})
        weights = dict(num_bits=8, type="int", symmetric=True, strategy="channel")
        tensors = {"weight_packed": pack(layer.qweight, 8), "weight_scale": scale, "weight_shape": _shape(layer)}
        return ("w8", weights, None, "pack-quantized", tensors)
    if kind == "fp8_dynamic":
        weights = dict(num_bits=8, type="float", symmetric=True, strategy="channel")
        acts = dict(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True)
        tensors = {"weight": layer.qweight, "weight_scale": layer.scale[:, None]}  # (N, K) e4m3, (N, 1) fp32
        return ("fp8", weights, acts, "float-quantized", tensors)
    if kind in ("int4_weight_only", "int3_weight_only"):
        bits = layer.BITS
        q = layer.codes()  # (N, K) uint8 in [0, 2^bits)
        signed, zp = _int_groups(name, q, layer.scales, layer.zeros, bits)
        weights = dict(num_bits=bits, type="int", symmetric=zp is None, strategy="group", group_size=layer.group_size)
        tensors = {
            "weight_packed": pack(signed, bits),
            "weight_scale": layer.scales,
            "weight_shape": _shape(layer),
        }
        if zp is not None:
            tensors["weight_zero_point"] = pack(zp, bits, packed_dim=0)
        key = f"w{bits}-g{layer.group_size}-{'sym' if zp is None else 'asym'}"
        return (key, weights, None, "pack-quantized", tensors)
    raise MiaotuiError(
        f"layer {name} ({kind}) has no compressed-tensors equivalent; export supports int8/fp8/int4/int3"
    )


def _check_tp(lm, layers: dict[str, PackedLinear], tp: int) -> None:
    """Refuse a model that vLLM cannot split over `tp` ranks: heads, widths and int groups per rank."""
    cfg = lm.model.config.get_text_config()
    heads = getattr(cfg, "num_attention_heads", None)
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    if heads and heads % tp:
        raise MiaotuiError(f"--tp {tp}: the {heads} attention heads do not split evenly over {tp} ranks")
    if kv and kv % tp and tp % kv:
        raise MiaotuiError(f"--tp {tp}: {kv} key/value heads neither split over nor replicate onto {tp} ranks")
    for name, layer in layers.items():
        group = getattr(layer, "group_size", None)
        if name.rsplit(".", 1)[-1] in ROW_PARALLEL:  # input features split across ranks
            if layer.in_features % tp or (group and (layer.in_features // tp) % group):
                raise MiaotuiError(
                    f"--tp {tp}: layer {name} has {layer.in_features} input features; each rank needs a whole "
                    f"number of groups of {group}" + ("" if group else " (and an equal share)")
                )
        elif layer.out_features % tp:
            raise MiaotuiError(f"--tp {tp}: layer {name} has {layer.out_features} outputs, not divisible by {tp}")


def _quantized(module: nn.Module) -> bool:
    """A layer with low-bit codes (a pruned layer keeps float weights: it is not)."""
    return isinstance(module, PackedLinear) and not isinstance(module, SparseLinear)


def _float_weight(module: nn.Module) -> torch.Tensor:
    """(N, K) float weight of a float or pruned layer."""
    return module.dense_weight() if isinstance(module, SparseLinear) else linear_weight(module)


def _under(name: str, modules: dict) -> bool:
    return any(name.startswith(f"{m}.") for m in modules)


def _expert_pieces(model: nn.Module, experts: dict[str, ExpertLinears]) -> list[tuple[str, nn.Module]]:
    """(checkpoint module name, its packed layer or float weight) of every expert projection, split as the
    family's checkpoints store them (`miaotui.hub_names`)."""
    pieces = []
    for name, module in experts.items():
        parts = hub_names.expert_parts(
            model, name, module.num_experts, module.up_name, module.up_features, module.in_features
        )
        for hub, e, proj, rows in parts:
            layer = getattr(module.experts[e], proj)
            if not _quantized(layer):
                pieces.append((hub, _float_weight(layer)[rows]))
            elif torch.equal(rows, torch.arange(layer.out_features)):
                pieces.append((hub, layer))
            else:
                pieces.append((hub, layer.take(0, rows)))
    return pieces


def _float_tensors(model: nn.Module, layers: dict, experts: dict, skeleton: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor but the packed layers' and the experts', tied ones once (transformers re-ties them), under
    the family's checkpoint names. Pruned layers give their dense weight, in the layout of the layer they
    replaced ((in, out) for a Conv1D)."""
    tensors, seen = {}, set()
    for key, t in model.state_dict().items():
        storage = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        owner, _, leaf = key.rpartition(".")
        if owner in layers or _under(key, experts) or storage in seen:
            continue
        seen.add(storage)
        if leaf == "weight" and isinstance(model.get_submodule(owner), SparseLinear):
            t = model.get_submodule(owner).dense_weight()  # (N, K)
            t = t.t() if isinstance(skeleton.get_submodule(owner), Conv1D) else t
        tensors[key] = t.detach().contiguous()
    return hub_names.revert(model, tensors)


def _pruned(lm) -> bool:
    return any(step.get("type") == "prune" for step in (lm.recipe or {}).get("steps", []))


def _stored_zeros(name: str, layer: nn.Module) -> torch.Tensor:
    """bool (N, K): the weights the export stores as exactly 0 (a pruned layer's zeros; codes at the zero point)."""
    if isinstance(layer, SparseLinear):
        return layer.dense_weight() == 0
    if layer.layer_type in ("int4_weight_only", "int3_weight_only"):
        signed, zp = _int_groups(name, layer.codes(), layer.scales, layer.zeros, layer.BITS)  # (N, K), (N, G)
        return signed == (0 if zp is None else zp.repeat_interleave(layer.group_size, dim=1))
    return layer.qweight.float() == 0  # int8 and e4m3 codes: 0 is 0


def sparsity_summary(zeros: list[torch.Tensor]) -> dict:
    """Share of zeros among layers given as bool masks (N, K), True = 0; pattern 2:4 when each group of 4
    consecutive inputs of every layer holds at least 2 of them.

    >>> sparsity_summary([torch.tensor([[False, True, True, False]])])
    {'layers': 1, 'zeros': 0.5, 'pattern': '2:4'}
    """
    count = sum(int(z.sum()) for z in zeros)
    total = sum(z.numel() for z in zeros)
    nm = all(z.shape[1] % 4 == 0 and bool((z.reshape(z.shape[0], -1, 4).sum(-1) >= 2).all()) for z in zeros)
    return {"layers": len(zeros), "zeros": round(count / max(total, 1), 4), "pattern": "2:4" if nm else "unstructured"}


def _check_paths(folder: str | os.PathLike, out: str | os.PathLike, tp: int | None, overwrite: bool) -> Path:
    """Refuse a folder miaotui did not optimize, a bad --tp and an existing `out` before any work."""
    folder = Path(folder)
    if not is_optimized_folder(folder):
        raise MiaotuiError(f"{folder} is not a miaotui-optimized folder (no {SIDECAR}); run `miaotui optimize` first")
    if tp is not None and (not isinstance(tp, int) or tp < 1):
        raise MiaotuiError(f"--tp must be a positive integer, got {tp!r}")
    check_out_dir(out, overwrite)
    return folder


def export_compressed_tensors(
    folder: str | os.PathLike, out: str | os.PathLike, *, tp: int | None = None, overwrite: bool = False
) -> dict:
    """Write `out`: config.json with a compressed-tensors `quantization_config`, model.safetensors, tokenizer.

    `folder` must be a miaotui-optimized folder; `tp` checks that vLLM can shard it over that many GPUs.
    Returns a summary (layers per scheme, files).
    """
    folder = _check_paths(folder, out, tp, overwrite)
    quantization, helpers = _ct()
    lm = load_optimized(folder)
    model = lm.model
    experts = {n: m for n, m in model.named_modules() if isinstance(m, ExpertLinears)}
    layers = {n: m for n, m in model.named_modules() if _quantized(m) and not _under(n, experts)}
    pieces = _expert_pieces(model, experts)
    if not layers and not any(isinstance(p, PackedLinear) for _, p in pieces):
        pruned = [m.layer_type for m in model.modules() if isinstance(m, SparseLinear)]
        if pruned:
            raise MiaotuiError(f"{folder} is pruned, not quantized ({len(pruned)} {pruned[0]} layers): " + NO_SPARSE)
        raise MiaotuiError(f"{folder} has no quantized layers: nothing for compressed-tensors to describe")
    skeleton = _skeleton(lm)
    for name in layers:
        original = type(skeleton.get_submodule(name))
        if original is not nn.Linear:  # GPT-2's Conv1D; a subclass (Falcon's) runs its own forward on the weight
            raise MiaotuiError(
                f"layer {name} is a {original.__name__} in {type(model).__name__}; compressed-tensors quantizes "
                "nn.Linear layers only: " + NOT_LINEAR
            )
    if tp is not None:
        _check_tp(lm, layers, tp)

    tensors = _float_tensors(model, layers, experts, skeleton)
    names = {
        n: key.removesuffix(".weight") for n, key in hub_names.rename(model, [f"{n}.weight" for n in layers]).items()
    }
    packed = {names[f"{n}.weight"]: layer for n, layer in layers.items()}
    float_experts = []
    for hub, piece in pieces:
        if isinstance(piece, PackedLinear):
            packed[hub] = piece
        else:
            tensors[f"{hub}.weight"] = piece.detach().contiguous()
            float_experts.append(hub)
    groups = {}
    for name, layer in packed.items():
        key, weights, acts, fmt, local = _layer_scheme(name, layer, helpers.pack_to_int32)
        group = groups.setdefault(key, {"weights": weights, "input_activations": acts, "format": fmt, "names": []})
        group["names"].append(name)
        tensors.update({f"{name}.{k}": v.contiguous() for k, v in local.items()})
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach().contiguous()

    kept = [n for n, m in skeleton.named_modules() if isinstance(m, nn.Linear) and n not in layers]
    ignore = sorted({*kept, *hub_names.rename(model, kept).values(), *float_experts} - set(packed))
    ignore = [n.removesuffix(".weight") for n in ignore]
    uniform = len(groups) == 1
    config_groups = {
        f"group_{i}": quantization.QuantizationScheme(
            targets=["Linear"] if uniform else g["names"],
            weights=quantization.QuantizationArgs(**g["weights"]),
            input_activations=None
            if g["input_activations"] is None
            else quantization.QuantizationArgs(**g["input_activations"]),
            format=g["format"],
        )
        for i, g in enumerate(groups.values())
    }
    formats = {g["format"] for g in groups.values()}
    qconfig = quantization.QuantizationConfig(
        config_groups=config_groups,
        format=formats.pop() if len(formats) == 1 else "mixed-precision",
        quantization_status="compressed",
        ignore=ignore,
    ).model_dump(mode="json")
    summary = {
        "format": "compressed-tensors",
        "out": str(out),
        "layers": len(packed),
        "schemes": {k: len(g["names"]) for k, g in groups.items()},
        "kept_in_full_precision": ignore,
        "tensor_parallel": tp,
        "vllm": vllm_support(set(groups)),
    }
    if _pruned(lm):  # the zeros live in the codes (and in pruned float layers); no sparse format describes them
        pruned = [(n, m) for n, m in model.named_modules() if isinstance(m, SparseLinear)]
        summary["sparsity"] = sparsity_summary([_stored_zeros(n, m) for n, m in [*packed.items(), *pruned]])
    _write(folder, out, tensors, qconfig, overwrite)
    return summary


def _skeleton(lm) -> nn.Module:
    """The model as config.json describes it, on the meta device: the layer types and shapes a runtime builds."""
    with torch.device("meta"), quiet_transformers():
        return model_class(lm.model.config, lm.kind).from_config(lm.model.config)


def _write(folder: Path, out, tensors: dict[str, torch.Tensor], qconfig: dict | None, overwrite: bool) -> None:
    """`out`, atomically: the tensors, config.json (with `qconfig` as its quantization_config, if any), and every
    other file of `folder` but miaotui's own (tokenizer, generation config)."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    if qconfig is not None:
        config["quantization_config"] = qconfig
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        for f in folder.iterdir():
            if f.is_file() and f.name not in NOT_COPIED:
                shutil.copy2(f, tmp / f.name)


def _check_shapes(folder: Path, model: nn.Module, skeleton: nn.Module, experts: dict) -> None:
    """Refuse a model whose tensors (experts aside) differ from those of the model its config.json describes."""
    expected = {k: tuple(t.shape) for k, t in skeleton.state_dict().items() if not _under(k, experts)}
    own = {}
    for key, t in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if not _under(key, experts):
            pruned = leaf == "weight" and isinstance(model.get_submodule(owner), SparseLinear)
            own[key] = tuple((skeleton.get_submodule(owner).weight if pruned else t).shape)  # Conv1D: (in, out)
    wrong = sorted(k for k in expected.keys() | own.keys() if expected.get(k) != own.get(k))
    if wrong:
        k = wrong[0]
        raise MiaotuiError(
            f"{folder}: tensor {k} is {own.get(k, 'absent')} in the optimized model but {expected.get(k, 'absent')} "
            "in the model its config.json describes; a plain Hugging Face folder of it would not load"
        )


def export_dense(
    folder: str | os.PathLike, out: str | os.PathLike, *, tp: int | None = None, overwrite: bool = False
) -> dict:
    """Write `out` as a plain Hugging Face folder: float weights (a pruned layer's zeros stored as zeros), no
    sidecar, no quantization_config; transformers and vLLM load it with no extra package.

    Refuses quantized layers (no dequantizing: the result would not compute what miaotui computes) and layers
    that config.json cannot describe (low-rank factors).
    """
    folder = _check_paths(folder, out, tp, overwrite)
    lm = load_optimized(folder)
    model = lm.model
    quantized = [(n, m.layer_type) for n, m in model.named_modules() if _quantized(m)]
    if quantized:
        name, kind = quantized[0]
        raise MiaotuiError(
            f"{folder}: layer {name} is quantized ({kind}; {len(quantized)} quantized layers in all); --dense writes "
            "float weights and does not dequantize codes. Export the codes with --format compressed-tensors, or "
            "--dense the model optimized without its quantize step"
        )
    experts = {n: m for n, m in model.named_modules() if isinstance(m, ExpertLinears)}
    other = tuple(c for c in STRUCTURAL_MODULES.values() if c is not ExpertLinears)
    for name, m in model.named_modules():
        if other and isinstance(m, other):
            raise MiaotuiError(
                f"{folder}: layer {name} is a {type(m).__name__}, which config.json cannot describe (it names the "
                "original layer), so a plain Hugging Face folder has no place for it; --dense takes pruned and "
                "other float models"
            )
    skeleton = _skeleton(lm)
    _check_shapes(folder, model, skeleton, experts)
    tensors = _float_tensors(model, {}, experts, skeleton)
    pieces = _expert_pieces(model, experts)
    for hub, piece in pieces:
        tensors[f"{hub}.weight"] = piece.detach().contiguous()
    sparse = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    if tp is not None:
        _check_tp(lm, sparse, tp)
    summary = {"format": "dense", "out": str(out), "layers": len(sparse), "tensor_parallel": tp}
    if sparse:
        summary["sparsity"] = sparsity_summary([_stored_zeros(n, m) for n, m in sparse.items()])
    summary["vllm"] = "yes: a plain checkpoint, run on dense kernels (the zeros save no time there)"
    _write(folder, out, tensors, None, overwrite)
    return summary


def vllm_support(schemes: set[str]) -> str:
    """What vLLM can run of an export with these scheme keys (as `_layer_scheme` names them).

    >>> print(vllm_support({"w8"}))
    GPU builds only: vLLM's CPU build has no 8-bit weight-only kernel (export w8a8 or w4 for it)
    """
    if any(k.startswith("w3") for k in schemes):
        return "no: vLLM's integer kernels take 4- and 8-bit codes (this export loads in transformers)"
    if "w8" in schemes:
        return "GPU builds only: vLLM's CPU build has no 8-bit weight-only kernel (export w8a8 or w4 for it)"
    if schemes == {"fp8"}:
        return "GPU builds with FP8 support"
    return "yes: GPU builds, and the CPU build (int8 w8a8 and int4 weights)"
