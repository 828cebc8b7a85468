"""Cross-GPU token moves: round robin vs staged vs ilp placement, fitted on held-in text, scored on held-out.

    python benchmarks/exflow_placement.py [--experts 8 16 32 64] [--gpus 2 4 8] [--steps 200] [--time-limit 30]
    python benchmarks/exflow_placement.py --plot-only      # redraw the PNGs from results/exflow_placement.json

For each expert count a GPT-MoE model (``gpt-moe-<E>e``: 6 layers, top-1) is trained on the stdlib corpus
(checkpoints kept under runs/bench-exflow/, reused by later runs), traced on held-in (train) and held-out
(val) text, and placed on each GPU count. Also reported: how affinity evolves over training, and the
traffic model's all-to-all time per step on 2-node to 16-node clusters (4 GPUs per node).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from harness import RESULTS, add_plot_only, headroom, load_results, report

from effdl.exflow.affinity import affinity_score, plot_affinity, transition_counts
from effdl.exflow.placement import round_robin, solve
from effdl.exflow.simulate import Topology, plan_table
from effdl.exflow.trace import trace_corpus
from effdl.exflow.workflow import affinity_over_training, load_moe, place_and_score
from effdl.report import bar_plot, line_plot, print_table
from effdl.train.lm import TrainConfig, train

RUNS = Path("runs/bench-exflow")
HIDDEN_BYTES = 4096 * 2  # traffic model: one bf16 hidden state of a Mixtral-sized model


SIM_COLUMNS = ["experts", "GPUs", "placement", "mode", "cross-rank copies / token / layer",
               "cross-node copies / token / layer", "all-to-all time: speed-up vs standard",
               "with the coherent K/V all-gather"]


def trained_model(n_experts: int, steps: int):
    """The GPT-MoE model with ``n_experts`` experts trained for ``steps`` (trained now unless already on disk)."""
    out = RUNS / f"gpt-moe-{n_experts}e-{steps}steps"
    final = out / f"checkpoint-{steps:06d}"
    if not final.is_dir():
        train(TrainConfig(preset=f"gpt-moe-{n_experts}e", steps=steps, seq_len=256, batch_size=16,
                          warmup_steps=steps // 10, eval_every=0, ckpt_every=max(1, steps // 5), out_dir=str(out)))
    return load_moe(final), out


def plot(path: Path = RESULTS / "exflow_placement.json") -> None:
    """Draw exflow_placement.png and exflow_affinity_training.png from the results JSON."""
    results = load_results(path)
    col = {name: i for i, name in enumerate(results["columns"])}
    rows = results["rows"]
    series = {name: [row[col[name]] for row in rows] for name in ("round robin", "staged", "ilp")}
    with headroom(0.35):  # the legend sits above the tallest bars instead of over them
        bar_plot(RESULTS / "exflow_placement.png", [f"{row[0]}/{row[1]}" for row in rows], series,
                 title="Token moves crossing GPUs, by experts / GPUs (held-out text; lower is better)",
                 ylabel="share of layer-to-layer moves")
    evolution = results["affinity_over_training"]
    line_plot(RESULTS / "exflow_affinity_training.png",
              {name: ([s for s, _ in pts], [a for _, a in pts]) for name, pts in evolution.items()},
              title="Expert affinity over training (held-out text)", xlabel="training step",
              ylabel="affinity I(X_l; X_l+1) / H(X_l+1)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--gpus", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per trace (held-in and held-out)")
    parser.add_argument("--time-limit", type=float, default=30.0, help="ilp seconds per instance")
    add_plot_only(parser)
    args = parser.parse_args()
    if args.plot_only:
        plot()
        return

    rows, evolution, sim_rows = [], {}, []
    for n_experts in args.experts:
        model, run_dir = trained_model(n_experts, args.steps)
        fit, held_out = trace_corpus(model, "train", args.tokens), trace_corpus(model, "val", args.tokens)
        counts = transition_counts(held_out.experts, held_out.n_experts)
        if n_experts == 16:
            plot_affinity(RESULTS / "exflow_affinity_16e.png", counts,
                          f"gpt-moe-16e after {args.steps} steps: P(expert at l+1 | expert at l), held-out text")
        evolution[f"{n_experts} experts"] = affinity_over_training([str(run_dir)])
        for n_gpus in args.gpus:
            if n_experts % n_gpus:
                continue
            result = place_and_score(fit, held_out, n_gpus, time_limit_s=args.time_limit)
            share = result.held_out
            ilp = result.placements["ilp"]
            rows.append((n_experts, n_gpus, affinity_score(counts), share["round_robin"], share["staged"],
                         share["ilp"], f"{1 - share['ilp'] / share['round_robin']:.0%}",
                         "-" if ilp.gap is None else f"{ilp.gap:.0%}", f"{ilp.solve_s:.0f}"))
            print(rows[-1])
        # Beyond this machine: the traffic model on clusters of 4-GPU nodes, staged placement (ilp is too slow),
        # with Mixtral-sized messages: bf16 hidden states of 4096, and 8 K/V heads of 128 per layer.
        fit_counts = transition_counts(fit.experts, fit.n_experts)
        for n_gpus in (8, 16, 32, 64):
            if n_experts % n_gpus:
                continue
            placements = {"round robin": round_robin(model.config.n_layers, n_experts, n_gpus),
                          "staged": solve(fit_counts, n_gpus, "staged").gpu_of}
            kv_bytes = model.config.n_layers * 2 * 8 * 128 * 2
            topo = Topology(n_gpus)
            without_kv = plan_table(held_out.experts, placements, topo, HIDDEN_BYTES)
            with_kv = plan_table(held_out.experts, placements, topo, HIDDEN_BYTES, kv_bytes)
            for row, row_kv in zip(without_kv, with_kv, strict=True):
                sim_rows.append((n_experts, n_gpus, row["label"], row["mode"], row["cross_rank_per_token_layer"],
                                 row["cross_node_per_token_layer"], f"{row['speedup']:.2f}x",
                                 f"{row_kv['speedup']:.2f}x"))

    report("exflow_placement", f"Cross-GPU share of layer-to-layer token moves, held-out text ({args.tokens:,} "
           f"tokens; placements fitted on held-in text; GPT-MoE 6 layers, top-1, {args.steps} training steps)",
           ["experts", "GPUs", "affinity", "round robin", "staged", "ilp", "ilp vs round robin", "ilp gap",
            "ilp s"], rows,
           extra={"args": vars(args), "affinity_over_training": evolution, "simulated": {
               "columns": SIM_COLUMNS,
               "rows": sim_rows}})
    print_table("traffic model: 4 GPUs per node, 200/25 GB/s intra/inter node, Mixtral-sized bf16 messages",
                SIM_COLUMNS, sim_rows)
    plot()


if __name__ == "__main__":
    main()
