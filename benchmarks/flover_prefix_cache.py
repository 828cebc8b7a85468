"""Flover's TTFT with automatic prefix caching on and off, same workload, same run.

The model of ``flover_vs_vllm.py`` (33.7M-param Llama, fp32) in an in-process
``AsyncEngine``, replayed with ``effdl.flover.workload``'s client: ``requests``
requests share a ``prefix``-token prompt prefix (a system prompt, few-shot
examples) and each adds a short distinct suffix; they arrive one after another
every ``interval`` ms, greedy, ``output-len`` tokens each. With caching, every
request after the first loads the prefix's K/V instead of prefilling it.
Reports mean, p50 and p99 TTFT, mean E2E, output tokens/s and the prefix-cache
hit rate per setting, the ratios off/on, and whether the greedy tokens agree.

    python benchmarks/flover_prefix_cache.py [--requests 32 --prefix 1000 --interval 50]
    python benchmarks/flover_prefix_cache.py --plot-only     # redraw the PNG from results/flover_prefix_cache.json
"""

from __future__ import annotations

import argparse
import asyncio
import random
from pathlib import Path

import torch
from flover_vs_vllm import MODEL
from harness import RESULTS, add_plot_only, load_results, report

from effdl.core.transformer import Transformer
from effdl.flover.async_engine import AsyncEngine
from effdl.flover.engine import Engine
from effdl.flover.workload import RequestMetrics, WorkloadRequest, replay, summarize
from effdl.report import bar_plot

SETTINGS = {"caching off": False, "caching on": True}


def shared_prefix_workload(n: int, prefix: int, suffix: tuple[int, int], output_len: int, interval_ms: float,
                           vocab_size: int, seed: int) -> list[WorkloadRequest]:
    """``n`` requests every ``interval_ms``: the same ``prefix`` random tokens, then a distinct random suffix."""
    rng = random.Random(seed)
    shared = [rng.randrange(vocab_size) for _ in range(prefix)]
    return [WorkloadRequest(i * interval_ms / 1000, shared + [rng.randrange(vocab_size)
                                                              for _ in range(rng.randint(*suffix))], output_len)
            for i in range(n)]


def run(model: Transformer, caching: bool, workload: list[WorkloadRequest], args: argparse.Namespace
        ) -> tuple[list[RequestMetrics], dict[str, int]]:
    """Replay ``workload`` on a fresh engine; returns the client's metrics and the engine's stats after."""
    engine = Engine(model, None, max_slots=args.max_slots, max_len=args.max_len, prefix_caching=caching)
    engine.generate([[1, 2, 3]] * 2)  # warm-up (oneDNN's first calls), below a block: nothing cached
    front = AsyncEngine(engine).start()

    async def replay_and_stop() -> list[RequestMetrics]:
        try:
            return await replay(workload, front)
        finally:
            await front.shutdown()

    metrics = asyncio.run(replay_and_stop())
    return metrics, engine.stats


def plot(path: Path = RESULTS / "flover_prefix_cache.json") -> None:
    """Draw the PNG beside ``path`` (mean and p50 TTFT per setting) from the results JSON."""
    results = load_results(path)
    args, summaries = results["args"], results["summaries"]
    bar_plot(path.with_suffix(".png"), ["mean TTFT", "p50 TTFT"],
             {name: [1e3 * s["mean_ttft_s"], 1e3 * s["median_ttft_s"]] for name, s in summaries.items()},
             title=f"Flover prefix caching: {args['requests']} requests sharing a {args['prefix']}-token prefix, "
                   f"every {args['interval']:g} ms", ylabel="ms (lower is better)", value_format="{:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prefix", type=int, default=1000, help="tokens every prompt shares")
    parser.add_argument("--suffix", type=int, nargs=2, default=[8, 32], help="distinct tokens per prompt, inclusive")
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--interval", type=float, default=50.0, help="ms between arrivals")
    parser.add_argument("--max-slots", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    add_plot_only(parser)
    args = parser.parse_args()
    if args.plot_only:
        plot()
        return
    torch.manual_seed(args.seed)
    model = Transformer(MODEL).eval()
    model.reset_parameters(std=0.1)  # as flover_vs_vllm.py: greedy picks are not near-ties
    workload = shared_prefix_workload(args.requests, args.prefix, tuple(args.suffix), args.output_len, args.interval,
                                      MODEL.vocab_size, args.seed)
    runs = {name: run(model, caching, workload, args) for name, caching in SETTINGS.items()}

    summaries, rows = {}, []
    for name, (metrics, stats) in runs.items():
        s = summaries[name] = summarize(metrics)
        queries = stats["prefix_cache_queries"]  # 0 with caching off: nothing is looked up
        hit_rate = stats["prefix_cache_hits"] / queries if queries else 0.0
        rows.append((name, 1e3 * s["mean_ttft_s"], 1e3 * s["median_ttft_s"], 1e3 * s["p99_ttft_s"], s["mean_e2e_s"],
                     s["output_throughput"], f"{100 * hit_rate:.1f}%", s["failed"]))
    off, on = summaries["caching off"], summaries["caching on"]
    same = sum(a.output_ids == b.output_ids for a, b in zip(runs["caching off"][0], runs["caching on"][0],
                                                             strict=True))
    rows.append(("off / on", *(f"{off[k] / on[k]:.2f}x" for k in ("mean_ttft_s", "median_ttft_s", "p99_ttft_s",
                                                                     "mean_e2e_s")),
                 f"{off['output_throughput'] / on['output_throughput']:.2f}x", f"same tokens {same}/{len(workload)}",
                 ""))
    title = (f"Flover prefix caching, {MODEL.num_params() / 1e6:.1f}M-param Llama fp32: {args.requests} requests "
             f"sharing a {args.prefix}-token prefix (+{args.suffix[0]}-{args.suffix[1]} tokens), one every "
             f"{args.interval:g} ms, {args.output_len} output tokens, {args.max_slots} slots")
    columns = ["setting", "mean TTFT ms", "p50 TTFT ms", "p99 TTFT ms", "mean E2E s", "out tok/s", "hit rate",
               "failed"]
    plot(report("flover_prefix_cache", title, columns, rows,
                extra={"args": vars(args), "summaries": summaries,
                       "engine_stats": {name: stats for name, (_, stats) in runs.items()}}))


if __name__ == "__main__":
    main()
