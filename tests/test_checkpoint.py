import json

import pytest
import torch

import miaotui
from miaotui.atomic import atomic_dir
from miaotui.checkpoint import SIDECAR, WEIGHTS, save
from miaotui.errors import MiaotuiError
from miaotui.recipe import get_recipe


@pytest.fixture(scope="module")
def ref_w8(ref_llama, tmp_path_factory):
    lm = miaotui.load(ref_llama)
    miaotui.apply_recipe(lm, get_recipe("w8"), progress=False)
    out = tmp_path_factory.mktemp("ckpt") / "w8"
    save(lm, out)
    return lm, out


def test_reload_is_bit_exact(ref_w8):
    lm, out = ref_w8
    ids = torch.randint(0, 8192, (2, 40), generator=torch.Generator().manual_seed(1))
    back = miaotui.load(out)
    with torch.no_grad():
        assert torch.equal(back.model(ids).logits, lm.model(ids).logits)
    assert back.dtype == torch.bfloat16
    # the packed kernels need aligned weights (on AVX-512 an unaligned int8 weight crashes the process)
    assert all(t.data_ptr() % 64 == 0 for t in back.model.state_dict().values() if t.numel())
    meta = json.loads((out / SIDECAR).read_text())
    assert meta["format_version"] == 1 and meta["recipe"]["name"] == "w8"
    assert len(meta["layers"]) == 42 and meta["base_model"] == str(lm.source)


def test_saved_w8_is_about_half_of_bf16(ref_w8, ref_llama):
    _, out = ref_w8
    bf16 = sum(f.stat().st_size for f in ref_llama.glob("*.safetensors"))
    w8 = (out / WEIGHTS).stat().st_size
    # embeddings and lm_head (2 x 8192 x 384) stay bf16; the 42 block linears shrink 2x
    linear_bf16 = 18_874_368
    assert bf16 - w8 == pytest.approx(linear_bf16 / 2, rel=0.01)


def test_existing_output_is_refused_then_overwritten(ref_w8, tmp_path):
    lm, _ = ref_w8
    out = tmp_path / "o"
    save(lm, out)
    with pytest.raises(MiaotuiError, match="already exists; choose another --out or pass --overwrite"):
        save(lm, out)
    save(lm, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_failure_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "half.safetensors").write_text("partial")
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_damaged_optimized_folders(ref_w8, copy_folder):
    _, out = ref_w8
    folder = copy_folder(out, "a")
    (folder / SIDECAR).write_text("{not json")
    with pytest.raises(MiaotuiError, match="cannot read .*miaotui.json"):
        miaotui.load(folder)
    (folder / SIDECAR).write_text("[1, 2]")
    with pytest.raises(MiaotuiError, match="is not a miaotui sidecar"):
        miaotui.load(folder)
    folder = copy_folder(out, "b")
    (folder / WEIGHTS).write_bytes((folder / WEIGHTS).read_bytes()[:5000])
    with pytest.raises(MiaotuiError, match="cannot read .*model.safetensors"):
        miaotui.load(folder)
    folder = copy_folder(out, "c")
    meta = json.loads((folder / SIDECAR).read_text())
    meta["format_version"] = 99
    (folder / SIDECAR).write_text(json.dumps(meta))
    with pytest.raises(MiaotuiError, match="newer miaotui"):
        miaotui.load(folder)
    folder = copy_folder(out, "d")
    meta = json.loads((folder / SIDECAR).read_text())
    meta["layers"].popitem()
    (folder / SIDECAR).write_text(json.dumps(meta))
    with pytest.raises(MiaotuiError, match="has no place in the model"):
        miaotui.load(folder)
