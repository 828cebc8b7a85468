"""The FPDT stage of ``effdl demo``: train at a length plain training cannot fit in the stage's memory budget."""

from __future__ import annotations

from pathlib import Path

from effdl.core.config import ModelConfig
from effdl.fpdt.measure import MiB, measure_step_fresh
from effdl.fpdt.pipeline import FPDTConfig
from effdl.fpdt.train import train_fpdt
from effdl.report import bar_plot, line_plot, markdown_table
from effdl.stage import StageReport
from effdl.train.lm import TrainConfig

# Below this a step's peak is mostly the allocator's and Python's own churn, not the method's activations.
MIN_MEASURABLE_MIB = 2.0


def fpdt_stage(out_dir: Path, quick: bool) -> StageReport:
    """Measure one training step's peak memory, plain vs FPDT, at the same length, each in a fresh process; then
    train with FPDT."""
    seq_len, chunk, budget_mib = (512, 128, 32) if quick else (4096, 1024, 128)
    model_cfg = ModelConfig.preset("tiny", max_seq_len=seq_len)
    fpdt = FPDTConfig(chunk_size=chunk, offload="disk", spill_dir=str(out_dir / "fpdt-spill"))
    plain, ours = (measure_step_fresh(method, model_cfg, seq_len, fpdt, warm_len=chunk).peak_bytes / MiB
                   for method in ("plain", "fpdt"))

    cfg = TrainConfig(preset="tiny", seq_len=seq_len, batch_size=1, steps=3 if quick else 40,
                      warmup_steps=1 if quick else 4, eval_every=0, eval_batches=1, lr=3e-3,
                      max_time_s=None if quick else 35.0, out_dir=str(out_dir / "fpdt"))
    result = train_fpdt(cfg, fpdt)
    memory_plot = bar_plot(out_dir / "fpdt_memory.png", [f"one training step at {seq_len:,} tokens"],
                           {"plain": [plain], "FPDT (disk offload)": [ours]},
                           title="Peak memory of one step above the pre-step level (fresh process each)",
                           ylabel="MiB", hline=(budget_mib, f"budget {budget_mib} MiB"), value_format="{:,.0f} MiB")
    loss_plot = line_plot(out_dir / "fpdt_loss.png", {"train": ([s for s, _ in result.losses],
                                                                [v for _, v in result.losses])},
                          title=f"FPDT training at {seq_len:,} tokens per sequence", xlabel="step",
                          ylabel="cross-entropy (nats/byte)")
    if min(plain, ours) < MIN_MEASURABLE_MIB:
        ratio = "too small to measure at --quick size" if quick else "too small to measure"
    else:
        ratio = f"{plain / ours:.1f}x less than plain"
    rows = [
        ("model", f"tiny Llama, {model_cfg.num_params() / 1e6:.1f}M params, sequence {seq_len:,}, chunk {chunk:,}"),
        ("peak memory of one step: plain", f"{plain:,.0f} MiB ({'over' if plain > budget_mib else 'within'} "
                                           f"the {budget_mib} MiB budget)"),
        ("peak memory of one step: FPDT", f"{ours:,.0f} MiB ({ratio})"),
        ("FPDT training", f"{result.step} steps, loss {result.losses[0][1]:.2f} -> {result.losses[-1][1]:.2f}, "
                          f"val {result.metrics['val_loss']:.2f}, {result.items_per_s:,.0f} tokens/s"),
    ]
    markdown = (markdown_table(["metric", "value"], rows) + f"\n![memory]({memory_plot.name})\n"
                f"![loss]({loss_plot.name})\n\nEach peak is the resident-memory high-water mark of one step "
                "(forward, backward, AdamW) above the level just before it, in a process of its own.\n")
    headline = f"{seq_len:,} tokens: peak plain {plain:,.0f} MiB vs FPDT {ours:,.0f} MiB ({ratio}); trains to " \
               f"loss {result.losses[-1][1]:.2f}"
    metrics = {"plain_peak_mib": plain, "fpdt_peak_mib": ours, "budget_mib": float(budget_mib)}
    return StageReport("FPDT: long-sequence training under a memory budget", headline, rows, markdown,
                       [memory_plot, loss_plot], metrics)
