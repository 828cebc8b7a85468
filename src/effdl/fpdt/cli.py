"""``effdl fpdt {train,plan,eval}``: train at long sequence lengths, plan paper-scale runs, loss by position."""

from __future__ import annotations

import argparse
import inspect

from effdl.train.options import add_step_options, config_defaults, train_config

# `effdl fpdt train`'s recipe: one long sequence per step, a short schedule, 2K-token chunks.
TRAIN_DEFAULTS = dict(preset="tiny", seq_len=16384, batch_size=1, steps=50, warmup_steps=5, eval_every=0,
                      eval_batches=2, out_dir="runs/fpdt")
CHUNK_SIZE = 2048
ELEM_BYTES = {"bf16": 2, "fp32": 4}  # `effdl fpdt plan --dtype`


def _train(args: argparse.Namespace) -> None:
    from effdl.fpdt.pipeline import FPDTConfig
    from effdl.fpdt.train import train_fpdt

    cfg = train_config(args, TRAIN_DEFAULTS)
    fpdt = FPDTConfig(chunk_size=args.chunk_size, offload=args.offload, spill_dir=args.spill_dir, sp_size=args.sp)
    # Under torchrun, train_fpdt joins and leaves the group through effdl.distributed.process_group.
    result = train_fpdt(cfg, fpdt, resume=args.resume, init=args.init)
    if result.checkpoint is not None:  # rank 0
        print(f"trained to step {result.step} at {cfg.seq_len:,} tokens: val loss {result.metrics['val_loss']:.4f}, "
              f"{result.items_per_s:,.0f} tokens/s; checkpoint {result.checkpoint}")


def _plan(args: argparse.Namespace) -> None:
    from effdl.core.config import ModelConfig
    from effdl.fpdt.plan import parse_bytes, plan
    from effdl.report import print_table

    cfg = ModelConfig.preset(args.model)
    budget, rows = plan(cfg, args.gpus, parse_bytes(args.gpu_mem), args.chunk, elem=ELEM_BYTES[args.dtype],
                        host_mem=parse_bytes(args.host_mem))
    print_table(f"{args.model} on {args.gpus} x {args.gpu_mem}: {budget / 2**30:.1f} GiB per GPU for activations "
                f"(ZeRO-3 model state, 10% reserve), {args.host_mem} host memory per node",
                ["method", "ranks per sequence", "longest sequence", "activations GiB per GPU",
                 "offloaded GiB per GPU"],
                [[r.method, r.ranks, r.max_tokens, r.activation_bytes / 2**30, r.offloaded_bytes / 2**30]
                 for r in rows])


def _eval(args: argparse.Namespace) -> None:
    import torch

    from effdl.core.device import resolve_device
    from effdl.core.hf import load_checkpoint, model_folder
    from effdl.fpdt.train import loss_by_position, position_buckets
    from effdl.report import line_plot, print_table

    model = load_checkpoint(model_folder(args.model), device=resolve_device(args.device), dtype=torch.float32)
    buckets = position_buckets(loss_by_position(model, args.seq_len, args.windows))
    print_table(f"held-out loss by position ({args.windows} windows of {args.seq_len:,} tokens)",
                ["positions", "loss"], [[f"{a:,}-{b - 1:,}", m] for a, b, m in buckets])
    line_plot(args.out, {"mean loss": ([(a + b - 1) / 2 for a, b, _ in buckets], [m for _, _, m in buckets])},
              title="Held-out loss by token position", xlabel="position in the sequence",
              ylabel="next-token loss (nats)", logx=True)
    print(f"plot: {args.out}")


def add_commands(verbs: argparse._SubParsersAction) -> None:
    from effdl.fpdt.pipeline import FPDTConfig
    from effdl.fpdt.plan import plan
    from effdl.fpdt.store import OFFLOAD_KINDS
    from effdl.fpdt.train import loss_by_position
    from effdl.train.lm import TrainConfig

    train_defaults = config_defaults(TrainConfig, **TRAIN_DEFAULTS)
    train = verbs.add_parser("train", help="train a preset at a long sequence length on the stdlib corpus")
    train.add_argument("--chunk-size", type=int, default=CHUNK_SIZE,
                       help="global chunk: tokens per pipeline step (default %(default)s)")
    train.add_argument("--offload", choices=OFFLOAD_KINDS, default=FPDTConfig.offload, help="(default %(default)s)")
    train.add_argument("--spill-dir", help="where --offload disk spills (default: the system temp folder)")
    train.add_argument("--sp", type=int, default=FPDTConfig.sp_size,
                       help="sequence-parallel ranks (run under torchrun with as many; default %(default)s)")
    train.add_argument("--eval-batches", dest="eval_batches", type=int,
                       help=f"validation sequences (default {train_defaults['eval_batches']})")
    train.add_argument("--init", help="start from this HF-format checkpoint folder (e.g. a Llama) instead of a preset")
    add_step_options(train, train_defaults)
    train.set_defaults(func=_train)

    chunk = inspect.signature(plan).parameters["chunk"].default
    pl = verbs.add_parser("plan", help="predict the longest trainable sequence per method (memory model)")
    pl.add_argument("--model", default="llama-8b", help="model preset (see `effdl lm presets`; default %(default)s)")
    pl.add_argument("--gpus", type=int, default=4, help="(default %(default)s)")
    pl.add_argument("--gpu-mem", default="40GiB", help="memory per GPU, e.g. 40GiB, 80GB (default %(default)s)")
    pl.add_argument("--chunk", type=int, default=chunk, help="FPDT global chunk (default %(default)s, the paper's)")
    pl.add_argument("--host-mem", default="1TiB",
                    help="host memory per node for FPDT's offloaded chunks (default %(default)s)")
    pl.add_argument("--dtype", choices=ELEM_BYTES, default="bf16", help="activation dtype (default %(default)s)")
    pl.set_defaults(func=_plan)

    ev = verbs.add_parser("eval", help="held-out loss by token position of a checkpoint, as a table and PNG")
    ev.add_argument("--model", required=True, help="HF-format checkpoint folder")
    ev.add_argument("--seq-len", type=int, default=TRAIN_DEFAULTS["seq_len"], help="(default %(default)s)")
    ev.add_argument("--windows", type=int, default=inspect.signature(loss_by_position).parameters["windows"].default,
                    help="held-out windows averaged (default %(default)s)")
    ev.add_argument("--out", default="loss_by_position.png", help="(default %(default)s)")
    ev.add_argument("--device", default="auto", help="(default %(default)s)")
    ev.set_defaults(func=_eval)
