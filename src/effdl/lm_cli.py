"""``effdl lm {presets,train,generate}``, and the options every trainer verb shares.

This is a top-level module rather than ``effdl/core/cli.py``: ``effdl.core`` is the model side, and these verbs
drive the trainer. The shared options live here, in one place: ``add_train_options`` (``TrainConfig``: lm and fpdt
train) and ``add_epoch_options`` (the epoch-based trainers: soft and sprnet train).

Trainer options default to ``None`` so that ``--resume`` keeps the checkpoint's own values for options not given;
their help shows the config dataclass's default instead.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any


def config_defaults(config: type, **overrides: Any) -> dict[str, Any]:
    """The field defaults of the dataclass ``config``, with ``overrides`` over them."""
    return {**{f.name: f.default for f in dataclasses.fields(config)}, **overrides}


def given_options(args: argparse.Namespace, config: type) -> dict[str, Any]:
    """The fields of the dataclass ``config`` given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config)
            if getattr(args, f.name, None) is not None}


def add_train_options(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """The ``TrainConfig`` options of a trainer verb; ``defaults`` (``config_defaults(TrainConfig, ...)``) for help."""
    parser.add_argument("--preset", help=f"model preset (see `effdl lm presets`; default {defaults['preset']})")
    parser.add_argument("--steps", type=int, help=f"total optimizer steps (default {defaults['steps']})")
    parser.add_argument("--seq-len", dest="seq_len", type=int,
                        help=f"tokens per sequence (default {defaults['seq_len']})")
    parser.add_argument("--batch-size", dest="batch_size", type=int,
                        help=f"sequences per step (default {defaults['batch_size']})")
    parser.add_argument("--lr", type=float, help=f"peak learning rate (default {defaults['lr']:g})")
    parser.add_argument("--warmup-steps", dest="warmup_steps", type=int,
                        help=f"linear warmup steps (default {defaults['warmup_steps']})")
    parser.add_argument("--eval-every", dest="eval_every", type=int,
                        help=f"steps between evals (default {defaults['eval_every']}; 0 = end only)")
    parser.add_argument("--ckpt-every", dest="ckpt_every", type=int,
                        help=f"steps between checkpoints (default {defaults['ckpt_every']}; 0 = end only)")
    parser.add_argument("--out", dest="out_dir", help=f"output folder (default {defaults['out_dir']})")
    parser.add_argument("--seed", type=int, help=f"data order and init seed (default {defaults['seed']})")
    parser.add_argument("--device", help=f"auto, cpu, cuda, cuda:1 ... (default {defaults['device']})")
    parser.add_argument("--max-time", dest="max_time_s", type=float, help="stop after this many seconds")
    parser.add_argument("--resume", help="checkpoint folder (or run folder) to continue from exactly")


def add_epoch_options(parser: argparse.ArgumentParser, config: type) -> None:
    """The options of the epoch-based trainers; ``config`` is the trainer's config dataclass."""
    defaults = config_defaults(config)
    parser.add_argument("--epochs", type=float, help=f"epochs, fractions allowed (default {defaults['epochs']:g})")
    parser.add_argument("--batch-size", dest="batch_size", type=int,
                        help=f"images per step (default {defaults['batch_size']})")
    parser.add_argument("--lr", type=float, help=f"AdamW peak learning rate (default {defaults['lr']:g})")
    parser.add_argument("--out", dest="out_dir", help=f"checkpoint folder (default {defaults['out_dir']})")
    parser.add_argument("--seed", type=int, help=f"data order and init seed (default {defaults['seed']})")
    parser.add_argument("--device", help=f"auto, cpu, cuda ... (default {defaults['device']})")
    parser.add_argument("--max-time", dest="max_time_s", type=float,
                        help="stop after this many seconds (and evaluate)")
    parser.add_argument("--resume", help="checkpoint (.pth) or run folder (its newest) to continue from exactly")


def train_config(args: argparse.Namespace, defaults: dict[str, Any]) -> Any:
    """The ``TrainConfig`` options given on the command line over ``defaults``, or over the resumed checkpoint's."""
    from effdl.core.trainer import TrainConfig, resume_config

    given = given_options(args, TrainConfig)
    return resume_config(args.resume, **given) if args.resume else TrainConfig(**{**defaults, **given})


def _presets(args: argparse.Namespace) -> None:
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


def _train(args: argparse.Namespace) -> None:
    from effdl.core.trainer import train

    result = train(train_config(args, {}), resume=args.resume)
    print(f"trained to step {result.step}: val loss {result.evals[-1][1]:.4f}, "
          f"{result.tokens_per_s:,.0f} tokens/s; checkpoint {result.checkpoint}")


def _generate(args: argparse.Namespace) -> None:
    from effdl.core.device import resolve_device
    from effdl.core.generate import generate
    from effdl.core.hf import load_checkpoint
    from effdl.core.tokenizer import load_tokenizer

    model = load_checkpoint(args.model, device=resolve_device(args.device))
    tokenizer = load_tokenizer(args.model, model.config.vocab_size)
    prompt = tokenizer.encode(args.prompt)
    if model.config.bos_id is not None and args.bos:
        prompt = [model.config.bos_id, *prompt]
    out = generate(model, prompt, args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, seed=args.seed)
    print(args.prompt + tokenizer.decode(out))


def add_commands(verbs: argparse._SubParsersAction) -> None:
    from effdl.core.trainer import TrainConfig

    verbs.add_parser("presets", help="list model presets").set_defaults(func=_presets)

    train = verbs.add_parser("train", help="train a preset on the Python stdlib corpus; HF-format checkpoints")
    add_train_options(train, config_defaults(TrainConfig))
    train.set_defaults(func=_train)

    gen = verbs.add_parser("generate", help="sample text from a checkpoint folder")
    gen.add_argument("--model", required=True, help="HF-format checkpoint folder")
    gen.add_argument("--prompt", default="def ", help="text to continue (default %(default)r)")
    gen.add_argument("--max-tokens", type=int, default=200, help="(default %(default)s)")
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default %(default)s)")
    gen.add_argument("--top-p", type=float, default=0.95, help="(default %(default)s)")
    gen.add_argument("--top-k", type=int, default=0, help="0 = off (default %(default)s)")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--bos", action="store_true", help="prepend the model's bos token (HF Llama checkpoints)")
    gen.add_argument("--device", default="auto", help="(default %(default)s)")
    gen.set_defaults(func=_generate)
