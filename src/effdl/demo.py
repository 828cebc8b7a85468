"""``effdl demo``: a tour of every system, one stage each, with a report in ./effdl-demo/.

Each stage is a function ``(out_dir, quick) -> StageReport`` registered in
``STAGES``; a stage gets about 90 seconds on 2 CPU cores (``quick`` shrinks it
to seconds, for smoke tests).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from effdl.errors import EffdlError
from effdl.report import console, line_plot, markdown_table, print_table


@dataclass
class StageReport:
    title: str
    headline: str  # one line for the demo's summary table
    rows: list[tuple[str, str]]  # (metric, value) pairs for the summary table
    markdown: str  # the stage's section of report.md
    images: list[Path] = field(default_factory=list)


def lm_stage(out_dir: Path, quick: bool) -> StageReport:
    """Train a tiny Llama on the stdlib corpus for about a minute, then sample from it."""
    from effdl.core.generate import generate
    from effdl.core.hf import load_checkpoint
    from effdl.core.tokenizer import ByteTokenizer
    from effdl.core.trainer import TrainConfig, train

    cfg = TrainConfig(preset="tiny", seq_len=64 if quick else 256, batch_size=4 if quick else 16,
                      steps=3 if quick else 100, warmup_steps=1 if quick else 10, eval_every=0 if quick else 20,
                      eval_batches=2 if quick else 8, max_time_s=None if quick else 80.0,
                      out_dir=str(out_dir / "lm"))
    result = train(cfg)
    model = load_checkpoint(result.checkpoint)
    tok = ByteTokenizer()
    prompt = "def fibonacci(n):\n"
    sample = tok.decode(generate(model, tok.encode(prompt), 48 if quick else 160, temperature=0.9, top_p=0.9,
                                 seed=0))
    plot = line_plot(out_dir / "lm_loss.png", {
        "train": ([s for s, _ in result.losses], [v for _, v in result.losses]),
        "validation": ([s for s, _ in result.evals], [v for _, v in result.evals]),
    }, title="Tiny Llama on the Python stdlib (byte level)", xlabel="step", ylabel="cross-entropy (nats/byte)")

    uniform = math.log(tok.vocab_size)
    rows = [
        ("model", f"tiny Llama, {model.config.num_params() / 1e6:.1f}M params"),
        ("steps x tokens", f"{result.step} x {cfg.batch_size * cfg.seq_len}"),
        ("train tokens/s", f"{result.tokens_per_s:,.0f}"),
        (f"val loss (uniform guess = {uniform:.2f})", f"{result.evals[-1][1]:.3f}"),
        ("checkpoint (HF format)", str(result.checkpoint)),
    ]
    markdown = (markdown_table(["metric", "value"], rows) + f"\n![loss]({plot.name})\n\n"
                f"Sample (temperature 0.9, top-p 0.9):\n\n```python\n{prompt}{sample}\n```\n")
    headline = f"val loss {uniform:.2f} (uniform) -> {result.evals[-1][1]:.2f} in {result.step} steps"
    return StageReport("Language model: train + generate", headline, rows, markdown, [plot])


def _soft_stage(out_dir: Path, quick: bool) -> StageReport:
    from effdl.soft.demo import soft_stage

    return soft_stage(out_dir, quick)


def _sprnet_stage(out_dir: Path, quick: bool) -> StageReport:
    from effdl.sprnet.demo import sprnet_stage

    return sprnet_stage(out_dir, quick)


def _flover_stage(out_dir: Path, quick: bool) -> StageReport:
    from effdl.flover.demo import flover_stage

    return flover_stage(out_dir, quick)


def _fpdt_stage(out_dir: Path, quick: bool) -> StageReport:
    from effdl.fpdt.demo import fpdt_stage

    return fpdt_stage(out_dir, quick)


def _exflow_stage(out_dir: Path, quick: bool) -> StageReport:
    from effdl.exflow.demo import exflow_stage

    return exflow_stage(out_dir, quick)


STAGES: dict[str, Callable[[Path, bool], StageReport]] = {"lm": lm_stage, "soft": _soft_stage,
                                                          "sprnet": _sprnet_stage, "fpdt": _fpdt_stage,
                                                          "exflow": _exflow_stage, "flover": _flover_stage}


def run_demo(out_dir: str | Path = "effdl-demo", only: str | None = None, quick: bool = False) -> Path:
    """Run the stages (or just ``only``) and write ``out_dir/report.md``; returns its path."""
    if only is not None and only not in STAGES:
        raise EffdlError(f"unknown demo stage {only!r}; stages: {', '.join(STAGES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [only] if only else list(STAGES)
    summary, sections = [], ["# effdl demo\n"]
    for name in names:
        console.rule(f"[bold]demo stage: {name}")
        started = time.perf_counter()
        report = STAGES[name](out_dir, quick)
        seconds = time.perf_counter() - started
        print_table(report.title, ["metric", "value"], report.rows)
        summary.append((name, report.title, f"{seconds:.0f}s", report.headline))
        sections.append(f"## {report.title} ({seconds:.0f}s)\n\n{report.markdown}")
    print_table("effdl demo summary", ["stage", "what", "time", "headline"], summary)
    report_path = out_dir / "report.md"
    report_path.write_text("\n".join(sections))
    console.print(f"report: {report_path}")
    return report_path
