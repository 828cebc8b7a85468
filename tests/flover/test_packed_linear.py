"""oneDNN-packed linears: the same logits as the model's own forward, installed only inside a runner step."""

import pytest
import torch

from effdl.core.config import ModelConfig
from effdl.core.transformer import Transformer
from effdl.flover.engine import Engine
from effdl.flover.packed_linear import PackedLinears, packed_linear_supported
from effdl.flover.request import SamplingParams

pytestmark = pytest.mark.skipif(not packed_linear_supported(torch.device("cpu"), torch.float32),
                                reason="this torch build has no oneDNN")


def _model(**kw):
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("tiny", **kw)).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_packed_forward_matches_the_models_own(tie):
    model = _model(tie_embeddings=tie, qkv_bias=True)
    tokens = torch.randint(0, model.config.vocab_size, (3, 17))
    with torch.inference_mode():
        reference = model(tokens)
        packed = PackedLinears(model)
        with packed.installed():
            inside = model(tokens)
        after = model(tokens)
    torch.testing.assert_close(inside, reference, rtol=1e-5, atol=1e-5)
    assert not torch.equal(inside, reference)  # a different GEMM ran, not the same one twice
    assert torch.equal(after, reference)
    assert all("forward" not in m.__dict__ for m in model.modules())  # the model is left as it was


def test_packing_keeps_forward_hooks():
    model = _model()
    seen = []
    model.layers[0].attention.wo.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.inference_mode(), PackedLinears(model).installed():
        model(torch.zeros(1, 4, dtype=torch.long))
    assert seen == [torch.Size([1, 4, model.config.dim])]


def test_engine_greedy_tokens_match_with_and_without_packing():
    model = _model()
    prompts = [[5, 9, 2, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42]]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    packed = Engine(model, max_slots=4, max_len=64)
    plain = Engine(model, max_slots=4, max_len=64)
    plain.runner.linears = None
    assert packed.runner.linears is not None
    assert packed.generate(prompts, params) == plain.generate(prompts, params)
