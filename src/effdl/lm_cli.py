"""``effdl lm {presets,train,generate}``: the language model's presets, its trainer and sampling.

A top-level module rather than ``effdl/core/cli.py``: ``effdl.core`` is the model side, and ``train`` drives
``effdl.train.lm``. The trainer options are ``effdl.train.options``', shared with every other trainer verb.
"""

from __future__ import annotations

import argparse

from effdl.train.options import add_step_options, config_defaults, train_config


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
    from effdl.train.lm import train

    result = train(train_config(args, {}), resume=args.resume)
    print(f"trained to step {result.step}: val loss {result.metrics['val_loss']:.4f}, "
          f"{result.items_per_s:,.0f} tokens/s; checkpoint {result.checkpoint}")


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
    from effdl.train.lm import TrainConfig

    verbs.add_parser("presets", help="list model presets").set_defaults(func=_presets)

    train = verbs.add_parser("train", help="train a preset on the Python stdlib corpus; HF-format checkpoints")
    add_step_options(train, config_defaults(TrainConfig))
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
