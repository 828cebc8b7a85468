"""effdl's SOFT models on reference-format checkpoints, against the float64 oracle in ``soft_reference.py``.

The oracle was checked, outside this repository, against the fudan-zvg/SOFT model classes themselves (run on
CPU in float64): same state-dict keys, shapes and order, and logits equal to ~1e-13 relative at 224 and 256 px.
"""

import pytest
import timm
import torch
import torch.nn.functional as F
from soft_reference import ARCHS, _resize_pos_embed, norm_pinv, reference_logits, reference_state_dict, soft_pinv

import effdl.soft  # noqa: F401  (registers the models with timm)

# Parameters of the reference classes with 1000 classes, measured (the code's soft_small is (1, 3, 20, 4) deep).
REFERENCE_PARAMS = {"tiny": 13.1e6, "small": 38.9e6, "medium": 45.8e6, "large": 64.7e6, "huge": 87.1e6}


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).abs().max() / ref.abs().max())


def _load(name: str, state_dict: dict, tmp_path) -> torch.nn.Module:
    path = tmp_path / f"{name}.pth"
    torch.save({"model": state_dict}, path)  # the reference training script's checkpoint layout
    # A missing or unexpected key makes the strict load inside create_model raise.
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}).eval()


@pytest.mark.parametrize("name", list(ARCHS))
def test_reference_checkpoint_loads_and_matches_float64_oracle(name, tmp_path):
    sd = reference_state_dict(name, seed=0)
    model = _load(name, sd, tmp_path)
    # Batch 2 matters for SOFT++, whose Newton step size is one scalar over the whole batch; the larger models
    # use batch 1 to keep the float64 oracle's CPU time down.
    batch = 2 if name.endswith("tiny") else 1
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x)
    assert out.shape == (batch, 1000)
    assert _rel_err(out, reference_logits(sd, x.double(), ARCHS[name]["kind"])) <= 1e-4


@pytest.mark.parametrize("name", ["soft_tiny", "soft_norm_tiny"])
def test_near_singular_landmarks_show_the_reference_newton_details(name, tmp_path):
    # Crowded landmarks: A2 is near singular and 20 Newton steps only partly converge, so the logits depend on
    # the reference's exact step size (per matrix for SOFT, batch-wide with halvings for SOFT++), its 0.01 I
    # and the iteration count, each by 1e-3 or more -- ten times the tolerance.
    sd = reference_state_dict(name, seed=0, near_singular=True)
    model = _load(name, sd, tmp_path)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x)
    ref = reference_logits(sd, x.double(), ARCHS[name]["kind"])
    assert _rel_err(out, ref) <= 1e-4
    assert _rel_err(reference_logits(sd, x.double(), ARCHS[name]["kind"], newton_iters=19), ref) > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# The oracle itself
# ---------------------------------------------------------------------------------------------------------------


def _gaussian_landmarks(batch=2, heads=3, m=49, d=32, spread=1.0):
    g = torch.Generator().manual_seed(0)
    lm = spread * torch.randn(batch, heads, m, d, generator=g, dtype=torch.float64) / d**0.25
    return torch.exp(-(torch.cdist(lm, lm) ** 2) / 2)  # (B, h, M, M)


def test_oracle_soft_pinv_is_the_pinv_of_a2_plus_001_i():
    a2 = _gaussian_landmarks()
    eye = torch.eye(a2.shape[-1], dtype=a2.dtype)
    assert torch.linalg.cond(a2 + 0.01 * eye).max() < 10  # well conditioned: 20 steps converge
    expected = torch.linalg.pinv(a2 + 0.01 * eye)
    assert (soft_pinv(a2, 20) - expected).abs().max() / expected.abs().max() < 1e-10


def test_oracle_norm_pinv_is_the_scaled_inverse_of_a2():
    a2 = _gaussian_landmarks()
    d = a2.sum(-1) ** -0.5
    expected = d[..., :, None] * torch.linalg.pinv(a2) * d[..., None, :]  # D^-1/2 A2^+ D^-1/2
    assert (norm_pinv(a2, 40) - expected).abs().max() / expected.abs().max() < 1e-10


@pytest.mark.parametrize("size", [(56, 56), (64, 64), (64, 48), (40, 72)])
def test_oracle_pos_embed_resize_is_bilinear_without_aligned_corners(size):
    pos = torch.randn(1, 56 * 56, 8, dtype=torch.float64)
    grid = pos.reshape(1, 56, 56, 8).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=size, mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(_resize_pos_embed(pos, *size), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(ARCHS))
def test_oracle_state_dict_param_counts(name):
    sd = reference_state_dict(name)
    params = sum(v.numel() for k, v in sd.items() if not k.endswith(("running_mean", "running_var", "_tracked")))
    assert float(f"{params:.3g}") == REFERENCE_PARAMS[name.split("_")[-1]]
    assert all(v.dtype == torch.float32 for k, v in sd.items() if not k.endswith("num_batches_tracked"))
    assert sd["pos_embed1"].shape == (1, 3136, 64) and sd["pos_embed4"].shape == (1, 50, 512)


def test_oracle_state_dict_is_deterministic_in_the_seed():
    sd, again = reference_state_dict("soft_tiny", seed=3), reference_state_dict("soft_tiny", seed=3)
    assert list(again) == list(sd) and all(torch.equal(sd[k], again[k]) for k in sd)
    assert not torch.equal(reference_state_dict("soft_tiny", seed=4)["head.weight"], sd["head.weight"])
    assert reference_state_dict("soft_tiny", num_classes=10, in_chans=1)["patch_embed1.proj.0.weight"].shape[1] == 1
