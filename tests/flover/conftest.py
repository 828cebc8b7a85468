import pytest
import torch

from effdl.core.config import ModelConfig
from effdl.core.transformer import Transformer


@pytest.fixture(scope="module")
def widened_model():
    """A factory of tiny-preset models whose weights are drawn wider than init (std 0.08): discriminative logits,
    so that greedy near-ties cannot blur a comparison of two decoding paths."""

    def make(**overrides) -> Transformer:
        torch.manual_seed(0)
        m = Transformer(ModelConfig.preset("tiny", **overrides)).eval()
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.08)
        return m

    return make


@pytest.fixture(scope="module")
def model(widened_model):
    return widened_model()
