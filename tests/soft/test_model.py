import re

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import effdl.soft  # noqa: F401  (registers the models with timm)
from effdl.errors import EffdlError
from effdl.soft import checkpoint_filter_fn

# Parameter counts of the reference implementation (1000 classes) and the paper's GFLOPs (GMACs) at 224 px.
# The paper's Small is soft_small_paper: the reference code's soft_small is deeper (see test_weights).
REFERENCE = {
    "soft_tiny": (13.07e6, 1.9),
    "soft_small_paper": (24.11e6, 3.3),
    "soft_medium": (45.81e6, 7.2),
    "soft_large": (64.70e6, 11.0),
    "soft_huge": (87.11e6, 16.3),
}


@pytest.mark.parametrize("name", list(REFERENCE))
def test_params_flops_and_forward_at_224(name):
    params, gmacs = REFERENCE[name]
    # newton_iters=0: the paper's count leaves out the pseudo-inverse iterations (2 * 20 * M^3 per head).
    model = timm.create_model(name, newton_iters=0).eval()
    assert abs(sum(p.numel() for p in model.parameters()) / params - 1) < 0.01
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000)
    assert abs(counter.get_total_flops() / 2e9 / gmacs - 1) < 0.10


def test_timm_registry_and_api():
    sizes = ("tiny", "small", "medium", "large", "huge")
    reference_names = {f"soft_{s}" for s in sizes} | {f"soft_norm_{s}" for s in sizes}
    assert reference_names <= set(timm.list_models("soft_*"))
    model = timm.create_model("soft_tiny", num_classes=10, in_chans=1)
    assert model.pretrained_cfg["architecture"] == "soft_tiny"
    assert model.pretrained_cfg["first_conv"] == "stages.0.downsample.0"
    x = torch.randn(2, 1, 64, 64)
    assert model(x).shape == (2, 10)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 512)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)


@pytest.mark.parametrize("size", [(32, 32), (96, 128), (256, 256)])
def test_any_size_divisible_by_32(size):
    model = timm.create_model("soft_tiny", num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, *size)).shape == (1, 3)


def test_bad_inputs_are_named():
    model = timm.create_model("soft_tiny", num_classes=3)
    with pytest.raises(EffdlError, match="multiple of 32, got 100x96"):
        model(torch.randn(1, 3, 100, 96))
    with pytest.raises(EffdlError, match="expects 3 input channels, got 1"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(EffdlError, match="img_size must be a multiple of 32"):
        timm.create_model("soft_tiny", img_size=100)


def test_low_precision_matches_fp32():
    model = timm.create_model("soft_tiny", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert torch.isfinite(low).all()
    # bf16 keeps ~3 significant digits through 8 blocks; the Gaussian kernel and pinv stay fp32.
    assert float((low.float() - ref).norm() / ref.norm()) < 0.05


def _reference_name(ours: str) -> str:
    """Our parameter name as the reference code (fudan-zvg/SOFT, softmax_free_vision_transformer.py) spells it."""
    rules = [
        (r"^stages\.(\d)\.downsample\.", lambda m: f"patch_embed{int(m[1]) + 1}.proj."),
        (r"^stages\.(\d)\.pos_embed$", lambda m: f"pos_embed{int(m[1]) + 1}"),
        (r"^stages\.3\.blocks\.(\d+)\.", lambda m: f"block4.{m[1]}."),
        (r"^stages\.(\d)\.blocks\.(\d+)\.attn\.q\.", lambda m: f"block{int(m[1]) + 1}.{m[2]}.att.mha.W_q."),
        (r"^stages\.(\d)\.blocks\.(\d+)\.attn\.v\.", lambda m: f"block{int(m[1]) + 1}.{m[2]}.att.mha.W_v."),
        (r"^stages\.(\d)\.blocks\.(\d+)\.attn\.proj\.", lambda m: f"block{int(m[1]) + 1}.{m[2]}.att.mha.ff."),
        (r"^stages\.(\d)\.blocks\.(\d+)\.attn\.landmark\.",
         lambda m: f"block{int(m[1]) + 1}.{m[2]}.att.mha.attn.Qlandmark_op."),
        (r"^stages\.(\d)\.blocks\.(\d+)\.attn\.landmark_norm\.",
         lambda m: f"block{int(m[1]) + 1}.{m[2]}.att.mha.attn.Qnorm_act.0."),
        (r"^stages\.(\d)\.blocks\.(\d+)\.attn\.v_conv\.", lambda m: f"block{int(m[1]) + 1}.{m[2]}.att.mha.attn.conv."),
        (r"^stages\.(\d)\.blocks\.(\d+)\.mlp\.fc(\d)\.", lambda m: f"block{int(m[1]) + 1}.{m[2]}.att.ff{m[3]}."),
        (r"^stages\.(\d)\.blocks\.(\d+)\.norm(\d)\.", lambda m: f"block{int(m[1]) + 1}.{m[2]}.att.norm{m[3]}."),
    ]
    for pattern, repl in rules:
        new = re.sub(pattern, repl, ours)
        if new != ours:
            return new
    return ours


def test_reference_checkpoint_loads_through_timm(tmp_path):
    source = timm.create_model("soft_tiny")
    reference_sd = {_reference_name(k): v for k, v in source.state_dict().items()}
    for key in ("block1.0.att.mha.attn.Qlandmark_op.weight", "block3.2.att.ff2.bias", "block4.1.attn.kv.weight",
                "patch_embed1.proj.1.running_var", "pos_embed4", "cls_token", "head.weight"):
        assert key in reference_sd
    path = tmp_path / "soft_tiny_reference.pth"
    torch.save({"model": reference_sd}, path)
    loaded = timm.create_model("soft_tiny", pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_mismatched_checkpoint_lists_offending_keys():
    model = timm.create_model("soft_tiny")
    sd = {_reference_name(k): v for k, v in model.state_dict().items()}
    del sd["block2.1.att.mha.W_q.weight"]
    sd["block9.0.extra"] = torch.zeros(1)
    sd["norm.weight"] = torch.zeros(10)
    with pytest.raises(EffdlError, match=r"missing keys stages.1.blocks.1.attn.q.weight.*unexpected keys "
                                         r"block9.0.extra.*shape mismatches norm.weight \(10,\)"):
        checkpoint_filter_fn(sd, model)
