"""Checkpoints made by transformers load into effdl with the same logits and greedy tokens, and back."""

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from effdl.core.config import ModelConfig
from effdl.core.generate import generate
from effdl.core.hf import load_checkpoint, load_config, save_checkpoint
from effdl.core.tokenizer import ByteTokenizer
from effdl.core.transformer import Transformer
from effdl.errors import EffdlError

COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, eos_token_id=None, bos_token_id=None)
HF_MODELS = {
    "llama": (LlamaForCausalLM, LlamaConfig(**COMMON, rope_theta=5e4)),
    "llama3-rope": (LlamaForCausalLM, LlamaConfig(**COMMON, rope_parameters={
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "llama-tied": (LlamaForCausalLM, LlamaConfig(**COMMON, tie_word_embeddings=True)),
    "mistral": (MistralForCausalLM, MistralConfig(**COMMON, sliding_window=16)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**COMMON)),
    "mixtral": (MixtralForCausalLM, MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)),
}


def _hf_model(kind):
    cls, cfg = HF_MODELS[kind]
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # HF's default init is tiny; wider weights make logits discriminative
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("kind", list(HF_MODELS))
def test_load_matches_transformers_logits_and_greedy(kind, tmp_path):
    hf = _hf_model(kind)
    hf.save_pretrained(tmp_path)
    ours = load_checkpoint(tmp_path)
    tokens = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)

    prompt = tokens[0, :7].tolist()
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, 7:].tolist()
    assert generate(ours, prompt, 32) == expected
    assert len(expected) == 32


@pytest.mark.parametrize("preset", ["tiny", "moe-tiny"])
def test_our_checkpoint_loads_in_transformers(preset, tmp_path):
    ours = Transformer(ModelConfig.preset(preset)).eval()
    save_checkpoint(ours, tmp_path, tokenizer=ByteTokenizer())
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, 258, (2, 33))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), atol=1e-4, rtol=1e-4)
    reloaded = load_checkpoint(tmp_path)
    for (name, a), b in zip(ours.state_dict().items(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_sharded_save_and_bf16_load(tmp_path):
    ours = Transformer(ModelConfig.preset("tiny"))
    save_checkpoint(ours, tmp_path, max_shard_bytes=1_000_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = load_checkpoint(tmp_path, dtype=torch.bfloat16)
    assert loaded.tok_embeddings.weight.dtype == torch.bfloat16
    torch.testing.assert_close(loaded.output.weight.float(), ours.output.weight.bfloat16().float())


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(EffdlError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(EffdlError, match="has no config.json"):
        load_checkpoint(tmp_path)
    save_checkpoint(Transformer(ModelConfig.preset("tiny")), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(EffdlError, match="neither model.safetensors nor"):
        load_checkpoint(tmp_path)


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(EffdlError, match="unsupported model_type 'gpt2'"):
        load_checkpoint(tmp_path)


def test_config_weights_mismatch(tmp_path):
    save_checkpoint(Transformer(ModelConfig.preset("tiny")), tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(hf | {"intermediate_size": 256}))
    with pytest.raises(EffdlError, match=r"does not match its config: .*gate_proj.*\(512, 128\)"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf | {"num_hidden_layers": 8}))
    with pytest.raises(EffdlError, match="missing tensors model.layers.6"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf | {"num_hidden_layers": 4}))
    with pytest.raises(EffdlError, match="unexpected tensors model.layers.4"):
        load_checkpoint(tmp_path)


def test_truncated_safetensors(tmp_path):
    save_checkpoint(Transformer(ModelConfig.preset("tiny")), tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(EffdlError, match="truncated or not safetensors"):
        load_checkpoint(tmp_path)


def test_load_config_reads_folder(tmp_path):
    save_checkpoint(Transformer(ModelConfig.preset("moe-tiny")), tmp_path)
    assert load_config(tmp_path) == ModelConfig.preset("moe-tiny")


def test_model_folder_serves_a_run_folders_newest_checkpoint(tmp_path):
    from effdl.core.hf import model_folder

    for step in (100, 200):
        (tmp_path / f"checkpoint-{step:06d}").mkdir()
        (tmp_path / f"checkpoint-{step:06d}" / "config.json").write_text("{}")
    (tmp_path / "checkpoint-000300").mkdir()  # an interrupted save without a model: never served
    assert model_folder(tmp_path) == tmp_path / "checkpoint-000200"
    assert model_folder(tmp_path / "checkpoint-000100") == tmp_path / "checkpoint-000100"
    assert model_folder(tmp_path / "missing") == tmp_path / "missing"  # the loader names the missing path
    with pytest.raises(EffdlError, match="neither a model"):
        model_folder(tmp_path / "checkpoint-000300")
