"""SPRNet trainer and CLI: exact resume, checkpoints that rebuild the model, train/eval/predict commands, bad data."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from effdl.cli import main as cli_main
from effdl.errors import EffdlError
from effdl.sprnet import model as sprnet_model
from effdl.sprnet.data import write_shapes_dataset
from effdl.sprnet.train import FAMILY_LR, DetectionTrainConfig, load_detector, train_detector


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(root, "train", num_images=8, image_size=64, seed=1)
    write_shapes_dataset(root, "val", num_images=4, image_size=64, seed=1)
    return root


def _config(shapes, out, **kw) -> DetectionTrainConfig:
    return DetectionTrainConfig(data=str(shapes), min_size=64, max_size=64, batch_size=4, warmup_steps=1,
                                out_dir=str(out), **kw)


def test_resume_is_bit_exact_and_checkpoints_rebuild_the_model(shapes, tmp_path):
    """Stopped after its first step and resumed for 4 more (2 steps an epoch: through two new epoch orders), a
    run matches an uninterrupted one bit for bit: every step's loss, the last evaluation and every weight."""
    kw = dict(epochs=2.5, eval_every=2)
    straight = train_detector(_config(shapes, tmp_path / "a", **kw), progress=False)
    half = train_detector(_config(shapes, tmp_path / "b", max_time_s=0.0, **kw), progress=False)
    assert half.step == 1
    resumed = train_detector(_config(shapes, tmp_path / "b", **kw), resume=half.checkpoint, progress=False)
    assert resumed.step == straight.step == 5
    assert resumed.losses == straight.losses
    assert resumed.evals[-1] == straight.evals[-1]
    a, _, names = load_detector(straight.checkpoint, device="cpu")
    b, cfg, _ = load_detector(tmp_path / "b", device="cpu")  # a run folder loads its newest checkpoint
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert names == ["circle", "square", "triangle", "ellipse", "star"] and cfg.model == "sprnet_fcos_resnet18_fpn"
    assert set(resumed.metrics) == {"bbox", "segm"} and 0 <= resumed.metrics["segm"]["AP"] <= 1
    history = json.loads((tmp_path / "b" / "history.json").read_text())
    assert [e["step"] for e in history["evals"]] == [1, 4, 5]  # the interrupted step, every second epoch, the end


@pytest.mark.parametrize("model,iou_types", [("maskrcnn", {"bbox", "segm"}), ("retinanet", {"bbox"})])
def test_baselines_train_with_the_same_recipe(shapes, tmp_path, model, iou_types):
    result = train_detector(_config(shapes, tmp_path, model=model, epochs=1), progress=False)
    assert set(result.metrics) == iou_types
    assert load_detector(result.checkpoint, device="cpu")[1].model == f"{model}_resnet18_fpn"


def effdl(*args):
    return subprocess.run([sys.executable, "-m", "effdl.cli", "sprnet", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_train_eval_predict(shapes, tmp_path):
    run = tmp_path / "run"
    out = effdl("train", "--data", str(shapes), "--epochs", "1", "--min-size", "64", "--max-size", "64",
                "--out", str(run), "--model", "sprnet_fcos_resnet18_fpn", "--model-option", "class_agnostic_masks=true",
                "--model-option", "mask_size=16")
    assert out.returncode == 0, out.stderr
    assert "segm" in out.stdout and "bbox" in out.stdout
    model, cfg, _ = load_detector(run, device="cpu")
    defaults = _config(shapes, tmp_path, model="sprnet_fcos_resnet18_fpn").model_options  # the pinned defaults
    assert cfg.model_options == {**defaults, "class_agnostic_masks": True, "mask_size": 16}
    assert model.class_agnostic_masks and model.mask_head.mask_size == 16
    out = effdl("eval", "--checkpoint", str(run))
    assert out.returncode == 0, out.stderr
    assert "AP50" in out.stdout and "segm" in out.stdout
    image = tmp_path / "gray.png"
    Image.new("L", (80, 60), 128).save(image)  # grayscale, and a size the model has not seen
    out = effdl("predict", str(image), "--checkpoint", str(run), "--out", str(tmp_path / "o.png"),
                "--score-threshold", "0.0")
    assert out.returncode == 0, out.stderr
    assert Image.open(tmp_path / "o.png").size == (80, 60)
    out = effdl("predict", str(tmp_path / "missing.png"), "--checkpoint", str(run))
    assert out.returncode == 2 and "missing.png" in out.stderr and "Traceback" not in out.stderr


def test_a_data_error_stops_training_before_the_first_step(shapes, tmp_path):
    root = tmp_path / "bad"
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        (root / split).symlink_to(shapes / split)
        data = json.loads((shapes / "annotations" / f"instances_{split}.json").read_text())
        if split == "train":
            data["annotations"][-1]["bbox"][2] = 0.0
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    with pytest.raises(EffdlError, match="positive height and width"):
        train_detector(_config(root, tmp_path / "run", epochs=1), progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(EffdlError, match="unknown model 'maskrcnn_vgg'"):
        _config(root, tmp_path, model="maskrcnn_vgg")
    with pytest.raises(EffdlError, match="unknown model option 'mask_sise' for sprnet_fcos_resnet18_fpn; it takes "
                                         "center_sampling_radius, class_agnostic_masks"):
        _config(root, tmp_path, model="sprnet_fcos_resnet18_fpn", model_options={"mask_sise": 64})
    with pytest.raises(EffdlError, match="'min_size' is set by the config itself"):
        _config(root, tmp_path, model_options={"min_size": 64})
    out = effdl("train", "--data", str(root), "--model-option", "mask_size")
    assert out.returncode == 2 and "expected KEY=VALUE" in out.stderr


def test_the_mask_head_trains_at_its_own_multiple_of_the_family_learning_rate(shapes, tmp_path, monkeypatch):
    """``mask_head_lr_scale`` puts exactly the SPR mask head's parameters in a group of their own; with no ``lr``
    given the optimizer runs at the model family's rate."""
    import effdl.sprnet.train as train_module

    groups, rates = [], []
    real_adamw = torch.optim.AdamW

    def recording_adamw(params, **kw):
        groups.extend(params)
        rates.append(kw["lr"])
        return real_adamw(params, **kw)

    monkeypatch.setattr(train_module.torch.optim, "AdamW", recording_adamw)
    cfg = _config(shapes, tmp_path / "run", model="sprnet_fcos_resnet18_fpn", epochs=0.5, mask_head_lr_scale=5.0)
    train_detector(cfg, progress=False)
    model, _, _ = load_detector(tmp_path / "run", device="cpu")
    head = [g for g in groups if g.get("lr_scale") == 5.0]
    assert len(head) == 1 and len(head[0]["params"]) == len(list(model.mask_head.parameters()))
    assert sum(len(g["params"]) for g in groups) == len([p for p in model.parameters() if p.requires_grad])
    assert rates == [FAMILY_LR["sprnet_fcos"]] and FAMILY_LR["sprnet_fcos"] != FAMILY_LR["retinanet"]
    assert _config(shapes, tmp_path, model="sprnet_fcos_resnet18_fpn", lr=1e-4).lr == 1e-4
    assert _config(shapes, tmp_path, model="retinanet").lr == FAMILY_LR["retinanet"]
    with pytest.raises(EffdlError, match="mask_head_lr_scale is for the SPR families"):
        _config(shapes, tmp_path, model="maskrcnn", mask_head_lr_scale=5.0)
    with pytest.raises(EffdlError, match="mask_head_lr_scale must be positive"):
        _config(shapes, tmp_path, model="sprnet_fcos_resnet18_fpn", mask_head_lr_scale=0.0)


def test_a_checkpoint_built_with_other_options_is_refused_by_name_and_loads_with_its_own(shapes, tmp_path):
    cfg = _config(shapes, tmp_path / "run", model="sprnet_fcos_resnet18_fpn", model_options={"fpn_channels": 64},
                  max_time_s=0.0)
    train_detector(cfg, progress=False)
    with pytest.raises(EffdlError, match=r"does not fit sprnet_fcos_resnet18_fpn with model options \{\}.*size "
                                         r"mismatch.*load_detector\(path, model_options="):
        load_detector(tmp_path / "run", device="cpu", model_options={})
    model, _, _ = load_detector(tmp_path / "run", device="cpu")
    assert model.backbone.out_channels == 64


@pytest.mark.parametrize("name", ["sprnet_resnet18_fpn", "sprnet_fcos_resnet18_fpn", "retinanet_resnet18_fpn"])
def test_detector_defaults_are_what_the_builder_builds(name):
    model = sprnet_model.build_detector(name, 3)
    attributes = {k: v for k, v in sprnet_model.detector_defaults(name).items() if hasattr(model, k)}
    assert {"detections_per_img", *(["mask_score_thresh"] if "sprnet" in name else [])} <= set(attributes)
    assert {k: getattr(model, k) for k in attributes} == attributes


def test_a_checkpoint_keeps_the_defaults_it_was_trained_with_when_they_change(shapes, tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = _config(shapes, run, model="sprnet_fcos_resnet18_fpn", model_options={"mask_size": 16}, max_time_s=0.0)
    assert cfg.model_options["mask_centre_sampling"] is True and cfg.model_options["mask_size"] == 16
    assert "weights_backbone" not in cfg.model_options  # the config's own field
    train_detector(cfg, progress=False)
    monkeypatch.setitem(sprnet_model.BUILDER_DEFAULTS, "sprnet_fcos",
                        {**sprnet_model.BUILDER_DEFAULTS["sprnet_fcos"], "mask_centre_sampling": False})
    assert _config(shapes, run, model="sprnet_fcos_resnet18_fpn").model_options["mask_centre_sampling"] is False
    model, loaded, _ = load_detector(run, device="cpu")
    assert model.mask_centre_sampling is True and model.mask_head.mask_size == 16
    assert loaded.model_options == cfg.model_options
    # in this process, so that the CLI resumes under the changed default
    assert cli_main(["sprnet", "train", "--resume", str(run), "--epochs", "1", "--model-option",
                     "mask_scoring=true"]) == 0
    _, resumed, _ = load_detector(run, device="cpu")
    assert resumed.model_options == {**cfg.model_options, "mask_scoring": True}
