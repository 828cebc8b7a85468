"""``effdl exflow {trace,affinity,place,run,simulate}``: routing traces, expert affinity, placement, expert-parallel
decoding under torchrun, and the multi-node traffic model."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import typing
from pathlib import Path


def _trace(args: argparse.Namespace) -> None:
    from effdl.exflow.affinity import affinity_score, plot_affinity, transition_counts
    from effdl.exflow.trace import trace_corpus
    from effdl.exflow.workflow import load_moe

    trace = trace_corpus(load_moe(args.model), args.split, args.tokens, args.seq_len)
    trace.save(args.out)
    counts = transition_counts(trace.experts, trace.n_experts)
    plot = plot_affinity(Path(args.out).with_suffix(".png"), counts,
                         f"P(expert at l+1 | expert at l), {trace.source}")
    print(f"{trace.n_tokens:,} tokens x {trace.n_layers} layers x top-{trace.top_k}: {args.out}; "
          f"affinity score {affinity_score(counts):.3f} (0 = independent, 1 = deterministic); heatmap {plot}")


def _affinity(args: argparse.Namespace) -> None:
    from effdl.exflow.workflow import affinity_over_training
    from effdl.report import line_plot, print_table

    scores = affinity_over_training(args.checkpoints, args.tokens)
    print_table("inter-layer expert affinity on held-out text", ["step", "affinity score"], scores)
    line_plot(args.out, {"affinity score": ([s for s, _ in scores], [a for _, a in scores])},
              title="Expert affinity over training (held-out text)", xlabel="training step",
              ylabel="I(X_l; X_l+1) / H(X_l+1)")
    print(f"plot: {args.out}")


def _place(args: argparse.Namespace) -> None:
    from effdl.exflow.trace import RoutingTrace
    from effdl.exflow.workflow import place_and_score
    from effdl.report import print_table

    fit = RoutingTrace.load(args.trace)
    score = RoutingTrace.load(args.eval_trace) if args.eval_trace else fit
    report = place_and_score(fit, score, args.gpus, tuple(dict.fromkeys(("round_robin", args.method))),
                             args.time_limit)
    report.placements[args.method].save(args.out)
    base = report.held_out["round_robin"]
    print_table(f"cross-GPU transitions, {args.gpus} GPUs ({'held-out' if args.eval_trace else 'fitted'} trace)",
                ["method", "cross-GPU share", "vs round robin", "gap", "solve s"],
                [[name, report.held_out[name], f"{report.held_out[name] / base - 1:+.0%}" if base else "-",
                  "-" if p.gap is None else f"{p.gap:.1%}", p.solve_s] for name, p in report.placements.items()])
    print(f"placement: {args.out}")


def _run(args: argparse.Namespace) -> None:
    from effdl.distributed import process_group
    from effdl.exflow.parallel import ExpertParallel
    from effdl.exflow.placement import Placement
    from effdl.exflow.workflow import corpus_prompts, load_moe
    from effdl.report import print_table

    with process_group() as (rank, world, device):
        placement = Placement.load(args.placement) if args.placement else None
        runner = ExpertParallel(load_moe(args.model, device), args.mode, placement)
        result = runner.generate(corpus_prompts(args.requests, args.prompt_len), args.new_tokens)
    if rank == 0:
        stats, steps = result.stats, args.new_tokens - 1
        print_table(f"{args.mode} expert parallelism on {world} ranks: {args.requests} requests x "
                    f"{args.new_tokens} tokens", *stats.decode_table(steps, world))
        print(f"decode {args.requests * steps / max(result.decode_s, 1e-9):,.1f} tokens/s, prefill "
              f"{result.prefill_s:.2f} s; context syncs per step {stats.kv_syncs['decode'] / max(steps, 1):.0f} "
              f"({stats.kv_sync_bytes['decode'] / max(steps, 1) / world:,.0f} bytes per rank)")


def _simulate(args: argparse.Namespace) -> None:
    from effdl.exflow.placement import Placement
    from effdl.exflow.simulate import Topology, plan_table
    from effdl.exflow.trace import RoutingTrace
    from effdl.report import print_table

    trace = RoutingTrace.load(args.trace)
    placements = {Path(p).stem: Placement.load(p) for p in args.placement}
    for name, placement in placements.items():
        trace.check_fits(placement.n_layers, placement.n_experts, f"placement {name}")
    n_gpus = next(iter(placements.values())).n_gpus
    topo = Topology(n_gpus, args.gpus_per_node, args.intra_gbps, args.inter_gbps)
    rows = plan_table(trace.experts, {k: p.gpu_of for k, p in placements.items()}, topo, args.token_bytes,
                      args.kv_bytes)
    print_table(f"all-to-all time per forward step, {trace.n_tokens:,} tokens, {n_gpus} GPUs "
                f"({args.gpus_per_node} per node)", list(rows[0]), [list(r.values()) for r in rows])


def add_commands(verbs: argparse._SubParsersAction) -> None:
    from effdl.core.data import Split
    from effdl.exflow.parallel import MODES
    from effdl.exflow.placement import METHODS
    from effdl.exflow.simulate import Topology, plan_table
    from effdl.exflow.trace import trace_corpus
    from effdl.exflow.workflow import affinity_over_training, place_and_score

    shown = "(default %(default)s)"
    tr = inspect.signature(trace_corpus).parameters
    trace = verbs.add_parser("trace", help="record which experts every token visits (.npz) and plot the affinity")
    trace.add_argument("--model", required=True, help="MoE checkpoint folder or training run folder")
    trace.add_argument("--split", choices=typing.get_args(Split), default=tr["split"].default,
                       help=f"held-in or held-out text {shown}")
    trace.add_argument("--tokens", type=int, default=tr["n_tokens"].default, help=shown)
    trace.add_argument("--seq-len", type=int, default=tr["seq_len"].default, help=shown)
    trace.add_argument("--out", default="trace.npz", help=shown)
    trace.set_defaults(func=_trace)

    affinity = verbs.add_parser("affinity", help="affinity score of each checkpoint of a training run, as a plot")
    affinity.add_argument("--checkpoints", nargs="+", required=True, help="checkpoint folders or run folders")
    affinity.add_argument("--tokens", type=int,
                          default=inspect.signature(affinity_over_training).parameters["n_tokens"].default,
                          help=f"held-out tokens traced per checkpoint {shown}")
    affinity.add_argument("--out", default="affinity.png", help=shown)
    affinity.set_defaults(func=_affinity)

    place = verbs.add_parser("place", help="solve an expert placement from a routing trace")
    place.add_argument("--trace", required=True, help="trace to fit (held-in text)")
    place.add_argument("--eval-trace", help="trace to score on (held-out text; default: the fitted one)")
    place.add_argument("--gpus", type=int, required=True)
    place.add_argument("--method", choices=METHODS, default="ilp", help=shown)
    place.add_argument("--time-limit", type=float,
                       default=inspect.signature(place_and_score).parameters["time_limit_s"].default,
                       help=f"ilp solver seconds {shown}")
    place.add_argument("--out", default="placement.json", help=shown)
    place.set_defaults(func=_place)

    run = verbs.add_parser("run", help="expert-parallel greedy decoding under torchrun, with traffic counts")
    run.add_argument("--model", required=True, help="MoE checkpoint folder or training run folder")
    run.add_argument("--mode", choices=MODES, default="coherent", help=shown)
    run.add_argument("--placement", help="placement.json from `effdl exflow place` (default round robin)")
    run.add_argument("--requests", type=int, default=16, help=shown)
    run.add_argument("--prompt-len", type=int, default=64, help=shown)
    run.add_argument("--new-tokens", type=int, default=32, help=shown)
    run.set_defaults(func=_run)

    topo = {f.name: f.default for f in dataclasses.fields(Topology)}
    simulate = verbs.add_parser("simulate", help="all-to-all time per step on a multi-node topology (traffic model)")
    simulate.add_argument("--trace", required=True)
    simulate.add_argument("--placement", nargs="+", required=True, help="placement files (same GPU count)")
    simulate.add_argument("--gpus-per-node", type=int, default=topo["gpus_per_node"], help=shown)
    simulate.add_argument("--intra-gbps", type=float, default=topo["intra_gbps"],
                          help=f"GB/s per GPU within a node {shown}")
    simulate.add_argument("--inter-gbps", type=float, default=topo["inter_gbps"],
                          help=f"GB/s per GPU across nodes {shown}")
    simulate.add_argument("--token-bytes", type=float, default=8192,
                          help=f"bytes per token row (hidden size x dtype) {shown}")
    simulate.add_argument("--kv-bytes", type=float,
                          default=inspect.signature(plan_table).parameters["kv_bytes_per_token"].default,
                          help=f"coherent mode: K/V bytes per token all-gathered {shown}")
    simulate.set_defaults(func=_simulate)
