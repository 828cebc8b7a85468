"""``effdl demo``: a tour of every system, one stage each, with a report in ./effdl-demo/.

Each stage is a function ``(out_dir, quick) -> StageReport`` (``effdl.stage``) registered in ``STAGES``; the
whole tour runs in under 5 minutes on 2 CPU cores (``quick`` shrinks each stage to seconds, for smoke tests). The
stages' training time limits add up to about 4 minutes (lm 55 s, soft 50 s, sprnet 55 s, fpdt 35 s, exflow 40 s),
which leaves the last one for what no limit bounds: data generation, evaluation, measurement, serving.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable
from pathlib import Path

from effdl.errors import EffdlError
from effdl.report import console, line_plot, markdown_table, print_table
from effdl.stage import StageReport


def lm_stage(out_dir: Path, quick: bool) -> StageReport:
    """Train a tiny Llama on the stdlib corpus for under a minute, then sample from it."""
    from effdl.core.generate import generate
    from effdl.core.hf import load_checkpoint
    from effdl.core.tokenizer import ByteTokenizer
    from effdl.train.lm import TrainConfig, train

    cfg = TrainConfig(preset="tiny", seq_len=64 if quick else 256, batch_size=4 if quick else 16,
                      steps=3 if quick else 100, warmup_steps=1 if quick else 10, eval_every=0 if quick else 20,
                      eval_batches=2 if quick else 8, max_time_s=None if quick else 55.0,
                      out_dir=str(out_dir / "lm"))
    result = train(cfg)
    model = load_checkpoint(result.checkpoint)
    tok = ByteTokenizer()
    prompt = "def fibonacci(n):\n"
    sample = tok.decode(generate(model, tok.encode(prompt), 48 if quick else 160, temperature=0.9, top_p=0.9,
                                 seed=0))
    plot = line_plot(out_dir / "lm_loss.png", {
        "train": ([s for s, _ in result.losses], [v for _, v in result.losses]),
        "validation": ([e["step"] for e in result.evals], [e["metrics"]["val_loss"] for e in result.evals]),
    }, title="Tiny Llama on the Python stdlib (byte level)", xlabel="step", ylabel="cross-entropy (nats/byte)")

    uniform = math.log(tok.vocab_size)
    rows = [
        ("model", f"tiny Llama, {model.config.num_params() / 1e6:.1f}M params"),
        ("steps x tokens", f"{result.step} x {cfg.batch_size * cfg.seq_len}"),
        ("train tokens/s", f"{result.items_per_s:,.0f}"),
        (f"val loss (uniform guess = {uniform:.2f})", f"{result.metrics['val_loss']:.3f}"),
        ("checkpoint (HF format)", str(result.checkpoint)),
    ]
    markdown = (markdown_table(["metric", "value"], rows) + f"\n![loss]({plot.name})\n\n"
                f"Sample (temperature 0.9, top-p 0.9):\n\n```python\n{prompt}{sample}\n```\n")
    headline = f"val loss {uniform:.2f} (uniform) -> {result.metrics['val_loss']:.2f} in {result.step} steps"
    return StageReport("Language model: train + generate", headline, rows, markdown, [plot],
                       {"uniform_loss": uniform, "val_loss": result.metrics['val_loss']})


def _imported_when_run(system: str) -> Callable[[Path, bool], StageReport]:
    """``effdl.<system>.demo.<system>_stage``, imported only when it runs: each system pulls in its own
    dependencies (timm, pycocotools, uvicorn ...), which ``--only`` should not pay for."""

    def stage(out_dir: Path, quick: bool) -> StageReport:
        return getattr(importlib.import_module(f"effdl.{system}.demo"), f"{system}_stage")(out_dir, quick)

    return stage


STAGES: dict[str, Callable[[Path, bool], StageReport]] = {
    "lm": lm_stage, **{system: _imported_when_run(system) for system in ("soft", "sprnet", "fpdt", "exflow", "flover")}}


def run_demo(out_dir: str | Path = "effdl-demo", only: str | None = None,
             quick: bool = False) -> dict[str, StageReport]:
    """Run the stages (or just ``only``) in order in this process, write ``out_dir/report.md``, and return each
    stage's report by name."""
    if only is not None and only not in STAGES:
        raise EffdlError(f"unknown demo stage {only!r}; stages: {', '.join(STAGES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [only] if only else list(STAGES)
    summary, sections, reports = [], ["# effdl demo\n"], {}
    for name in names:
        console.rule(f"[bold]demo stage: {name}")
        started = time.perf_counter()
        report = reports[name] = STAGES[name](out_dir, quick)
        seconds = time.perf_counter() - started
        print_table(report.title, ["metric", "value"], report.rows)
        summary.append((name, report.title, f"{seconds:.0f}s", report.headline))
        sections.append(f"## {report.title} ({seconds:.0f}s)\n\n{report.markdown}")
    print_table("effdl demo summary", ["stage", "what", "time", "headline"], summary)
    report_path = out_dir / "report.md"
    report_path.write_text("\n".join(sections))
    console.print(f"report: {report_path}")
    return reports
