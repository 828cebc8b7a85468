"""The FPDT stage of ``effdl demo``: train at a length plain training cannot fit in the stage's memory budget."""

from __future__ import annotations

from pathlib import Path

from effdl.core.config import ModelConfig
from effdl.core.trainer import TrainConfig
from effdl.demo import StageReport
from effdl.fpdt.memory import MiB, loss_fn_for, measure_step, release_large_frees, warmed_model
from effdl.fpdt.model import FPDTConfig
from effdl.fpdt.train import train_fpdt
from effdl.report import bar_plot, line_plot, markdown_table


def fpdt_stage(out_dir: Path, quick: bool) -> StageReport:
    """Measure one training step's peak memory, plain vs FPDT, at the same length; then train with FPDT."""
    release_large_frees()
    seq_len, chunk, budget_mib = (512, 128, 32) if quick else (4096, 1024, 128)
    model_cfg = ModelConfig.preset("tiny", max_seq_len=seq_len)
    fpdt = FPDTConfig(chunk_size=chunk, offload="disk", spill_dir=str(out_dir / "fpdt-spill"))
    peaks = {}
    for label, method in (("FPDT (disk offload)", "fpdt"), ("plain", "plain")):  # FPDT first: see memory.py
        loss_fn = loss_fn_for(method, fpdt)
        model, optimizer = warmed_model(model_cfg, loss_fn, warm_len=chunk)
        peaks[label] = measure_step(model, optimizer, loss_fn, seq_len).peak_bytes / MiB
        del model, optimizer

    cfg = TrainConfig(preset="tiny", seq_len=seq_len, batch_size=1, steps=3 if quick else 40,
                      warmup_steps=1 if quick else 4, eval_every=0, eval_batches=1, lr=3e-3,
                      max_time_s=None if quick else 50.0, out_dir=str(out_dir / "fpdt"))
    result = train_fpdt(cfg, fpdt)
    memory_plot = bar_plot(out_dir / "fpdt_memory.png", [f"one step at {seq_len:,} tokens"],
                           {label: [mib] for label, mib in peaks.items()},
                           title=f"Peak activation memory (budget {budget_mib} MiB)", ylabel="MiB above baseline")
    loss_plot = line_plot(out_dir / "fpdt_loss.png", {"train": ([s for s, _ in result.losses],
                                                                [v for _, v in result.losses])},
                          title=f"FPDT training at {seq_len:,} tokens per sequence", xlabel="step",
                          ylabel="cross-entropy (nats/byte)")
    plain, ours = peaks["plain"], peaks["FPDT (disk offload)"]
    rows = [
        ("model", f"tiny Llama, {model_cfg.num_params() / 1e6:.1f}M params, sequence {seq_len:,}, chunk {chunk:,}"),
        ("peak memory of one step: plain", f"{plain:,.0f} MiB ({'over' if plain > budget_mib else 'within'} "
                                           f"the {budget_mib} MiB budget)"),
        ("peak memory of one step: FPDT", f"{ours:,.0f} MiB ({plain / ours:.1f}x less)"),
        ("FPDT training", f"{result.step} steps, loss {result.losses[0][1]:.2f} -> {result.losses[-1][1]:.2f}, "
                          f"val {result.evals[-1][1]:.2f}, {result.tokens_per_s:,.0f} tokens/s"),
    ]
    markdown = (markdown_table(["metric", "value"], rows) + f"\n![memory]({memory_plot.name})\n"
                f"![loss]({loss_plot.name})\n")
    headline = f"{seq_len:,} tokens: plain {plain:,.0f} MiB vs FPDT {ours:,.0f} MiB; trains to loss " \
               f"{result.losses[-1][1]:.2f}"
    return StageReport("FPDT: long-sequence training under a memory budget", headline, rows, markdown,
                       [memory_plot, loss_plot])
