"""The Flover stage of ``effdl demo``: serve a model over HTTP, replay Poisson arrivals, fused vs static."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch

from effdl.core.config import ModelConfig
from effdl.core.tokenizer import ByteTokenizer
from effdl.core.transformer import Transformer
from effdl.flover.async_engine import AsyncEngine
from effdl.flover.engine import Engine
from effdl.flover.server import create_app, serve_in_thread
from effdl.flover.workload import poisson_workload, replay, summarize
from effdl.report import bar_plot, markdown_table
from effdl.stage import StageReport


def flover_stage(out_dir: Path, quick: bool) -> StageReport:
    """Serve the ``small`` preset over HTTP and replay one Poisson workload under the fused and static policies."""
    torch.manual_seed(0)
    preset = "tiny" if quick else "small"
    model = Transformer(ModelConfig.preset(preset)).eval()
    # Quick mode keeps arrivals wider apart than static's 0.1 s batch window and outputs long enough that its
    # batches outlast the next arrival, or the two policies would schedule alike and the comparison say nothing.
    # 16 requests of 80-120 tokens: with 10 of 48-64, decode steps made cheaper (packed linears) left fused's margin
    # within a quiet machine's noise (one CI run had it 3% behind).
    n, interval_ms = (16, 100.0) if quick else (24, 40.0)
    workload = poisson_workload(n, interval_ms, prompt_len=(16, 64), output_len=(80, 120) if quick else (16, 48),
                                vocab_size=256, seed=0)
    summaries = {}
    for policy in ("fused", "static"):
        engine = AsyncEngine(Engine(model, ByteTokenizer(), max_slots=n, max_len=192, policy=policy,
                                    batch_window_s=0.1))
        with serve_in_thread(create_app(engine, preset, ByteTokenizer())) as url:
            # An untimed warm-up request first: otherwise whichever policy runs first pays the cold start alone.
            asyncio.run(replay(workload[:1], url, model=preset, timeout_s=120.0))
            metrics = asyncio.run(replay(workload, url, model=preset, timeout_s=120.0))
        summaries[policy] = summarize(metrics)
    fused, static = summaries["fused"], summaries["static"]
    headers = ["policy", "makespan s", "mean E2E s", "p99 E2E s", "mean TTFT s", "output tok/s"]
    table = [(p, f"{s['makespan_s']:.2f}", f"{s['mean_e2e_s']:.2f}", f"{s['p99_e2e_s']:.2f}",
              f"{s['mean_ttft_s']:.3f}", f"{s['output_throughput']:,.0f}") for p, s in summaries.items()]
    plot = bar_plot(out_dir / "flover_latency.png", ["mean end-to-end", "p99 end-to-end", "mean time to 1st token"],
                    {p: [s["mean_e2e_s"], s["p99_e2e_s"], s["mean_ttft_s"]] for p, s in summaries.items()},
                    title=f"{n} requests, Poisson {interval_ms:g} ms mean gap, over HTTP (lower is better)",
                    ylabel="seconds", value_format="{:.2f} s")
    makespan_x = static["makespan_s"] / fused["makespan_s"]
    latency_x = static["mean_e2e_s"] / fused["mean_e2e_s"]
    rows = [
        *((f"{p}: makespan / mean E2E / p99 E2E / mean TTFT", f"{s['makespan_s']:.2f} / {s['mean_e2e_s']:.2f} / "
           f"{s['p99_e2e_s']:.2f} / {s['mean_ttft_s']:.3f} s") for p, s in summaries.items()),
        ("model", f"{preset} preset, {model.config.num_params() / 1e6:.1f}M params, random weights, byte tokens"),
        ("workload", f"{n} requests, Poisson arrivals {interval_ms:g} ms apart on average, prompts 16-64 tokens"),
        ("fused vs static: makespan", f"{fused['makespan_s']:.2f} s vs {static['makespan_s']:.2f} s "
                                      f"({makespan_x:.2f}x)"),
        ("fused vs static: mean latency", f"{fused['mean_e2e_s']:.2f} s vs {static['mean_e2e_s']:.2f} s "
                                          f"({latency_x:.2f}x)"),
    ]
    markdown = (markdown_table(headers, table) + f"\n![latency]({plot.name})\n\n"
                "Both policies ran behind the OpenAI-compatible server (`effdl flover serve`), streaming. "
                "Fused lets each request join the running batch at the next step; static batching makes "
                "arrivals wait for the running batch to finish.\n")
    headline = (f"mean latency fused {fused['mean_e2e_s']:.2f} s vs static {static['mean_e2e_s']:.2f} s "
                f"({_times(latency_x, 'lower', 'higher')}); makespan {_times(makespan_x, 'shorter', 'longer')}")
    metrics = {"fused_mean_e2e_s": fused["mean_e2e_s"], "static_mean_e2e_s": static["mean_e2e_s"],
               "fused_makespan_s": fused["makespan_s"], "static_makespan_s": static["makespan_s"]}
    return StageReport("Flover: fused serving over HTTP", headline, rows, markdown, [plot], metrics)


def _times(static_over_fused: float, better: str, worse: str) -> str:
    """A ratio of static's figure to fused's in words from fused's side: "2.1x lower" or "1.3x higher"."""
    if static_over_fused >= 1:
        return f"{static_over_fused:.2f}x {better}"
    return f"{1 / static_over_fused:.2f}x {worse}"
