"""FPDT training end to end: the loss falls, resume is exact, 2 ranks train like 1; the memory planner."""

import subprocess
import sys

import pytest
import torch

from effdl.core.config import ModelConfig
from effdl.core.hf import load_checkpoint
from effdl.distributed import spawn
from effdl.errors import EffdlError
from effdl.fpdt.pipeline import FPDTConfig
from effdl.fpdt.plan import activation_bytes, longest_sequence, parse_bytes, plan
from effdl.fpdt.train import loss_by_position, train_fpdt
from effdl.train.lm import TrainConfig, resume_config

# benchmarks/fpdt_maxlen.py's model. With the tiny preset, FPDT's chunk buffers (512 KiB) fall below the
# 1 MiB mmap threshold and the heap's reuse makes single-step peaks too noisy to check a model against.
BENCH_MODEL = dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=682, vocab_size=258, max_seq_len=8192)


def _cfg(out_dir, steps=4, **kw):
    return TrainConfig(preset="tiny", seq_len=512, batch_size=1, steps=steps, warmup_steps=1, eval_every=0,
                       eval_batches=1, out_dir=str(out_dir), lr=3e-3, **kw)


def test_train_resume_is_bit_exact_and_loss_falls(tmp_path):
    """Resumed from step 2 of 6 in another folder, FPDT training matches the run that went on: every step's loss
    and every weight bit for bit (as tests/core/test_trainer.py checks for the plain loss)."""
    fpdt = FPDTConfig(chunk_size=128, offload="disk", spill_dir=str(tmp_path / "spill"))
    straight = train_fpdt(_cfg(tmp_path / "straight", steps=6, ckpt_every=2), fpdt, progress=False)
    ckpt = tmp_path / "straight" / "checkpoint-000002"
    resumed = train_fpdt(resume_config(ckpt, out_dir=str(tmp_path / "resumed")), fpdt, resume=ckpt, progress=False)
    assert resumed.step == 6 and resumed.checkpoint == tmp_path / "resumed" / "checkpoint-000006"
    assert resumed.losses == straight.losses
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    assert straight.losses[-1][1] < straight.losses[0][1] - 0.3
    assert list((tmp_path / "spill").iterdir()) == []


def _train_rank(rank, out_dir):
    result = train_fpdt(_cfg(out_dir, steps=3), FPDTConfig(chunk_size=128, offload="none", sp_size=2),
                        progress=False)
    return [v for _, v in result.losses]


def test_two_ranks_train_like_one(tmp_path):
    one = train_fpdt(_cfg(tmp_path / "one", steps=3), FPDTConfig(chunk_size=128, offload="none"), progress=False)
    for losses in spawn(_train_rank, 2, str(tmp_path / "two"), timeout_s=300):
        assert losses == pytest.approx([v for _, v in one.losses], rel=1e-4)
    assert (tmp_path / "two" / "checkpoint-000003" / "config.json").is_file()  # written once, by rank 0


def test_loss_by_position_shape_and_finite(tmp_path):
    from effdl.core.transformer import Transformer

    curve = loss_by_position(Transformer(ModelConfig.preset("tiny", n_layers=1)), seq_len=256, windows=2)
    assert curve.shape == (256,) and torch.isfinite(curve).all()


def test_parse_bytes():
    assert parse_bytes("40GiB") == 40 * 2**30
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("1.5 MiB") == int(1.5 * 2**20)
    with pytest.raises(EffdlError, match="cannot read"):
        parse_bytes("lots")


def test_plan_orders_methods_and_respects_budgets():
    cfg = ModelConfig.preset("llama-8b")
    budget, rows = plan(cfg, gpus=4, gpu_mem=80 * 2**30, host_mem=2**40)
    by = {r.method: r for r in rows}
    assert by["fpdt"].max_tokens >= 16 * by["plain"].max_tokens
    assert by["checkpoint"].max_tokens > by["plain"].max_tokens
    for r in rows:
        assert r.activation_bytes <= budget
        assert activation_bytes(r.method, cfg, r.max_tokens + 65536, r.ranks, 65536, 2) > budget or \
            r.method == "fpdt"  # FPDT is bounded by host memory here
    assert by["fpdt"].offloaded_bytes <= 2**40 // 4
    small = longest_sequence("plain", ModelConfig.preset("tiny"), 2**20, step=1)
    assert activation_bytes("plain", ModelConfig.preset("tiny"), small) <= 2**20 < \
        activation_bytes("plain", ModelConfig.preset("tiny"), small + 1)


def test_plan_prediction_within_25_percent_of_a_measured_step():
    """The memory model against real steps in a fresh process, in the benchmark's configuration at 4K tokens."""
    code = (
        "from effdl.core.config import ModelConfig\n"
        "from effdl.fpdt.measure import *\n"
        "from effdl.fpdt.pipeline import FPDTConfig\n"
        "release_large_frees()\n"
        f"cfg = ModelConfig(**{BENCH_MODEL!r})\n"
        "for m in ('fpdt', 'checkpoint', 'plain'):\n"  # smallest first: later steps cannot reuse freed pages
        "    fn = loss_fn_for(m, FPDTConfig(chunk_size=2048, offload='disk'))\n"
        "    model, opt = warmed_model(cfg, fn, warm_len=2048)\n"
        "    print(m, measure_step(model, opt, fn, 4096).peak_bytes)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    for line in out.stdout.splitlines():
        method, measured = line.split()
        predicted = activation_bytes(method, ModelConfig(**BENCH_MODEL), 4096, chunk=2048)
        assert 0.75 <= predicted / int(measured) <= 1.25, (method, predicted, measured)
