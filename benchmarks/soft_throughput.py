"""SOFT vs softmax baselines at growing image sizes: inference images/s and peak activation memory.

    python benchmarks/soft_throughput.py [--sizes 224 448 896 --batches 1 8 --models soft_tiny pvt_v2_b1 ...]

Each (size, batch) times every model's forward side by side (interleaved rounds, median), then measures
each model's peak memory in a fresh child process, over a second forward pass: on CUDA the allocator's
peak, on CPU the growth of the peak resident set (reset through /proc/self/clear_refs).
soft_tiny's peers: pvt_v2_b1 (the pyramid transformer SOFT compares itself with, 14.0M params) and
deit_small_patch16_224 (the plain ViT of about soft_tiny's ImageNet accuracy).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
from harness import RESULTS, add_plot_only, load_results, report, time_interleaved

from effdl.report import bar_plot

PEERS = ["soft_tiny", "pvt_v2_b1", "deit_small_patch16_224"]


def create(name: str, size: int) -> torch.nn.Module:
    import timm

    import effdl.soft  # noqa: F401  (registers soft_*)

    kwargs = {"img_size": size} if name.startswith(("deit", "vit")) else {}  # a ViT's grid is fixed at build
    return timm.create_model(name, **kwargs).eval()


def peak_memory_mb(name: str, size: int, batch: int, device: str) -> float:
    """Peak memory of one forward pass of ``name`` in a fresh process, beyond what the weights hold (MiB)."""
    code = f"""
import sys, torch
sys.path.insert(0, {str(RESULTS.parent)!r})
from soft_throughput import create, _proc_status_mb
model = create({name!r}, {size}).to({device!r})
x = torch.randn({batch}, 3, {size}, {size}, device={device!r})
with torch.inference_mode():
    model(x)  # first call: library set-up and kernel caches, which are not the model's activations
    if {device!r} == "cuda":
        torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
        model(x)
        print((torch.cuda.max_memory_allocated() - base) / 2**20)
    else:
        open("/proc/self/clear_refs", "w").write("5")  # resets the peak resident set (VmHWM) to the current
        base = _proc_status_mb("VmRSS")
        model(x)
        print(_proc_status_mb("VmHWM") - base)
"""
    # A fixed mmap threshold makes glibc return every large block to the OS when it is freed (its default
    # threshold adapts upwards and keeps them), so the second pass's growth is its own peak, not reuse.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def _proc_status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak since the last reset), MiB."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def measure(args: argparse.Namespace) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    for size in args.sizes:
        models = {name: create(name, size).to(device) for name in args.models}
        for batch in args.batches:
            x = torch.randn(batch, 3, size, size, device=device)

            def forward(model, x=x):
                with torch.inference_mode():
                    model(x)

            timings = time_interleaved({n: (lambda m=m: forward(m)) for n, m in models.items()}, warmup=1,
                                       repeat=args.repeat)
            for name in args.models:
                results.append({"model": name, "size": size, "batch": batch,
                                "images_per_s": batch / timings[name].median_s,
                                "peak_mb": peak_memory_mb(name, size, batch, device)})
                print(json.dumps(results[-1]), flush=True)
    return {"device": device, "results": results}


def tables_and_plots(data: dict, args: argparse.Namespace) -> None:
    results, models = data["results"], list(dict.fromkeys(r["model"] for r in data["results"]))
    first, others = models[0], models[1:]
    rows = []
    for size, batch in dict.fromkeys((r["size"], r["batch"]) for r in results):
        by = {r["model"]: r for r in results if (r["size"], r["batch"]) == (size, batch)}
        rows.append((f"{size}px", batch, *(f"{by[m]['images_per_s']:.2f}" for m in models),
                     *(f"{by[first]['images_per_s'] / by[m]['images_per_s']:.2f}x" for m in others),
                     *(f"{by[m]['peak_mb']:.0f}" for m in models)))
    title = f"inference images/s and peak activation MiB, {data['device']}"
    report("soft_throughput", title,
           ["size", "batch", *(f"{m} img/s" for m in models), *(f"{first} / {m}" for m in others),
            *(f"{m} MiB" for m in models)], rows, extra={"args": vars(args), **data})
    for batch in dict.fromkeys(r["batch"] for r in results):
        sizes = sorted({r["size"] for r in results if r["batch"] == batch})
        for key, file, label, fmt in (("images_per_s", "", "images/s", "{:.1f}"),
                                      ("peak_mb", "_memory", "peak activation MiB", "{:.0f}")):
            series = {m: [next(r[key] for r in results if (r["model"], r["size"], r["batch"]) == (m, s, batch))
                          for s in sizes] for m in models}
            bar_plot(RESULTS / f"soft_throughput{file}_b{batch}.png", [f"{s}px" for s in sizes], series,
                     title=f"inference {label}, batch {batch}, {data['device']}", ylabel=label, value_format=fmt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=PEERS, help="the first is compared with the others")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448, 896])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeat", type=int, default=5)
    add_plot_only(parser)
    args = parser.parse_args()
    data = load_results(RESULTS / "soft_throughput.json") if args.plot_only else measure(args)
    tables_and_plots(data, args)


if __name__ == "__main__":
    main()
