"""Decode tokens/s with 4 gloo ranks: standard expert parallelism vs coherent + round robin vs coherent + ilp.

    python benchmarks/exflow_throughput.py [--model runs/bench-exflow/gpt-moe-16e-200steps] [--ranks 4]
        [--requests 32] [--prompt-len 64] [--new-tokens 32] [--repeat 5]

Same model, weights and requests in every configuration; the rounds are interleaved so that drifts in
machine speed hit all alike. The ilp placement is fitted on a held-in trace. Run
``benchmarks/exflow_placement.py`` first (it trains the model), or pass any MoE checkpoint.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from harness import RESULTS, report

from effdl.dist import spawn
from effdl.exflow.affinity import transition_counts
from effdl.exflow.parallel import ExpertParallel
from effdl.exflow.pipeline import corpus_prompts, load_moe
from effdl.exflow.placement import Placement, solve
from effdl.exflow.trace import trace_corpus
from effdl.report import bar_plot

CONFIGS = {"standard": ("standard", None), "coherent + round robin": ("coherent", None),
           "coherent + ilp": ("coherent", "ilp")}


def rank_main(rank: int, model_dir: str, placement_file: str, prompts: list[list[int]], new_tokens: int,
              repeat: int) -> dict:
    placement = Placement.load(placement_file)
    runners = {name: ExpertParallel(load_moe(model_dir), mode, placement if solver else None)
               for name, (mode, solver) in CONFIGS.items()}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/bench-exflow/gpt-moe-16e-200steps")
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--time-limit", type=float, default=30.0)
    args = parser.parse_args()

    model = load_moe(args.model)
    fit = trace_corpus(model, "train", 32768)
    placement = solve(transition_counts(fit.experts, fit.n_experts), args.ranks, "ilp", args.time_limit,
                      model=fit.model)
    prompts = corpus_prompts(args.requests, args.prompt_len)
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
    steps = args.new_tokens - 1

    def per_step(per_layer: list[int]) -> float:
        """Mean per MoE layer and decode step."""
        return sum(per_layer) / steps / len(per_layer)

    rows = []
    for name in CONFIGS:
        tokens, stats = outputs[name]
        tok_s = decoded / statistics.median(times[name])
        comm_ms = 1e3 * stats.comm_s["decode"] / steps
        rows.append((name, f"{tok_s:,.1f}", f"{tok_s / base:.2f}x", f"{comm_ms:.1f}",
                     per_step(stats.all_to_all["decode"]), per_step(stats.size_exchanges["decode"]),
                     per_step(stats.rows_cross["decode"]),
                     stats.kv_syncs["decode"] / steps, "yes" if tokens == reference else "NO"))
    report("exflow_throughput", f"Greedy decode on {args.ranks} gloo ranks (CPU), {args.requests} requests x "
           f"{args.new_tokens} tokens, {Path(args.model).name}",
           ["configuration", "decode tok/s", "vs standard", "ms in collectives / step", "all-to-alls / layer / step",
            "size exchanges / layer / step", "rows to other ranks / layer / step", "context syncs / step",
            "tokens = standard"], rows, extra={"args": vars(args), "decode_s": times,
                                               "ilp_objective": placement.objective, "ilp_gap": placement.gap})
    bar_plot(RESULTS / "exflow_throughput.png", ["decode tokens/s"],
             {name: [decoded / statistics.median(times[name])] for name in CONFIGS},
             title=f"Expert-parallel decode, {args.ranks} gloo ranks", ylabel="tokens/s")


if __name__ == "__main__":
    main()
