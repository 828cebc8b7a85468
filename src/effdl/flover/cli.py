"""``effdl flover serve``: an OpenAI-compatible server over the Flover engine (tensor parallel under torchrun)."""

from __future__ import annotations

import argparse
import inspect
import os

# Set before torch loads OpenMP. The server's compute threads share the cores with its HTTP thread; busy-waiting
# OpenMP workers hold a core the event loop needs, and each token then waits for it. Passive waiting: on 2 cores
# (benchmarks/flover_vs_vllm.py, 100 ms arrivals) TPOT 44.0 -> 35.6 ms and output tokens/s 354 -> 377.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _serve(args: argparse.Namespace) -> None:
    from effdl.flover.server import serve

    serve(args.model, host=args.host, port=args.port, max_slots=args.max_slots, max_len=args.max_len,
          policy=args.policy, shuffle=not args.no_shuffle, prefill_chunk=args.prefill_chunk,
          max_queue=args.max_queue, name=args.name, device=args.device, tp=args.tp, api_key=args.api_key,
          prefix_caching=not args.no_prefix_caching)


def add_commands(verbs: argparse._SubParsersAction) -> None:
    from effdl.flover.engine import DEFAULT_MAX_LEN
    from effdl.flover.scheduler import POLICIES
    from effdl.flover.server import serve

    d = {name: p.default for name, p in inspect.signature(serve).parameters.items()}
    shown = "(default %(default)s)"
    sv = verbs.add_parser("serve", help="OpenAI-compatible server (/v1/completions, /v1/chat/completions)")
    sv.add_argument("--model", default="tiny", help="HF-format checkpoint folder, or a preset (random weights) "
                                                    + shown)
    sv.add_argument("--host", default=d["host"], help=shown)
    sv.add_argument("--port", type=int, default=d["port"], help=shown)
    sv.add_argument("--name", help="model name clients send (default: folder or preset name)")
    sv.add_argument("--max-slots", type=int, default=d["max_slots"],
                    help=f"KV slots = most requests decoding at once {shown}")
    sv.add_argument("--max-len", type=int, default=d["max_len"],
                    help=f"prompt + output tokens per slot (default: the model's, at most {DEFAULT_MAX_LEN})")
    sv.add_argument("--policy", choices=POLICIES, default=d["policy"], help=shown)
    sv.add_argument("--no-shuffle", action="store_true", help="turn the KV memory shuffle off")
    sv.add_argument("--no-prefix-caching", action="store_true",
                    help="turn automatic prefix caching off (reusing the K/V of prompt prefixes already seen)")
    sv.add_argument("--prefill-chunk", type=int, default=d["prefill_chunk"],
                    help=f"most prompt tokens prefilled per step (smaller: steadier decode, slower prefill) {shown}")
    sv.add_argument("--max-queue", type=int, default=d["max_queue"], help=f"waiting requests before 503 {shown}")
    sv.add_argument("--device", default=d["device"], help=shown)
    sv.add_argument("--tp", type=int, default=d["tp"],
                    help=f"tensor-parallel ranks (run under torchrun with as many) {shown}")
    sv.add_argument("--api-key", default=None,
                    help="require 'Authorization: Bearer KEY' on /v1/* and /tokenize, /detokenize "
                         "(default: $EFFDL_API_KEY if set, else no key)")
    sv.set_defaults(func=_serve)
