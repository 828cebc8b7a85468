"""Decode tokens/s and bytes sent with 4 gloo ranks: standard expert parallelism vs coherent + round robin vs
coherent + ilp, each with decode messages padded (one collective) or with row counts exchanged first.

    python benchmarks/exflow_throughput.py [--model runs/bench-exflow/gpt-moe-16e-200steps] [--ranks 4]
        [--requests 32] [--prompt-len 64] [--new-tokens 32] [--repeat 5] [--plot-only]

Same model, weights and requests in every configuration; the rounds are interleaved so that drifts in
machine speed hit all alike. The ilp placement is fitted on a held-in trace. Run
``benchmarks/exflow_placement.py`` first (it trains the model), or pass any MoE checkpoint.
Bytes are what each rank hands its collectives, padding, headers and size exchanges included.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from harness import RESULTS, add_plot_only, load_results, report

from effdl.distributed import spawn
from effdl.exflow.affinity import transition_counts
from effdl.exflow.parallel import ExpertParallel
from effdl.exflow.placement import Placement, solve
from effdl.exflow.trace import trace_corpus
from effdl.exflow.workflow import corpus_prompts, load_moe

PADDED, EXCHANGED = 1 << 20, 0  # ExpertParallel's pad_limit_bytes: its default (decode padded), or never pad
CONFIGS = {  # name -> (mode, placement solver or None for round robin, pad_limit_bytes)
    "standard": ("standard", None, PADDED),
    "coherent + round robin": ("coherent", None, PADDED),
    "coherent + ilp": ("coherent", "ilp", PADDED),
    "standard, sizes exchanged": ("standard", None, EXCHANGED),
    "coherent + ilp, sizes exchanged": ("coherent", "ilp", EXCHANGED),
}
COLUMNS = ["configuration", "decode tok/s", "vs standard", "ms in collectives / step", "all-to-alls / layer / step",
           "size exchanges / layer / step", "rows to other ranks / rank / layer / step",
           "all-to-all bytes to other ranks / rank / layer / step", "all-to-all bytes incl. own / rank / layer / step",
           "K/V all-reduce bytes / rank / step", "tokens = standard"]


def rank_main(rank: int, model_dir: str, placement_file: str, prompts: list[list[int]], new_tokens: int,
              repeat: int) -> dict:
    placement = Placement.load(placement_file)
    runners = {name: ExpertParallel(load_moe(model_dir), mode, placement if solver else None, pad_limit_bytes=limit)
               for name, (mode, solver, limit) in CONFIGS.items()}
    for runner in runners.values():  # warm-up
        runner.generate(prompts[:4], 4)
    times = {name: [] for name in runners}
    outputs = {}
    for _ in range(repeat):
        for name, runner in runners.items():
            result = runner.generate(prompts, new_tokens)
            times[name].append(result.decode_s)
            outputs[name] = (result.tokens, result.stats)
    return {"times": times, "outputs": outputs}


def plot(path: Path = RESULTS / "exflow_throughput.json") -> None:
    """Draw exflow_throughput.png from the results JSON: tokens/s, all-to-all bytes, K/V all-reduce bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = load_results(path)
    col = {name: i for i, name in enumerate(results["columns"])}
    rows = results["rows"][::-1]  # barh draws bottom-up: keep the table's order top-down
    names = [row[0] for row in rows]
    kb = 1e-3  # bytes -> kB
    tok_s = [float(row[col["decode tok/s"]].replace(",", "")) for row in rows]
    rows_cross = [row[col["rows to other ranks / rank / layer / step"]] for row in rows]
    a2a = [kb * row[col["all-to-all bytes to other ranks / rank / layer / step"]] for row in rows]
    kv = [kb * row[col["K/V all-reduce bytes / rank / step"]] for row in rows]
    panels = [  # (title, values, bar labels)
        ("decode tokens/s (higher is better)", tok_s, [f"{v:,.0f}" for v in tok_s]),
        ("kB to other ranks in all-to-alls (padding incl.)\nper rank, MoE layer and decode step", a2a,
         [f"{v:.1f} kB ({r:.1f} token rows)" for v, r in zip(a2a, rows_cross, strict=True)]),
        ("kB handed to the K/V all-reduce\nper rank and decode step", kv, [f"{v:.1f} kB" for v in kv]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), dpi=110, sharey=True)
    for ax, (title, values, labels) in zip(axes, panels, strict=True):
        bars = ax.barh(names, values, color=["tab:green" if "coherent" in n else "tab:blue" for n in names])
        ax.bar_label(bars, labels, padding=3, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlim(0, max(values) * 1.8 or 1)  # room for the labels
        ax.grid(alpha=0.3, axis="x")
    args = results["args"]
    fig.suptitle(f"Expert-parallel greedy decode on {args['ranks']} gloo ranks: {args['requests']} requests, "
                 f"{Path(args['model']).name}", fontsize=11)
    fig.tight_layout()
    fig.savefig(RESULTS / "exflow_throughput.png")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/bench-exflow/gpt-moe-16e-200steps")
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--time-limit", type=float, default=30.0)
    add_plot_only(parser)
    args = parser.parse_args()
    if args.plot_only:
        plot()
        return

    model = load_moe(args.model)
    fit = trace_corpus(model, "train", 32768)
    placement = solve(transition_counts(fit.experts, fit.n_experts), args.ranks, "ilp", args.time_limit,
                      model=fit.model)
    prompts = corpus_prompts(args.requests, args.prompt_len)
    load_before = os.getloadavg()  # other processes on the machine slow the ranks down: record them
    with tempfile.TemporaryDirectory() as tmp:
        placement_file = str(placement.save(Path(tmp) / "placement.json"))
        results = spawn(rank_main, args.ranks, args.model, placement_file, prompts, args.new_tokens, args.repeat,
                        timeout_s=3600)

    # Every rank times the same synchronised loop; the slowest rank's time is the step time.
    times = {name: [max(r["times"][name][i] for r in results) for i in range(args.repeat)] for name in CONFIGS}
    outputs = results[0]["outputs"]
    reference = outputs["standard"][0]
    decoded = args.requests * (args.new_tokens - 1)
    base = decoded / statistics.median(times["standard"])
    steps, G = args.new_tokens - 1, args.ranks

    def per_step(per_layer: list[int], ranks: int = 1) -> float:
        """Mean per MoE layer and decode step (and per rank, for quantities summed over ``ranks``)."""
        return sum(per_layer) / steps / len(per_layer) / ranks

    rows = []
    for name in CONFIGS:
        tokens, stats = outputs[name]
        tok_s = decoded / statistics.median(times[name])
        comm_ms = 1e3 * stats.comm_s["decode"] / steps
        rows.append((name, f"{tok_s:,.1f}", f"{tok_s / base:.2f}x", f"{comm_ms:.1f}",
                     per_step(stats.all_to_all["decode"]), per_step(stats.size_exchanges["decode"]),
                     per_step(stats.rows_cross["decode"], G), per_step(stats.bytes_cross["decode"], G),
                     per_step(stats.bytes_total["decode"], G), stats.kv_sync_bytes["decode"] / steps / G,
                     "yes" if tokens == reference else "NO"))
    report("exflow_throughput", f"Greedy decode on {args.ranks} gloo ranks (CPU), {args.requests} requests x "
           f"{args.new_tokens} tokens, {Path(args.model).name}", COLUMNS, rows,
           extra={"args": vars(args), "decode_s": times, "ilp_objective": placement.objective,
                  "ilp_gap": placement.gap, "load_avg_1_5_15min": {"before": load_before, "after": os.getloadavg()}})
    plot()


if __name__ == "__main__":
    main()
