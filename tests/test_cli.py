"""Every CLI verb, run as a user would run it (a subprocess of the installed console script)."""

import subprocess
import sys

import pytest


def effdl(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "effdl.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_lm_train_resume_generate(tmp_path):
    run = tmp_path / "run"
    out = effdl("lm", "train", "--steps", "4", "--seq-len", "32", "--batch-size", "2", "--ckpt-every", "2",
                "--out", str(run))
    assert out.returncode == 0, out.stderr
    assert "trained to step 4" in out.stdout
    out = effdl("lm", "train", "--resume", str(run), "--steps", "6")
    assert out.returncode == 0, out.stderr
    assert "trained to step 6" in out.stdout and "checkpoint-000006" in out.stdout
    out = effdl("lm", "generate", "--model", str(run / "checkpoint-000006"), "--prompt", "import ",
                "--max-tokens", "16", "--seed", "3")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("import ")


def test_lm_presets():
    out = effdl("lm", "presets")
    assert out.returncode == 0
    for name in ("tiny", "small", "llama-125m", "moe-tiny"):
        assert name in out.stdout


def test_demo_quick(tmp_path):
    out = effdl("demo", "--quick", "--out", str(tmp_path / "demo"))
    assert out.returncode == 0, out.stderr
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "Language model" in report and "lm_loss.png" in report
    assert "SOFT" in report and "soft_attention.png" in report
    assert "Flover" in report and "flover_latency.png" in report
    assert "FPDT" in report and "fpdt_memory.png" in report
    for plot in ("lm_loss.png", "soft_attention.png", "flover_latency.png", "fpdt_memory.png", "fpdt_loss.png"):
        assert (tmp_path / "demo" / plot).stat().st_size > 1000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["lm", "generate", "--model", "/does/not/exist"], "checkpoint folder /does/not/exist does not exist"),
        (["lm", "train", "--preset", "huge"], "unknown preset 'huge'; valid presets: tiny"),
        (["lm", "train", "--steps", "0"], "steps must be positive"),
        (["demo", "--only", "nope"], "unknown demo stage 'nope'; stages: lm, soft, fpdt, flover"),
        (["fpdt", "train", "--chunk-size", "0"], "chunk_size must be positive"),
        (["fpdt", "train", "--seq-len", "512", "--chunk-size", "1024"], "chunk_size 1024 is longer than the sequence"),
        (["fpdt", "train", "--sp", "2"], "--sp 2 but 1 process(es) were launched"),
        (["fpdt", "train", "--spill-dir", "/proc/nope"], "spill folder /proc/nope is not writable"),
        (["fpdt", "plan", "--gpu-mem", "40xb"], "cannot read '40xb' as a size"),
        (["fpdt", "plan", "--gpu-mem", "8GiB"], "the model state alone needs"),
        (["fpdt", "eval", "--model", "/does/not/exist"], "does not exist"),
        (["flover", "serve", "--model", "nothing-here"], "--model 'nothing-here' is neither a checkpoint folder"),
        (["flover", "serve", "--tp", "2"], "--tp 2 needs 2 processes"),
    ],
)
def test_bad_input_is_one_clear_line(args, message):
    out = effdl(*args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_prompt_longer_than_max_seq_len(tmp_path):
    from effdl.core.config import ModelConfig
    from effdl.core.hf import save_checkpoint
    from effdl.core.transformer import Transformer

    save_checkpoint(Transformer(ModelConfig.preset("tiny", max_seq_len=16)), tmp_path)
    out = effdl("lm", "generate", "--model", str(tmp_path), "--prompt", "x" * 40)
    assert out.returncode == 2
    assert "prompt has 40 tokens but the model's max_seq_len is 16" in out.stderr
