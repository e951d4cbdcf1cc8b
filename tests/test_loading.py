import json

import pytest
import torch
from safetensors.torch import save_file

import miaotui
from miaotui.errors import MiaotuiError
from miaotui.loading import load_pretrained, resolve_dtype


def test_reference_model_loads_from_shards(ref_llama):
    lm = miaotui.load(ref_llama)
    assert lm.kind == "causal-lm" and lm.dtype == torch.bfloat16
    assert lm.context_length == 1024
    assert sum(p.numel() for p in lm.model.parameters()) == 15_733_632
    assert lm.tokenizer.pad_token_id is not None  # set from eos for batching
    lm32 = miaotui.load(ref_llama, dtype="float32")
    assert lm32.dtype == torch.float32


def test_encoder_kind(minilm):
    lm = miaotui.load(minilm)
    assert lm.kind == "encoder" and type(lm.model).__name__ == "BertModel"


@pytest.mark.parametrize(
    "source, message",
    [
        ("/no/such/folder", "no such folder: /no/such/folder"),
        ("./relative/missing", "no such folder"),
    ],
)
def test_missing_paths(source, message):
    with pytest.raises(MiaotuiError, match=message):
        load_pretrained(source)


def test_hub_id_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MiaotuiError, match="not a local folder, and the Hugging Face Hub did not provide it"):
        load_pretrained("some-org/some-model-that-is-not-here")


def test_folder_without_weights(tmp_path, ref_llama):
    (tmp_path / "config.json").write_text((ref_llama / "config.json").read_text())
    with pytest.raises(MiaotuiError, match="has no weights"):
        load_pretrained(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MiaotuiError, match="has no config.json"):
        load_pretrained(empty)


def test_corrupt_safetensors(copy_folder, ref_llama):
    folder = copy_folder(ref_llama)
    shard = folder / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(MiaotuiError, match="cannot load the weights of"):
        load_pretrained(folder)


def test_unknown_architecture(copy_folder, ref_llama):
    folder = copy_folder(ref_llama)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "flux-capacitor"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MiaotuiError, match="flux-capacitor"):
        load_pretrained(folder)


def test_encoder_decoder_models_are_refused_by_name(tmp_path):
    from transformers import AutoConfig, AutoModel

    model = AutoModel.from_config(
        AutoConfig.for_model("t5", d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=100, d_kv=16)
    )
    model.save_pretrained(tmp_path)
    with pytest.raises(MiaotuiError, match="'t5' is an encoder-decoder model; miaotui supports decoder-only"):
        load_pretrained(tmp_path)


def test_a_model_without_a_list_of_blocks_is_refused(tmp_path, ref_llama):
    """A model transformers can build but that has no transformer blocks (here one with zero layers)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    config = AutoConfig.for_model(
        "llama",
        num_hidden_layers=0,
        hidden_size=64,
        intermediate_size=64,
        num_attention_heads=4,
        vocab_size=8192,
        architectures=["LlamaForCausalLM"],
    )
    AutoModel.from_config(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(ref_llama).save_pretrained(tmp_path)
    with pytest.raises(
        MiaotuiError, match="cannot find the transformer blocks of LlamaModel: it has no list of layers"
    ):
        load_pretrained(tmp_path)


def test_pickle_checkpoints_refused_unless_allowed(tmp_path, tiny_models):
    from transformers import AutoModelForCausalLM

    src = tiny_models["llama"]
    model = AutoModelForCausalLM.from_pretrained(src)
    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / f).write_bytes((src / f).read_bytes())
    with pytest.raises(MiaotuiError, match="only pickle weights.*--allow-pickle"):
        load_pretrained(folder)
    lm = load_pretrained(folder, allow_pickle=True)
    ids = torch.randint(0, 8192, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, model(ids).logits)


def test_weights_not_matching_config(copy_folder, tiny_models):
    folder = copy_folder(tiny_models["llama"])
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    state.pop(next(k for k in state if k.endswith("q_proj.weight")))
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MiaotuiError, match="do not match its config: 1 tensors missing"):
        load_pretrained(folder)


def test_dtype_and_device_validation():
    assert resolve_dtype("bf16") == torch.bfloat16
    with pytest.raises(MiaotuiError, match="unknown dtype 'int3'"):
        resolve_dtype("int3")
    if not torch.cuda.is_available():
        from miaotui.loading import resolve_device

        with pytest.raises(MiaotuiError, match="no CUDA GPU is available"):
            resolve_device("cuda")
