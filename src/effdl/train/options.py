"""The command-line options every trainer verb shares (lm, fpdt, soft and sprnet train), in one place.

``add_step_options`` serves the step-counted trainers (``TrainConfig``: lm and fpdt train) and
``add_epoch_options`` the epoch-based ones (soft and sprnet train); both end with ``add_run_options``.
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


def add_run_options(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """Where a run writes, its seed and device, its time limit and what it resumes: the same for every trainer."""
    parser.add_argument("--out", dest="out_dir", help=f"run folder for checkpoints (default {defaults['out_dir']})")
    parser.add_argument("--seed", type=int, help=f"data order and init seed (default {defaults['seed']})")
    parser.add_argument("--device", help=f"auto, cpu, cuda, cuda:1 ... (default {defaults['device']})")
    parser.add_argument("--max-time", dest="max_time_s", type=float,
                        help="stop after this many seconds of training (evaluate and checkpoint there)")
    parser.add_argument("--resume", help="checkpoint folder, or run folder (its newest), to continue from exactly")


def add_step_options(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
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
    add_run_options(parser, defaults)


def add_epoch_options(parser: argparse.ArgumentParser, config: type, lr_default: str | None = None) -> None:
    """The options of the epoch-based trainers; ``config`` is the trainer's config dataclass, ``lr_default`` says
    what a learning rate of None means in it."""
    defaults = config_defaults(config)
    parser.add_argument("--epochs", type=float, help=f"epochs, fractions allowed (default {defaults['epochs']:g})")
    parser.add_argument("--batch-size", dest="batch_size", type=int,
                        help=f"images per step (default {defaults['batch_size']})")
    parser.add_argument("--lr", type=float,
                        help=f"AdamW peak learning rate (default {lr_default or format(defaults['lr'], 'g')})")
    add_run_options(parser, defaults)


def train_config(args: argparse.Namespace, defaults: dict[str, Any]) -> Any:
    """The ``TrainConfig`` options given on the command line over ``defaults``, or over the resumed checkpoint's."""
    from effdl.train.lm import TrainConfig, resume_config

    given = given_options(args, TrainConfig)
    return resume_config(args.resume, **given) if args.resume else TrainConfig(**{**defaults, **given})
