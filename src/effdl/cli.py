"""``effdl <system> <verb>``: assembles each system's own commands (``effdl/<system>/cli.py``) into one parser.

    effdl demo [--only STAGE] [--out DIR] [--quick]
    effdl lm {presets,train,generate}                          effdl/lm_cli.py
    effdl soft {train,eval}                                    effdl/soft/cli.py
    effdl sprnet {train,eval,predict,pretrain}                 effdl/sprnet/cli.py
    effdl fpdt {train,plan,eval}                               effdl/fpdt/cli.py
    effdl exflow {trace,affinity,place,run,simulate}           effdl/exflow/cli.py
    effdl flover {serve}                                       effdl/flover/cli.py

Only the system named on the command line has its commands built: importing ``effdl.soft`` loads timm and
``effdl.sprnet`` torchvision, which ``effdl --help`` or ``effdl lm ...`` should not pay for. Every verb's
handler is set with ``set_defaults(func=...)``. Bad input (``EffdlError``) prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from effdl.errors import EffdlError

# system -> (module whose ``add_commands(verbs)`` adds its verbs to ``effdl <system>``, one-line help)
SYSTEMS = {
    "lm": ("effdl.lm_cli", "train and sample the Llama-style language model"),
    "soft": ("effdl.soft.cli", "softmax-free vision transformers (SOFT)"),
    "sprnet": ("effdl.sprnet.cli", "one-stage instance segmentation (SPRNet) and its baselines"),
    "fpdt": ("effdl.fpdt.cli", "train on very long sequences (FPDT: chunk pipeline + offload)"),
    "exflow": ("effdl.exflow.cli", "MoE inference: expert affinity, placement, one all-to-all per layer"),
    "flover": ("effdl.flover.cli", "serve a model to requests arriving at random times (Flover)"),
}


def _demo(args: argparse.Namespace) -> None:
    from effdl.demo import run_demo

    run_demo(args.out, only=args.only, quick=args.quick)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The root parser; the verbs of the system named first in ``argv`` (default: every system's)."""
    parser = argparse.ArgumentParser(prog="effdl", description="Efficient deep learning systems in PyTorch.")
    systems = parser.add_subparsers(dest="system", required=True, metavar="{demo," + ",".join(SYSTEMS) + "}")

    demo = systems.add_parser("demo", help="a tour of every system on embedded data, report in ./effdl-demo/")
    demo.add_argument("--only", help=f"run one stage ({', '.join(SYSTEMS)})")  # the demo has one stage per system
    demo.add_argument("--out", default="effdl-demo", help="report folder (default: %(default)s)")
    demo.add_argument("--quick", action="store_true", help="seconds per stage instead of ~90 (smoke test)")
    demo.set_defaults(func=_demo)

    wanted = set(SYSTEMS) if argv is None else set(argv[:1])
    for name, (module, help_) in SYSTEMS.items():
        verbs = systems.add_parser(name, help=help_).add_subparsers(dest="verb", required=True)
        if name in wanted:
            importlib.import_module(module).add_commands(verbs)
            verbs.metavar = "{" + ",".join(verbs.choices) + "}"  # names the verbs when one is missing
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        args.func(args)
    except EffdlError as e:
        print(f"effdl: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
