"""``effdl <system> <verb>``: a thin typed layer over importable functions.

    effdl demo [--only STAGE] [--out DIR] [--quick]
    effdl lm presets
    effdl lm train [--preset tiny] [--steps N] [--seq-len T] ... [--resume DIR]
    effdl lm generate --model DIR [--prompt TEXT] [--max-tokens N] [--temperature T] ...
    effdl soft train [--model soft_tiny] [--img-size 64] [--epochs N] ... [--baseline pvt_v2_b1]
    effdl soft eval --checkpoint FILE
    effdl fpdt train [--preset tiny] [--seq-len 16384] [--chunk-size 2048] [--offload disk] [--sp N under torchrun]
    effdl fpdt plan [--model llama-8b] [--gpus 4] [--gpu-mem 40GiB]
    effdl fpdt eval --model DIR [--seq-len 16384] [--out loss_by_position.png]
    effdl exflow trace --model DIR [--split val] [--tokens 16384] [--out trace.npz]
    effdl exflow affinity --checkpoints DIR [DIR ...] [--out affinity.png]
    effdl exflow place --trace FIT.npz [--eval-trace HELDOUT.npz] --gpus 4 [--method ilp] [--out placement.json]
    effdl exflow run --model DIR --mode standard|coherent [--placement FILE] (under torchrun: one rank per GPU)
    effdl exflow simulate --trace T.npz --placement FILE [FILE ...] [--gpus-per-node 4]
    effdl sprnet train [--data shapes|PATH] [--model sprnet_resnet18_fpn|maskrcnn|retinanet] [--epochs N] ...
    effdl sprnet eval --checkpoint FILE|DIR [--data PATH --split val2017]
    effdl sprnet predict IMAGE --checkpoint FILE|DIR [--out overlay.png]
    effdl sprnet pretrain [--data shapes|PATH] [--backbone resnet18] [--steps 300] [--out FILE]
    effdl flover serve [--model DIR|preset] [--port 8000] [--max-slots 16] [--policy fused] [--tp N under torchrun]

Bad input (``EffdlError``) prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from effdl.errors import EffdlError

if TYPE_CHECKING:
    from effdl.core.trainer import TrainConfig

# `effdl fpdt train` defaults: one long sequence per step, a short schedule.
FPDT_TRAIN_DEFAULTS = dict(preset="tiny", seq_len=16384, batch_size=1, steps=50, warmup_steps=5, eval_every=0,
                           eval_batches=2, out_dir="runs/fpdt")


def _demo(args: argparse.Namespace) -> None:
    from effdl.demo import run_demo

    run_demo(args.out, only=args.only, quick=args.quick)


def _lm_presets(args: argparse.Namespace) -> None:
    from effdl.core.config import PRESETS, ModelConfig
    from effdl.report import print_table

    rows = []
    for name in PRESETS:
        c = ModelConfig.preset(name)
        experts = f"{c.n_experts}x top-{c.experts_per_token}" if c.is_moe else "-"
        rows.append((name, c.model_type, f"{c.num_params() / 1e6:,.1f}M", c.dim, c.n_layers,
                     f"{c.n_heads}/{c.n_kv_heads}", c.ffn_dim, experts, c.vocab_size, c.max_seq_len))
    print_table("model presets", ["preset", "type", "params", "dim", "layers", "heads/kv", "ffn", "experts",
                                  "vocab", "max len"], rows)


def _train_config(args: argparse.Namespace, defaults: dict) -> TrainConfig:
    """The options given on the command line over ``defaults``, or over the resumed checkpoint's own config."""
    from effdl.core.trainer import TrainConfig, resume_config

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    return resume_config(args.resume, **given) if args.resume else TrainConfig(**{**defaults, **given})


def _lm_train(args: argparse.Namespace) -> None:
    from effdl.core.trainer import train

    cfg = _train_config(args, {})
    result = train(cfg, resume=args.resume)
    print(f"trained to step {result.step}: val loss {result.evals[-1][1]:.4f}, "
          f"{result.tokens_per_s:,.0f} tokens/s; checkpoint {result.checkpoint}")


def _lm_generate(args: argparse.Namespace) -> None:
    from effdl.core.generate import generate
    from effdl.core.hf import load_checkpoint
    from effdl.core.tokenizer import load_tokenizer
    from effdl.core.trainer import resolve_device

    model = load_checkpoint(args.model, device=resolve_device(args.device))
    tokenizer = load_tokenizer(args.model, model.config.vocab_size)
    prompt = tokenizer.encode(args.prompt)
    if model.config.bos_id is not None and args.bos:
        prompt = [model.config.bos_id, *prompt]
    out = generate(model, prompt, args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, seed=args.seed)
    print(args.prompt + tokenizer.decode(out))


def _soft_train(args: argparse.Namespace) -> None:
    from effdl.report import print_table
    from effdl.soft.train import ImageTrainConfig, load_checkpoint_config, train_classifier

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(ImageTrainConfig)
             if getattr(args, f.name, None) is not None}
    cfg = load_checkpoint_config(args.resume, **given) if args.resume else ImageTrainConfig(**given)
    runs = [(cfg, args.resume)]
    if args.baseline:
        runs.append((dataclasses.replace(cfg, model=args.baseline), None))
    rows = []
    for run_cfg, resume in runs:
        result = train_classifier(run_cfg, resume=resume)
        rows.append((run_cfg.model, result.step, f"{result.top1:.2f}%", f"{result.images_per_s:,.0f}",
                     str(result.checkpoint)))
    print_table(f"{cfg.data} at {cfg.img_size}px", ["model", "steps", "test top-1", "train img/s", "checkpoint"],
                rows)


def _soft_eval(args: argparse.Namespace) -> None:
    from effdl.core.trainer import resolve_device
    from effdl.soft.train import evaluate_classifier, load_classifier, load_split

    device = resolve_device(args.device)
    model, cfg = load_classifier(args.checkpoint, device)
    if args.eval_subset is not None:
        cfg.eval_subset = args.eval_subset
    metrics = evaluate_classifier(model, load_split(cfg, train=False, device=device), device)
    print(f"{cfg.model} on {cfg.data} test ({cfg.img_size}px): top-1 {metrics['top1']:.2f}%, "
          f"loss {metrics['loss']:.4f}")


def _sprnet_train(args: argparse.Namespace) -> None:
    from effdl.report import print_table
    from effdl.sprnet.evaluate import METRIC_NAMES, format_metrics
    from effdl.sprnet.train import DetectionTrainConfig, read_checkpoint, train_detector

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(DetectionTrainConfig)
             if getattr(args, f.name, None) is not None}
    saved = read_checkpoint(args.resume)["config"] if args.resume else {}
    result = train_detector(DetectionTrainConfig(**{**saved, **given}), resume=args.resume)
    print_table(f"{result.history[-1]['epoch']:g} epochs, checkpoint {result.checkpoint}", ["IoU", *METRIC_NAMES],
                format_metrics(result.metrics))


def _sprnet_pretrain(args: argparse.Namespace) -> None:
    from effdl.sprnet.pretrain import pretrain_backbone, save_backbone
    from effdl.sprnet.train import DetectionTrainConfig, load_dataset

    cfg = DetectionTrainConfig(data=args.data, shapes_train_images=args.shapes_train_images)
    state, accuracy = pretrain_backbone(load_dataset(cfg, args.split or cfg.train_split), args.backbone, args.steps)
    out = save_backbone(state, args.out or Path(f"runs/backbone-{args.backbone}.pth"))
    print(f"{args.backbone} crop accuracy {100 * accuracy:.1f}%; weights written to {out} "
          f"(use --weights-backbone {out})")


def _sprnet_eval(args: argparse.Namespace) -> None:
    from effdl.report import print_table
    from effdl.sprnet.evaluate import METRIC_NAMES, format_metrics
    from effdl.sprnet.train import evaluate_checkpoint

    metrics = evaluate_checkpoint(args.checkpoint, data=args.data, split=args.split, device=args.device)
    print_table(f"COCO AP of {args.checkpoint}", ["IoU", *METRIC_NAMES], format_metrics(metrics))


def _sprnet_predict(args: argparse.Namespace) -> None:
    from effdl.sprnet.train import predict_image

    prediction = predict_image(args.checkpoint, args.image, args.out, args.score_threshold, device=args.device)
    kept = int((prediction["scores"] > args.score_threshold).sum())
    print(f"{kept} instances above score {args.score_threshold}; overlay written to {args.out}")


def _flover_serve(args: argparse.Namespace) -> None:
    from effdl.flover.server import serve

    serve(args.model, host=args.host, port=args.port, max_slots=args.max_slots, max_len=args.max_len,
          policy=args.policy, shuffle=not args.no_shuffle, prefill_chunk=args.prefill_chunk,
          max_queue=args.max_queue, name=args.name, device=args.device, tp=args.tp)


def _fpdt_train(args: argparse.Namespace) -> None:
    from effdl.fpdt.model import FPDTConfig
    from effdl.fpdt.train import train_fpdt

    cfg = _train_config(args, FPDT_TRAIN_DEFAULTS)
    fpdt = FPDTConfig(chunk_size=args.chunk_size, offload=args.offload, spill_dir=args.spill_dir, sp_size=args.sp)
    result = train_fpdt(cfg, fpdt, resume=args.resume, init=args.init)
    if result.checkpoint is not None:  # rank 0
        print(f"trained to step {result.step} at {cfg.seq_len:,} tokens: val loss {result.evals[-1][1]:.4f}, "
              f"{result.tokens_per_s:,.0f} tokens/s; checkpoint {result.checkpoint}")


def _fpdt_plan(args: argparse.Namespace) -> None:
    from effdl.core.config import ModelConfig
    from effdl.fpdt.plan import parse_bytes, plan
    from effdl.report import print_table

    cfg = ModelConfig.preset(args.model)
    budget, rows = plan(cfg, args.gpus, parse_bytes(args.gpu_mem), args.chunk,
                        elem=2 if args.dtype == "bf16" else 4, host_mem=parse_bytes(args.host_mem))
    print_table(f"{args.model} on {args.gpus} x {args.gpu_mem}: {budget / 2**30:.1f} GiB per GPU for activations "
                f"(ZeRO-3 model state, 10% reserve), {args.host_mem} host memory per node",
                ["method", "ranks per sequence", "longest sequence", "activations GiB per GPU",
                 "offloaded GiB per GPU"],
                [[r.method, r.ranks, r.max_tokens, r.activation_bytes / 2**30, r.offloaded_bytes / 2**30]
                 for r in rows])


def _fpdt_eval(args: argparse.Namespace) -> None:
    import itertools

    import torch

    from effdl.core.hf import load_checkpoint
    from effdl.core.trainer import model_folder, resolve_device
    from effdl.fpdt.train import bucket_means, loss_by_position
    from effdl.report import line_plot, print_table

    model = load_checkpoint(model_folder(args.model), device=resolve_device(args.device), dtype=torch.float32)
    curve = loss_by_position(model, args.seq_len, args.windows)
    edges = [0] + [2**k for k in range(4, args.seq_len.bit_length()) if 2**k < args.seq_len] + [args.seq_len]
    means = bucket_means(curve, edges)
    print_table(f"held-out loss by position ({args.windows} windows of {args.seq_len:,} tokens)",
                ["positions", "loss"],
                [[f"{a:,}-{b - 1:,}", m] for (a, b), m in zip(itertools.pairwise(edges), means, strict=True)])
    mids = [(a + b - 1) / 2 for a, b in itertools.pairwise(edges)]
    line_plot(args.out, {"mean loss": (mids, means)}, title="Held-out loss by token position",
              xlabel="position in the sequence", ylabel="next-token loss (nats)", logx=True)
    print(f"plot: {args.out}")


def _exflow_trace(args: argparse.Namespace) -> None:
    from effdl.exflow.affinity import affinity_score, plot_affinity, transition_counts
    from effdl.exflow.pipeline import load_moe
    from effdl.exflow.trace import trace_corpus

    trace = trace_corpus(load_moe(args.model), args.split, args.tokens, args.seq_len)
    trace.save(args.out)
    counts = transition_counts(trace.experts, trace.n_experts)
    plot = plot_affinity(Path(args.out).with_suffix(".png"), counts,
                         f"P(expert at l+1 | expert at l), {trace.source}")
    print(f"{trace.n_tokens:,} tokens x {trace.n_layers} layers x top-{trace.top_k}: {args.out}; "
          f"affinity score {affinity_score(counts):.3f} (0 = independent, 1 = deterministic); heatmap {plot}")


def _exflow_affinity(args: argparse.Namespace) -> None:
    from effdl.exflow.pipeline import affinity_over_training
    from effdl.report import line_plot, print_table

    scores = affinity_over_training(args.checkpoints, args.tokens)
    print_table("inter-layer expert affinity on held-out text", ["step", "affinity score"], scores)
    line_plot(args.out, {"affinity score": ([s for s, _ in scores], [a for _, a in scores])},
              title="Expert affinity over training (held-out text)", xlabel="training step",
              ylabel="I(X_l; X_l+1) / H(X_l+1)")
    print(f"plot: {args.out}")


def _exflow_place(args: argparse.Namespace) -> None:
    from effdl.exflow.pipeline import place_and_score
    from effdl.exflow.trace import RoutingTrace
    from effdl.report import print_table

    fit = RoutingTrace.load(args.trace)
    score = RoutingTrace.load(args.eval_trace) if args.eval_trace else fit
    report = place_and_score(fit, score, args.gpus, tuple(dict.fromkeys(("round_robin", args.method))),
                             args.time_limit)
    chosen = report.placements[args.method]
    chosen.save(args.out)
    base = report.held_out["round_robin"]
    print_table(f"cross-GPU transitions, {args.gpus} GPUs ({'held-out' if args.eval_trace else 'fitted'} trace)",
                ["method", "cross-GPU share", "vs round robin", "gap", "solve s"],
                [[name, report.held_out[name], f"{report.held_out[name] / base - 1:+.0%}" if base else "-",
                  "-" if p.gap is None else f"{p.gap:.1%}", p.solve_s] for name, p in report.placements.items()])
    print(f"placement: {args.out}")


def _exflow_run(args: argparse.Namespace) -> None:
    from effdl.dist import process_group
    from effdl.exflow.parallel import ExpertParallel
    from effdl.exflow.pipeline import corpus_prompts, load_moe
    from effdl.exflow.placement import Placement
    from effdl.report import print_table

    with process_group() as (rank, world, device):
        placement = Placement.load(args.placement) if args.placement else None
        runner = ExpertParallel(load_moe(args.model, device), args.mode, placement)
        result = runner.generate(corpus_prompts(args.requests, args.prompt_len), args.new_tokens)
    if rank == 0:
        stats, steps = result.stats, args.new_tokens - 1
        print_table(f"{args.mode} expert parallelism on {world} ranks: {args.requests} requests x "
                    f"{args.new_tokens} tokens", ["MoE layer", "all-to-alls per decode step",
                                                   "size exchanges per step", "token rows to other ranks per step",
                                                   "bytes to other ranks per rank per step (padding incl.)"],
                    [[layer, a / max(steps, 1), c / max(steps, 1), x / max(steps, 1), b / max(steps, 1) / world]
                     for layer, (a, c, x, b) in enumerate(zip(
                         stats.all_to_all["decode"], stats.size_exchanges["decode"], stats.rows_cross["decode"],
                         stats.bytes_cross["decode"], strict=True))])
        print(f"decode {args.requests * steps / max(result.decode_s, 1e-9):,.1f} tokens/s, prefill "
              f"{result.prefill_s:.2f} s; context syncs per step {stats.kv_syncs['decode'] / max(steps, 1):.0f} "
              f"({stats.kv_sync_bytes['decode'] / max(steps, 1) / world:,.0f} bytes per rank)")


def _exflow_simulate(args: argparse.Namespace) -> None:
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


def _add_train_args(parser: argparse.ArgumentParser, defaults: dict) -> None:
    """The ``TrainConfig`` options shared by every trainer verb; ``defaults`` overrides TrainConfig's in the help."""
    from effdl.core.trainer import TrainConfig

    default = {**dataclasses.asdict(TrainConfig()), **defaults}
    parser.add_argument("--preset", help=f"model preset (see `effdl lm presets`; default {default['preset']})")
    parser.add_argument("--steps", type=int, help=f"total optimizer steps (default {default['steps']})")
    parser.add_argument("--seq-len", dest="seq_len", type=int,
                        help=f"tokens per sequence (default {default['seq_len']})")
    parser.add_argument("--batch-size", dest="batch_size", type=int,
                        help=f"sequences per step (default {default['batch_size']})")
    parser.add_argument("--lr", type=float, help=f"peak learning rate (default {default['lr']:g})")
    parser.add_argument("--warmup-steps", dest="warmup_steps", type=int,
                        help=f"linear warmup steps (default {default['warmup_steps']})")
    parser.add_argument("--eval-every", dest="eval_every", type=int,
                        help=f"steps between evals (default {default['eval_every']}; 0 = end only)")
    parser.add_argument("--ckpt-every", dest="ckpt_every", type=int, help="steps between checkpoints (0 = end only)")
    parser.add_argument("--out", dest="out_dir", help=f"output folder (default {default['out_dir']})")
    parser.add_argument("--seed", type=int, help="data order and init seed (default 0)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (default auto)")
    parser.add_argument("--max-time", dest="max_time_s", type=float, help="stop after this many seconds")
    parser.add_argument("--resume", help="checkpoint folder (or run folder) to continue from exactly")


def _add_epoch_train_args(parser: argparse.ArgumentParser, defaults: dict) -> None:
    """The options shared by the epoch-based trainers (soft, sprnet). ``defaults`` are their config's, for the help
    only (importing the configs would load timm and torchvision on every ``effdl`` call)."""
    parser.add_argument("--epochs", type=float, help=f"epochs, fractions allowed (default {defaults['epochs']:g})")
    parser.add_argument("--batch-size", dest="batch_size", type=int,
                        help=f"images per step (default {defaults['batch_size']})")
    parser.add_argument("--lr", type=float, help=f"AdamW peak learning rate (default {defaults['lr']:g})")
    parser.add_argument("--out", dest="out_dir", help=f"checkpoint folder (default {defaults['out_dir']})")
    parser.add_argument("--seed", type=int, help="data order and init seed (default 0)")
    parser.add_argument("--device", help="auto, cpu, cuda ... (default auto)")
    parser.add_argument("--max-time", dest="max_time_s", type=float,
                        help="stop after this many seconds (and evaluate)")
    parser.add_argument("--resume", help="checkpoint (.pth) or run folder (its newest) to continue from exactly")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="effdl", description="Efficient deep learning systems in PyTorch.")
    systems = parser.add_subparsers(dest="system", required=True, metavar="{demo,lm,soft,sprnet,fpdt,exflow,flover}")

    demo = systems.add_parser("demo", help="a tour of every system on embedded data, report in ./effdl-demo/")
    demo.add_argument("--only", help="run one stage (lm, soft, sprnet, fpdt, exflow, flover)")
    demo.add_argument("--out", default="effdl-demo", help="report folder (default: effdl-demo)")
    demo.add_argument("--quick", action="store_true", help="seconds per stage instead of ~90 (smoke test)")
    demo.set_defaults(run=_demo)

    lm = systems.add_parser("lm", help="train and sample the Llama-style language model").add_subparsers(
        dest="verb", required=True, metavar="{presets,train,generate}")
    lm.add_parser("presets", help="list model presets").set_defaults(run=_lm_presets)

    tr = lm.add_parser("train", help="train a preset on the Python stdlib corpus; HF-format checkpoints")
    _add_train_args(tr, {})
    tr.set_defaults(run=_lm_train)

    gen = lm.add_parser("generate", help="sample text from a checkpoint folder")
    gen.add_argument("--model", required=True, help="HF-format checkpoint folder")
    gen.add_argument("--prompt", default="def ", help="text to continue")
    gen.add_argument("--max-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--bos", action="store_true", help="prepend the model's bos token (HF Llama checkpoints)")
    gen.add_argument("--device", default="auto")
    gen.set_defaults(run=_lm_generate)

    soft = systems.add_parser("soft", help="softmax-free vision transformers (SOFT)").add_subparsers(
        dest="verb", required=True, metavar="{train,eval}")
    st = soft.add_parser("train", help="train a timm model (soft_tiny ... or any baseline) on Fashion-MNIST")
    st.add_argument("--model", help="timm model name (default soft_tiny)")
    st.add_argument("--data", help="dataset (default fashion-mnist)")
    st.add_argument("--img-size", dest="img_size", type=int, help="input size in pixels (default 64)")
    _add_epoch_train_args(st, dict(epochs=10, batch_size=128, lr=1e-3, out_dir="runs/soft"))
    st.add_argument("--weight-decay", dest="weight_decay", type=float, help="AdamW weight decay (default 0.05)")
    st.add_argument("--warmup-epochs", dest="warmup_epochs", type=float, help="linear warmup (default 1)")
    st.add_argument("--label-smoothing", dest="label_smoothing", type=float, help="(default 0.1)")
    st.add_argument("--train-subset", dest="train_subset", type=int, help="first N training images (0 = all)")
    st.add_argument("--eval-subset", dest="eval_subset", type=int, help="first N test images (0 = all)")
    st.add_argument("--baseline", help="also train this timm model with the same recipe, side by side")
    st.set_defaults(run=_soft_train)
    se = soft.add_parser("eval", help="top-1 of a checkpoint written by `effdl soft train`")
    se.add_argument("--checkpoint", required=True)
    se.add_argument("--eval-subset", dest="eval_subset", type=int, help="first N test images (default all)")
    se.add_argument("--device", default="auto")
    se.set_defaults(run=_soft_eval)

    sprnet = systems.add_parser("sprnet", help="one-stage instance segmentation (SPRNet) and its baselines"
                                ).add_subparsers(dest="verb", required=True, metavar="{train,eval,predict,pretrain}")
    pt = sprnet.add_parser("train", help="train SPRNet, Mask R-CNN or RetinaNet; COCO box/mask AP every epoch")
    pt.add_argument("--model", help="sprnet_resnet18_fpn (default), sprnet_resnet50_fpn, maskrcnn, retinanet")
    pt.add_argument("--backbone", help="resnet18 (default) or resnet50, for maskrcnn / retinanet")
    pt.add_argument("--data", help="'shapes' (default: synthetic, generated once) or a COCO folder")
    pt.add_argument("--train-split", dest="train_split", help="(default train; COCO: train2017)")
    pt.add_argument("--val-split", dest="val_split", help="(default val; COCO: val2017)")
    pt.add_argument("--shapes-images", dest="shapes_train_images", type=int, help="synthetic training images")
    _add_epoch_train_args(pt, dict(epochs=12, batch_size=4, lr=1e-4, out_dir="runs/sprnet"))
    pt.add_argument("--min-size", dest="min_size", type=int, help="resize shorter side to (default 128)")
    pt.add_argument("--max-size", dest="max_size", type=int, help="longer side at most (default 128)")
    pt.add_argument("--smallest-anchor", dest="smallest_anchor", type=int, help="P3 anchor px (default 16)")
    pt.add_argument("--weights-backbone", dest="weights_backbone", help="local torchvision ResNet state dict")
    pt.add_argument("--eval-every", dest="eval_every", type=int, help="epochs between validation passes (default 1)")
    pt.add_argument("--eval-images", dest="eval_images", type=int, help="first N validation images (0 = all)")
    pt.set_defaults(run=_sprnet_train)
    pe = sprnet.add_parser("eval", help="COCO box and mask AP of a checkpoint")
    pe.add_argument("--checkpoint", required=True, help="checkpoint (.pth) or run folder (its newest)")
    pe.add_argument("--data", help="COCO folder (default: the data it was trained on)")
    pe.add_argument("--split", help="split to score (default: its validation split)")
    pe.add_argument("--device", default="auto")
    pe.set_defaults(run=_sprnet_eval)
    pp = sprnet.add_parser("predict", help="draw the detected masks and boxes on one image")
    pp.add_argument("image")
    pp.add_argument("--checkpoint", required=True, help="checkpoint (.pth) or run folder (its newest)")
    pp.add_argument("--out", default="overlay.png")
    pp.add_argument("--score-threshold", dest="score_threshold", type=float, default=0.5)
    pp.add_argument("--device", default="auto")
    pp.set_defaults(run=_sprnet_predict)
    pb = sprnet.add_parser("pretrain", help="pretrain a backbone on the data's object crops (no ImageNet here)")
    pb.add_argument("--data", default="shapes", help="'shapes' (default) or a COCO folder")
    pb.add_argument("--split", help="(default train)")
    pb.add_argument("--shapes-images", dest="shapes_train_images", type=int, default=1000)
    pb.add_argument("--backbone", default="resnet18", help="resnet18 (default) or resnet50")
    pb.add_argument("--steps", type=int, default=300, help="batches of 64 crops (default 300)")
    pb.add_argument("--out", type=Path, help="(default runs/backbone-BACKBONE.pth)")
    pb.set_defaults(run=_sprnet_pretrain)

    fpdt = systems.add_parser("fpdt", help="train on very long sequences (FPDT: chunk pipeline + offload)"
                              ).add_subparsers(dest="verb", required=True, metavar="{train,plan,eval}")
    ft = fpdt.add_parser("train", help="train a preset at a long sequence length on the stdlib corpus")
    ft.add_argument("--chunk-size", type=int, default=2048, help="global chunk: tokens per pipeline step")
    ft.add_argument("--offload", choices=["none", "host", "disk"], default="disk")
    ft.add_argument("--spill-dir", help="where --offload disk spills (default: the system temp folder)")
    ft.add_argument("--sp", type=int, default=1, help="sequence-parallel ranks (run under torchrun with as many)")
    ft.add_argument("--eval-batches", dest="eval_batches", type=int, help="validation sequences (default 2)")
    ft.add_argument("--init", help="start from this HF-format checkpoint folder (e.g. a Llama) instead of a preset")
    _add_train_args(ft, FPDT_TRAIN_DEFAULTS)
    ft.set_defaults(run=_fpdt_train)
    fp = fpdt.add_parser("plan", help="predict the longest trainable sequence per method (memory model)")
    fp.add_argument("--model", default="llama-8b", help="model preset (see `effdl lm presets`)")
    fp.add_argument("--gpus", type=int, default=4)
    fp.add_argument("--gpu-mem", default="40GiB", help="memory per GPU, e.g. 40GiB, 80GB")
    fp.add_argument("--chunk", type=int, default=65536, help="FPDT global chunk (the paper's 64K default)")
    fp.add_argument("--host-mem", default="1TiB", help="host memory per node for FPDT's offloaded chunks")
    fp.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="activation dtype")
    fp.set_defaults(run=_fpdt_plan)
    fe = fpdt.add_parser("eval", help="held-out loss by token position of a checkpoint, as a table and PNG")
    fe.add_argument("--model", required=True, help="HF-format checkpoint folder")
    fe.add_argument("--seq-len", type=int, default=16384)
    fe.add_argument("--windows", type=int, default=4, help="held-out windows averaged")
    fe.add_argument("--out", default="loss_by_position.png")
    fe.add_argument("--device", default="auto")
    fe.set_defaults(run=_fpdt_eval)

    exflow = systems.add_parser("exflow", help="MoE inference: expert affinity, placement, one all-to-all per layer"
                                ).add_subparsers(dest="verb", required=True,
                                                 metavar="{trace,affinity,place,run,simulate}")
    et = exflow.add_parser("trace", help="record which experts every token visits (.npz) and plot the affinity")
    et.add_argument("--model", required=True, help="MoE checkpoint folder or training run folder")
    et.add_argument("--split", choices=["train", "val"], default="val", help="held-in or held-out text")
    et.add_argument("--tokens", type=int, default=16384)
    et.add_argument("--seq-len", type=int, default=256)
    et.add_argument("--out", default="trace.npz")
    et.set_defaults(run=_exflow_trace)
    ea = exflow.add_parser("affinity", help="affinity score of each checkpoint of a training run, as a plot")
    ea.add_argument("--checkpoints", nargs="+", required=True, help="checkpoint folders or run folders")
    ea.add_argument("--tokens", type=int, default=8192, help="held-out tokens traced per checkpoint")
    ea.add_argument("--out", default="affinity.png")
    ea.set_defaults(run=_exflow_affinity)
    ep = exflow.add_parser("place", help="solve an expert placement from a routing trace")
    ep.add_argument("--trace", required=True, help="trace to fit (held-in text)")
    ep.add_argument("--eval-trace", help="trace to score on (held-out text; default: the fitted one)")
    ep.add_argument("--gpus", type=int, required=True)
    ep.add_argument("--method", choices=["ilp", "staged", "round_robin"], default="ilp")
    ep.add_argument("--time-limit", type=float, default=60.0, help="ilp solver seconds")
    ep.add_argument("--out", default="placement.json")
    ep.set_defaults(run=_exflow_place)
    er = exflow.add_parser("run", help="expert-parallel greedy decoding under torchrun, with traffic counts")
    er.add_argument("--model", required=True, help="MoE checkpoint folder or training run folder")
    er.add_argument("--mode", choices=["standard", "coherent"], default="coherent")
    er.add_argument("--placement", help="placement.json from `effdl exflow place` (default round robin)")
    er.add_argument("--requests", type=int, default=16)
    er.add_argument("--prompt-len", type=int, default=64)
    er.add_argument("--new-tokens", type=int, default=32)
    er.set_defaults(run=_exflow_run)
    es = exflow.add_parser("simulate", help="all-to-all time per step on a multi-node topology (traffic model)")
    es.add_argument("--trace", required=True)
    es.add_argument("--placement", nargs="+", required=True, help="placement files (same GPU count)")
    es.add_argument("--gpus-per-node", type=int, default=4)
    es.add_argument("--intra-gbps", type=float, default=200.0, help="GB/s per GPU within a node")
    es.add_argument("--inter-gbps", type=float, default=25.0, help="GB/s per GPU across nodes")
    es.add_argument("--token-bytes", type=float, default=8192, help="bytes per token row (hidden size x dtype)")
    es.add_argument("--kv-bytes", type=float, default=0.0, help="coherent mode: K/V bytes per token all-gathered")
    es.set_defaults(run=_exflow_simulate)

    flover = systems.add_parser("flover", help="serve a model to requests arriving at random times (Flover)"
                                ).add_subparsers(dest="verb", required=True, metavar="{serve}")
    sv = flover.add_parser("serve", help="OpenAI-compatible server (/v1/completions, /v1/chat/completions)")
    sv.add_argument("--model", default="tiny", help="HF-format checkpoint folder, or a preset (random weights)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--name", help="model name clients send (default: folder or preset name)")
    sv.add_argument("--max-slots", type=int, default=16, help="KV slots = most requests decoding at once")
    sv.add_argument("--max-len", type=int, default=None,
                    help="prompt + output tokens per slot (default: the model's, at most 4096)")
    sv.add_argument("--policy", choices=["fused", "static", "sequential"], default="fused")
    sv.add_argument("--no-shuffle", action="store_true", help="turn the KV memory shuffle off")
    sv.add_argument("--prefill-chunk", type=int, default=2048,
                    help="most prompt tokens prefilled per step (smaller: steadier decode, slower prefill)")
    sv.add_argument("--max-queue", type=int, default=1024, help="waiting requests before 503")
    sv.add_argument("--device", default="auto")
    sv.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (run under torchrun with as many)")
    sv.set_defaults(run=_flover_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except EffdlError as e:
        print(f"effdl: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
