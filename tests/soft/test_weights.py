"""Loading SOFT checkpoints: fine-tuning adaptations, the feature API, and clear errors for bad files."""

import argparse

import pytest
import timm
import torch
import torch.nn.functional as F

import effdl.soft  # noqa: F401  (registers the models with timm)
from effdl.errors import EffdlError


def _save(tmp_path, state_dict, name="weights.pth", **extra):
    path = tmp_path / name
    torch.save({**extra, "model": state_dict}, path)
    return str(path)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return timm.create_model("soft_tiny").eval()


def _load(name, path, **kwargs):
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": path}, **kwargs).eval()


def test_other_num_classes_gets_a_new_head_and_keeps_the_rest(tiny, tmp_path):
    model = _load("soft_tiny", _save(tmp_path, tiny.state_dict()), num_classes=10)
    assert model.head.weight.shape == (10, 512)
    source = tiny.state_dict()
    for name, value in model.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(value, source[name]), name


def test_a_checkpoint_with_another_head_or_none_loads_into_a_backbone(tiny, tmp_path):
    fine_tuned = {k: torch.zeros(5, *v.shape[1:]) if k.startswith("head.") else v
                  for k, v in tiny.state_dict().items()}
    no_head = {k: v for k, v in tiny.state_dict().items() if not k.startswith("head.")}
    for state_dict in (fine_tuned, no_head):
        path = _save(tmp_path, state_dict)
        backbone = timm.create_model("soft_tiny", features_only=True, pretrained=True,
                                     pretrained_cfg_overlay={"file": path})
        torch.testing.assert_close(backbone.model.stages[2].blocks[0].attn.q.weight,
                                   tiny.stages[2].blocks[0].attn.q.weight)
        assert _load("soft_tiny", path, num_classes=0).head.__class__.__name__ == "Identity"


def test_other_in_chans_adapts_the_first_conv(tiny, tmp_path):
    model = _load("soft_tiny", _save(tmp_path, tiny.state_dict()), in_chans=1)
    stem = tiny.stages[0].downsample[0].weight  # (32, 3, 3, 3)
    # timm's rule for one channel: the sum over the RGB filters, so a grey image x gives what RGB (x, x, x) gave.
    torch.testing.assert_close(model.stages[0].downsample[0].weight, stem.sum(1, keepdim=True))
    grey = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(grey), tiny(grey.expand(-1, 3, -1, -1)), atol=1e-4, rtol=1e-4)


def test_other_img_size_resamples_pos_embed_bilinearly(tiny, tmp_path):
    model = _load("soft_tiny", _save(tmp_path, tiny.state_dict()), img_size=448)
    old = tiny.stages[0].pos_embed.reshape(1, 56, 56, 64).permute(0, 3, 1, 2)
    expected = F.interpolate(old, size=(112, 112), mode="bilinear", align_corners=False)
    torch.testing.assert_close(model.stages[0].pos_embed, expected.flatten(2).transpose(1, 2))
    cls_row = model.stages[3].pos_embed[:, 0]
    torch.testing.assert_close(cls_row, tiny.stages[3].pos_embed[:, 0])  # the class token's row is kept as is
    assert model.stages[3].pos_embed.shape == (1, 1 + 14 * 14, 512)
    x = torch.randn(1, 3, 448, 448)
    with torch.no_grad():  # resampled once at load = resampled on the fly by the 224 px model
        torch.testing.assert_close(model(x), tiny(x), atol=1e-4, rtol=1e-4)


def test_timm_training_checkpoints_load_ema_weights_args_and_module_prefix(tiny, tmp_path):
    ema = {f"module.{k}": v + 1 if v.is_floating_point() else v for k, v in tiny.state_dict().items()}
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 299, "arch": "soft_tiny", "args": argparse.Namespace(lr=1e-3), "state_dict": tiny.state_dict(),
                "state_dict_ema": ema}, path)
    model = _load("soft_tiny", str(path))
    torch.testing.assert_close(model.head.bias, tiny.head.bias + 1)


def test_a_checkpoint_of_another_variant_names_the_variant_it_fits(tmp_path):
    small = timm.create_model("soft_small").state_dict()
    with pytest.raises(EffdlError, match=r"does not fit soft_tiny: it is a checkpoint of soft_small or "
                                         r"soft_norm_small, not soft_tiny; unexpected keys stages.1.blocks.2"):
        _load("soft_tiny", _save(tmp_path, small))


def test_a_file_that_is_not_a_state_dict_is_named(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(EffdlError, match=r"notes.pth is not a PyTorch state dict"):
        _load("soft_tiny", str(text))
    config = tmp_path / "config.pth"
    torch.save({"epoch": 3, "lr": 0.1}, config)
    with pytest.raises(EffdlError, match=r"config.pth holds no state dict: found a dict with keys epoch, lr"):
        _load("soft_tiny", str(config))
    with pytest.raises(EffdlError, match=r"missing.pth does not exist"):
        _load("soft_tiny", str(tmp_path / "missing.pth"))


def test_a_safetensors_checkpoint_loads(tiny, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file(tiny.state_dict(), path)
    torch.testing.assert_close(_load("soft_tiny", str(path)).head.weight, tiny.head.weight)


def test_img_size_must_be_a_multiple_of_32():
    with pytest.raises(EffdlError, match="img_size must be a multiple of 32, got 200"):
        timm.create_model("soft_tiny", img_size=200)


def test_features_only_gives_the_four_stages_with_their_strides(tiny, tmp_path):
    features = timm.create_model("soft_tiny", features_only=True, pretrained=True,
                                 pretrained_cfg_overlay={"file": _save(tmp_path, tiny.state_dict())}).eval()
    assert features.feature_info.channels() == [64, 128, 320, 512]
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        maps = features(x)
        tokens = tiny.forward_features(x)  # (2, 1 + 3*4, 512), final norm applied
    assert [tuple(m.shape) for m in maps] == [(2, 64, 24, 32), (2, 128, 12, 16), (2, 320, 6, 8), (2, 512, 3, 4)]
    # Stage 4's map is the classifier's last tokens before the final norm, class token dropped.
    torch.testing.assert_close(tiny.norm(maps[3].flatten(2).transpose(1, 2)), tokens[:, 1:], atol=1e-5, rtol=1e-5)
    last_two = timm.create_model("soft_tiny", features_only=True, out_indices=(2, 3))
    assert last_two.feature_info.reduction() == [16, 32]


def test_features_only_rejects_a_stage_that_does_not_exist():
    with pytest.raises(EffdlError, match=r"soft_tiny has stages 0-3 \(strides 4, 8, 16, 32\); out_indices asks for "
                                         r"\[4\]"):
        timm.create_model("soft_tiny", features_only=True, out_indices=(1, 4))
