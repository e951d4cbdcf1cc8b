import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import sqnr_db
from transformers.pytorch_utils import Conv1D

from miaotui.modules import find_linears, tensor_bytes
from miaotui.quantize import (
    Int4WeightOnlyLinear,
    Int8DynamicLinear,
    Int8WeightOnlyLinear,
    QuantizeConfig,
    cpu_kernels,
    quantize_,
)
from miaotui.quantize.int4 import AVX512, _kernel_pack, _layout_permutation, _nibbles, quantize_groupwise
from miaotui.quantize.int8 import quantize_per_channel_int8, reference_forward
from miaotui.quantize.int8_dynamic import has_vnni


def test_per_channel_int8_rounding():
    torch.manual_seed(0)
    w = torch.randn(48, 32)
    w[3] = 0.0  # an all-zero row must not divide by zero
    q, s = quantize_per_channel_int8(w, torch.float32)
    assert q.dtype == torch.int8 and q.shape == (48, 32) and s.shape == (48,)
    assert q.abs().max() == 127 and torch.all(q[3] == 0)
    err = (q.float() * s[:, None] - w).abs()
    assert torch.all(err <= s[:, None] / 2 + 1e-6)  # round-to-nearest: at most half a step


def test_weight_only_kernel_matches_dequantized_reference():
    torch.manual_seed(0)
    lin = nn.Linear(256, 96, bias=True)
    layer = Int8WeightOnlyLinear.from_float(lin)
    x = torch.randn(3, 5, 256)
    ref = reference_forward(layer, x)  # fp32 dequantize-then-matmul
    torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-4)  # fp32 kernel: exact up to summation order
    layer_bf16 = Int8WeightOnlyLinear.from_float(lin.to(torch.bfloat16))
    y = layer_bf16(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (3, 5, 96)
    assert sqnr_db(reference_forward(layer_bf16, x.to(torch.bfloat16)), y) > 40
    assert sqnr_db(lin.float()(x), y) > 30  # against the unquantized layer


def test_dynamic_int8_layer_quality():
    torch.manual_seed(0)
    lin = nn.Linear(128, 64)
    layer = Int8DynamicLinear.from_float(lin)
    x = torch.randn(7, 128)
    assert sqnr_db(lin(x), layer(x)) > 30
    scale = layer.scale.clone()
    layer.to(torch.bfloat16)  # scales keep their fp32 values, outputs follow the input dtype
    assert layer.scale.dtype == torch.float32 and torch.equal(layer.scale, scale)
    assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_dynamic_int8_is_per_token_with_full_range_weights():
    """Rows a thousand times apart keep their own precision (one activation scale per call would lose the small
    ones to rounding); the weights use [-127, 127], as exported. Measured per-row SQNR here: 41-42 dB, both rows."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 64)
    layer = Int8DynamicLinear.from_float(lin)
    assert int(layer.qweight.to(torch.int16).abs().max()) == 127
    x = torch.randn(4, 256) * torch.tensor([[1000.0], [1.0], [0.001], [1.0]])
    for row in range(4):
        assert sqnr_db(lin(x)[row], layer(x)[row]) > 35, row


def test_dynamic_int8_without_vnni_packs_weights_that_cannot_saturate(monkeypatch):
    """Without AVX-512 VNNI fbgemm sums pairs of u8 x s8 products in int16: the packed copy is narrowed to
    [-63, 63]. Extreme inputs (activations at the top of the range, weights at +-127) stay exact either way."""
    w = torch.full((32, 128), 1.0)
    w[1::2] = -1.0
    x = torch.full((2, 128), 10.0)
    lin = nn.Linear(128, 32, bias=False)
    lin.weight.data = w
    want = lin(x)
    for vnni in (True, False):
        if vnni and not has_vnni():
            continue  # this CPU cannot run the full-range kernel without saturating: never packed that way
        monkeypatch.setattr(Int8DynamicLinear, "vnni", vnni)
        layer = Int8DynamicLinear.from_float(lin)
        with cpu_kernels.switched_off():  # fbgemm's path, as on CPUs without miaotui's kernel
            assert sqnr_db(want, layer(x)) > 40, vnni
        assert layer._cpu_kernel is False
        assert int(layer.qweight.abs().max()) == 127  # the stored weights are full range either way


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv1d_layers_are_quantized_with_their_transposed_layout(dtype):
    """Codes are stored (out, in) and contiguous, whatever Conv1D's (in, out) weight: the kernels (miaotui's bf16
    CPU kernels too) read them row by row."""
    torch.manual_seed(0)
    conv = Conv1D(96, 128).to(dtype)  # GPT-2 style: weight (in=128, out=96)
    nn.init.normal_(conv.weight)
    x = torch.randn(2, 128, dtype=dtype)
    for cls, options in (
        (Int8WeightOnlyLinear, {}),
        (Int8DynamicLinear, {}),
        (Int4WeightOnlyLinear, {"group_size": 64}),
    ):
        layer = cls.from_float(conv, **options)
        assert (layer.in_features, layer.out_features) == (128, 96)
        assert layer.qweight.is_contiguous()
        assert sqnr_db(conv(x), layer(x)) > (15 if cls is Int4WeightOnlyLinear else 30)


def test_quantize_halves_linear_bytes_and_respects_patterns():
    model = nn.ModuleDict(
        {
            "block": nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)),
            "lm_head": nn.Linear(64, 100),
            "odd": nn.Linear(13, 8),
        }
    ).to(torch.bfloat16)
    before = tensor_bytes(model["block"])
    summary = quantize_(model, QuantizeConfig(scheme="w8"), progress=False)
    assert summary["quantized"] == 2
    assert "odd" in summary["skipped"]  # in_features 13: not a multiple of 8, left in full precision
    assert isinstance(model["lm_head"], nn.Linear)  # ignored by default
    after = tensor_bytes(model["block"])
    ratio = before / after
    assert ratio > 1.9 and ratio <= 2.0
    assert [n for n, _ in find_linears(model)] == ["lm_head", "odd"]


def test_second_step_only_touches_remaining_layers():
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    quantize_(model, QuantizeConfig(scheme="w8a8", targets=("0",)), progress=False)
    quantize_(model, QuantizeConfig(scheme="w8"), progress=False)
    assert isinstance(model[0], Int8DynamicLinear) and isinstance(model[1], Int8WeightOnlyLinear)


def test_cuda_kernels_match_reference():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    lin = nn.Linear(512, 384).cuda().to(torch.bfloat16)
    for m in (1, 16, 100):
        x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
        w8 = Int8WeightOnlyLinear.from_float(lin)
        assert sqnr_db(reference_forward(w8, x), w8(x)) > 40
        a8 = Int8DynamicLinear.from_float(lin)
        assert F.cosine_similarity(a8(x).float().flatten(), lin(x).float().flatten(), 0) > 0.999
        w4 = Int4WeightOnlyLinear.from_float(lin, group_size=128)
        portable = w4.qweight.clone()
        ref = F.linear(x.float(), w4.dequantize(), w4.bias.float())
        assert sqnr_db(ref, w4(x)) > 35 and w4.layout == "cuda"
        assert torch.equal(w4.portable_qweight(), portable)
        w4.cpu()  # moves through the portable layout
        assert torch.equal(w4.qweight, portable.cpu())


def test_int4_groupwise_rounding():
    torch.manual_seed(0)
    w = torch.randn(32, 256)
    for symmetric in (False, True):
        q, s, z = quantize_groupwise(w, 64, symmetric, torch.float32)
        assert q.dtype == torch.uint8 and int(q.max()) <= 15 and s.shape == z.shape == (32, 4)
        deq = (q.float().view(32, 4, 64) - 8) * s[..., None] + z[..., None]
        assert torch.all((deq.view(32, 256) - w).abs() <= s.repeat_interleave(64, 1) / 2 + 1e-5)


def test_int4_layer_kernel_layout_and_quality():
    torch.manual_seed(0)
    lin = nn.Linear(512, 96, bias=True)
    for dtype in (torch.float32, torch.bfloat16):
        layer = Int4WeightOnlyLinear.from_float(lin.to(dtype), group_size=128)
        portable = layer.qweight.clone()
        assert portable.shape == (96, 256)  # two weights per byte
        x = torch.randn(4, 512, dtype=dtype)
        ref = F.linear(x.float(), layer.dequantize(), layer.bias.float())
        y = layer(x)  # bf16: converts to the CPU kernel's layout on first use; fp32: dequantize fallback
        bf16_layout = AVX512 if cpu_kernels.available() else "cpu"
        assert layer.layout == (bf16_layout if dtype == torch.bfloat16 else "portable") and y.dtype == dtype
        assert sqnr_db(ref, y) > (60 if dtype == torch.float32 else 35)
        assert sqnr_db(lin.float()(x.float()), y) > 15  # 4 bits: about 6 dB per bit, minus outliers
        assert torch.equal(layer.portable_qweight(), portable)  # the layout converts back exactly


@pytest.mark.parametrize("n, k, layout", [(16, 64, "cpu"), (48, 96, "cpu"), (384, 1024, "cpu"), (48, 384, AVX512)])
def test_int4_layout_permutation_is_exact(n, k, layout):
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    src = _layout_permutation(n, k, layout, torch.device("cpu"))
    back = torch.empty(n * k, dtype=torch.uint8)
    back[src] = _nibbles(_kernel_pack(q, layout))
    assert torch.equal(back.view(n, k), q)


def test_int4_shape_rules():
    model = nn.ModuleDict({"ok": nn.Linear(128, 64), "narrow": nn.Linear(128, 24), "short": nn.Linear(96, 64)})
    summary = quantize_(model, QuantizeConfig(scheme="w4", group_size=64), progress=False)
    assert summary["quantized"] == 1
    assert "not a multiple of 16" in summary["skipped"]["narrow"]
    assert "group size 64" in summary["skipped"]["short"]
    with pytest.raises(ValueError, match="group_size 100 is not supported; choose one of 32, 64, 128, 256"):
        QuantizeConfig(scheme="w4", group_size=100)


def test_impossible_quantize_steps_are_refused_before_any_work():
    from miaotui.calibration import calibration_ids
    from miaotui.errors import MiaotuiError

    model = nn.ModuleDict({"attn": nn.Linear(96, 64), "mlp": nn.Linear(96, 64)})
    with pytest.raises(MiaotuiError, match=r"target pattern 'mpl\*' matches no linear layer .*named like attn, mlp"):
        quantize_(model, QuantizeConfig(scheme="w8", targets=("attn", "mpl*")), progress=False)
    with pytest.raises(MiaotuiError, match="no selected layer can take w3; e.g. layer attn: in_features 96 is not a"):
        quantize_(model, QuantizeConfig(scheme="w3", group_size=64), progress=False)
    assert all(isinstance(m, nn.Linear) for m in model.values())  # nothing was touched
    for scheme in ("w2", "w5", "w16"):
        with pytest.raises(ValueError, match="choose one of w8, w8a8, fp8, w4, w3 .weights of 8, 4 or 3 bits"):
            QuantizeConfig(scheme=scheme)
    ids = torch.arange(1000)
    with pytest.raises(MiaotuiError, match="1000 tokens, fewer than calib-samples x calib-seqlen = 4 x 512 = 2048"):
        calibration_ids(ids, samples=4, seqlen=512)
    assert calibration_ids(ids, samples=1, seqlen=512).shape == (1, 512)


@pytest.mark.parametrize("scheme", ["w4", "w3"])
def test_hqq_fits_zero_points_better_than_rtn(ref_llama, scheme):
    """On the reference model's real weights: lower error than round-to-nearest, same packed layer and kernel."""
    from safetensors import safe_open

    weight_map = json.loads((ref_llama / "model.safetensors.index.json").read_text())["weight_map"]
    name = next(k for k in weight_map if k.endswith("mlp.down_proj.weight"))
    with safe_open(ref_llama / weight_map[name], "pt") as f:
        weight = f.get_tensor(name).float()  # (N, K)
    errors = {}
    for algorithm in ("rtn", "hqq"):
        m = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False))
        m[0].weight.data.copy_(weight)
        quantize_(m, QuantizeConfig(scheme=scheme, algorithm=algorithm, group_size=64), progress=False)
        errors[algorithm] = float((m[0].dequantize().float() - weight).pow(2).mean())
    assert errors["hqq"] < 0.97 * errors["rtn"]


def test_hqq_config_rules():
    assert QuantizeConfig(scheme="w3", algorithm="hqq").algorithm == "hqq"
    with pytest.raises(ValueError, match="hqq supports the schemes w4, w3"):
        QuantizeConfig(scheme="w8", algorithm="hqq")
    with pytest.raises(ValueError, match="symmetric: false"):
        QuantizeConfig(scheme="w4", algorithm="hqq", symmetric=True)
