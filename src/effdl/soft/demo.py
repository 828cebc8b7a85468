"""The SOFT stage of ``effdl demo``: a short Fashion-MNIST run and SOFT's attention cost against SDPA."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from effdl.demo import StageReport
from effdl.report import line_plot, markdown_table
from effdl.soft.attention import nystrom_gaussian_attention
from effdl.soft.train import ImageTrainConfig, train_classifier


def attention_cost(sides: list[int], heads: int = 2, dim: int = 32) -> dict[str, tuple[list[int], list[float]]]:
    """Milliseconds per attention call for SOFT (49 landmarks) and SDPA on side x side token grids."""
    curves: dict[str, tuple[list[int], list[float]]] = {"SOFT (49 landmarks)": ([], []), "softmax (SDPA)": ([], [])}
    for side in sides:
        n = side * side
        q, v = torch.randn(1, heads, n, dim) / dim**0.25, torch.randn(1, heads, n, dim)
        grid = q.transpose(-1, -2).reshape(heads, dim, side, side)
        landmarks = F.adaptive_avg_pool2d(grid, 7).flatten(2).transpose(-1, -2)[None]  # (1, H, 49, D)
        calls = {"SOFT (49 landmarks)": (nystrom_gaussian_attention, (q, landmarks, v)),
                 "softmax (SDPA)": (F.scaled_dot_product_attention, (q, q, v))}
        for name, (fn, args) in calls.items():
            with torch.inference_mode():
                fn(*args)  # warm-up
                start = time.perf_counter()
                fn(*args)
            curves[name][0].append(n)
            curves[name][1].append((time.perf_counter() - start) * 1e3)
    return curves


def soft_stage(out_dir: Path, quick: bool) -> StageReport:
    """Train soft_tiny on Fashion-MNIST for about a minute, then time attention as the token grid grows."""
    cfg = ImageTrainConfig(model="soft_tiny", img_size=32, epochs=0.15, batch_size=64, lr=2e-3, warmup_epochs=0.02,
                           eval_subset=2000, max_time_s=65.0, out_dir=str(out_dir / "soft"))
    if quick:
        cfg = ImageTrainConfig(model="soft_tiny", img_size=32, epochs=1, batch_size=16, train_subset=64,
                               eval_subset=64, out_dir=str(out_dir / "soft"))
    result = train_classifier(cfg)
    curves = attention_cost([14, 28] if quick else [14, 28, 56, 112])
    plot = line_plot(out_dir / "soft_attention.png", curves, title="Attention time vs tokens (CPU, log-log)",
                     xlabel="tokens n", ylabel="ms per call", logx=True, logy=True)
    (ns, soft_ms), (_, sdpa_ms) = curves.values()
    rows = [
        ("model", "soft_tiny (13.1M params at 1000 classes), 1 input channel, 32 px"),
        ("images seen", f"{result.step * cfg.batch_size:,} at {result.images_per_s:,.0f} img/s"),
        (f"Fashion-MNIST test top-1 ({cfg.eval_subset or 10000} images)", f"{result.top1:.1f}%"),
        (f"attention at n = {ns[-1]:,}: SOFT / SDPA", f"{soft_ms[-1]:.1f} ms / {sdpa_ms[-1]:.1f} ms "
                                                     f"({sdpa_ms[-1] / soft_ms[-1]:.0f}x faster)"),
    ]
    markdown = (markdown_table(["metric", "value"], rows) + f"\n![attention cost]({plot.name})\n\n"
                "SOFT's time grows linearly with the number of tokens; softmax attention's grows quadratically.\n")
    headline = f"top-1 {result.top1:.1f}% after {result.step * cfg.batch_size:,} images; " \
               f"{sdpa_ms[-1] / soft_ms[-1]:.0f}x faster than SDPA at {ns[-1]:,} tokens"
    return StageReport("SOFT: softmax-free vision transformer", headline, rows, markdown, [plot])
