import pytest

from effdl.core.config import PRESETS, ModelConfig
from effdl.core.transformer import Transformer
from effdl.errors import EffdlError


@pytest.mark.parametrize("name", ["tiny", "small", "moe-tiny"])
def test_param_count_matches_built_model(name):
    cfg = ModelConfig.preset(name)
    model = Transformer(cfg, device="meta")
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())


def test_preset_sizes():
    assert 1e6 <= ModelConfig.preset("tiny").num_params() <= 2e6
    assert 20e6 <= ModelConfig.preset("small").num_params() <= 30e6
    assert 110e6 <= ModelConfig.preset("llama-125m").num_params() <= 140e6
    assert 7.9e9 <= ModelConfig.preset("llama-8b").num_params() <= 8.1e9
    assert 46e9 <= ModelConfig.preset("mixtral-8x7b").num_params() <= 47.5e9
    assert any(ModelConfig.preset(n).is_moe for n in PRESETS)


@pytest.mark.parametrize("name", list(PRESETS))
def test_hf_round_trip(name):
    cfg = ModelConfig.preset(name)
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


@pytest.mark.parametrize("name", ["tiny", "llama-1b", "moe-tiny"])
def test_transformers_reads_our_config_as_the_same_model(name):
    from transformers import AutoConfig

    cfg = ModelConfig.preset(name)
    hf = AutoConfig.for_model(**cfg.to_hf())
    assert ModelConfig.from_hf(hf.to_dict()) == cfg


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(EffdlError, match="unknown preset 'huge'.*tiny.*small"):
        ModelConfig.preset("huge")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(n_heads=4, n_kv_heads=3), "not a multiple"),
        (dict(dim=130), "not divisible"),
        (dict(n_experts=4, experts_per_token=5), "experts_per_token"),
        (dict(n_layers=0), "n_layers must be positive"),
        (dict(model_type="gpt2"), "unsupported model_type 'gpt2'"),
    ],
)
def test_invalid_configs_are_named(changes, message):
    with pytest.raises(EffdlError, match=message):
        ModelConfig.preset("tiny").replace(**changes)


def test_from_hf_errors():
    with pytest.raises(EffdlError, match="unsupported model_type 'bert'"):
        ModelConfig.from_hf({"model_type": "bert"})
    with pytest.raises(EffdlError, match="lacks the required key 'vocab_size'"):
        ModelConfig.from_hf({"model_type": "llama", "num_attention_heads": 4})


def test_extra_hf_keys_survive_round_trip():
    hf = ModelConfig.preset("tiny").to_hf() | {"pad_token_id": 7, "initializer_range": 0.01}
    assert ModelConfig.from_hf(hf).to_hf()["pad_token_id"] == 7
