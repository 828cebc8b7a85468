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
    assert "SPRNet" in report and "sprnet_overlay.png" in report and "segm" in report
    assert "Flover" in report and "flover_latency.png" in report
    assert "FPDT" in report and "fpdt_memory.png" in report
    assert "ExFlow" in report and "exflow_affinity.png" in report and "same greedy tokens in both modes | yes" in report
    for plot in ("lm_loss.png", "soft_attention.png", "sprnet_overlay.png", "flover_latency.png", "fpdt_memory.png",
                 "fpdt_loss.png", "exflow_affinity.png", "exflow_placement.png"):
        assert (tmp_path / "demo" / plot).stat().st_size > 1000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["lm", "generate", "--model", "/does/not/exist"], "checkpoint folder /does/not/exist does not exist"),
        (["lm", "train", "--preset", "huge"], "unknown preset 'huge'; valid presets: tiny"),
        (["lm", "train", "--steps", "0"], "steps must be positive"),
        (["demo", "--only", "nope"], "unknown demo stage 'nope'; stages: lm, soft, sprnet, fpdt, exflow, flover"),
        (["fpdt", "train", "--chunk-size", "0"], "chunk_size must be positive"),
        (["fpdt", "train", "--seq-len", "512", "--chunk-size", "1024"], "chunk_size 1024 is longer than the sequence"),
        (["fpdt", "train", "--sp", "2"], "--sp 2 but 1 process(es) were launched"),
        (["fpdt", "train", "--spill-dir", "/proc/nope"], "spill folder /proc/nope is not writable"),
        (["fpdt", "plan", "--gpu-mem", "40xb"], "cannot read '40xb' as a size"),
        (["fpdt", "plan", "--gpu-mem", "8GiB"], "the model state alone needs"),
        (["fpdt", "eval", "--model", "/does/not/exist"], "does not exist"),
        (["flover", "serve", "--model", "nothing-here"], "--model 'nothing-here' is neither a checkpoint folder"),
        (["flover", "serve", "--tp", "2"], "--tp 2 needs 2 processes"),
        (["exflow", "trace", "--model", "/does/not/exist"], "does not exist"),
        (["exflow", "place", "--trace", "/no/trace.npz", "--gpus", "2"], "routing trace /no/trace.npz does not exist"),
        (["exflow", "affinity", "--checkpoints", "/no/run"], "checkpoint /no/run does not exist"),
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


def test_exflow_workflow(tmp_path):
    """train -> trace (held-in, held-out) -> affinity -> place -> simulate -> torchrun run, and its bad inputs."""
    run, fit, held_out, placement = tmp_path / "moe", tmp_path / "fit.npz", tmp_path / "val.npz", tmp_path / "p.json"
    out = effdl("lm", "train", "--preset", "gpt-moe-8e", "--steps", "2", "--seq-len", "32", "--batch-size", "2",
                "--ckpt-every", "1", "--out", str(run))
    assert out.returncode == 0, out.stderr
    for split, path in (("train", fit), ("val", held_out)):
        out = effdl("exflow", "trace", "--model", str(run), "--split", split, "--tokens", "1024", "--out", str(path))
        assert out.returncode == 0, out.stderr
        assert "1,024 tokens x 6 layers x top-1" in out.stdout and path.with_suffix(".png").is_file()
    out = effdl("exflow", "affinity", "--checkpoints", str(run), "--tokens", "512", "--out", str(tmp_path / "a.png"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "a.png").is_file() and "affinity score" in out.stdout
    out = effdl("exflow", "place", "--trace", str(fit), "--eval-trace", str(held_out), "--gpus", "2",
                "--time-limit", "2", "--out", str(placement))
    assert out.returncode == 0, out.stderr
    assert "round_robin" in out.stdout and "ilp" in out.stdout and placement.is_file()
    out = effdl("exflow", "simulate", "--trace", str(held_out), "--placement", str(placement), "--gpus-per-node", "1")
    assert out.returncode == 0, out.stderr
    assert "standard" in out.stdout and "coherent" in out.stdout

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd = [*torchrun, "-m", "effdl.cli", "exflow", "run", "--model", str(run), "--placement", str(placement),
           "--requests", "4", "--prompt-len", "16", "--new-tokens", "4"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert "coherent expert parallelism on 2 ranks" in out.stdout and "context syncs per step 1" in out.stdout

    # Bad input: one clear line, no traceback.
    bad = [
        (["exflow", "run", "--model", str(run), "--placement", str(placement)],
         "the placement is for 2 ranks but the world size is 1"),
        (["exflow", "place", "--trace", str(fit), "--gpus", "3"], "8 experts cannot be split evenly over 3 GPUs"),
    ]
    other = tmp_path / "other"
    assert effdl("lm", "train", "--preset", "gpt-moe-16e", "--steps", "1", "--seq-len", "16", "--batch-size", "1",
                 "--out", str(other)).returncode == 0
    other_trace = tmp_path / "other.npz"
    assert effdl("exflow", "trace", "--model", str(other), "--tokens", "256", "--out", str(other_trace)).returncode == 0
    bad += [
        (["exflow", "place", "--trace", str(fit), "--eval-trace", str(other_trace), "--gpus", "2"],
         "the held-in and held-out traces come from different models"),
        (["exflow", "run", "--model", str(other), "--placement", str(placement)], "the placement is for 6 layers x 8"),
        (["exflow", "simulate", "--trace", str(other_trace), "--placement", str(placement)],
         "the trace has 6 layers x 16 experts but placement p has 6 x 8"),
        (["exflow", "trace", "--model", str(run), "--tokens", "10"], "do not fill one window"),
    ]
    for args, message in bad:
        out = effdl(*args)
        assert out.returncode == 2, (args, out.stderr)
        assert message in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr
