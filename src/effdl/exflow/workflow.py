"""The ExFlow workflow end to end, shared by the CLI, the demo and the benchmarks:
checkpoint -> routing traces -> affinity -> placement -> expert-parallel inference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from effdl.core.data import corpus_tokens
from effdl.core.hf import load_checkpoint, model_folder
from effdl.core.transformer import Transformer
from effdl.errors import EffdlError
from effdl.exflow.affinity import affinity_score, transition_counts
from effdl.exflow.placement import Placement, cross_gpu_fraction, solve
from effdl.exflow.trace import RoutingTrace, trace_corpus


def load_moe(path: str | Path, device: torch.device | str | None = None) -> Transformer:
    """An MoE checkpoint folder (or a training run folder: its newest checkpoint), in fp32."""
    folder = model_folder(path)
    model = load_checkpoint(folder, device=device, dtype=torch.float32)
    if not model.config.is_moe:
        raise EffdlError(f"{folder} holds a dense model; ExFlow needs a mixture-of-experts checkpoint")
    return model


def run_checkpoints(paths: list[str]) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint named, a run folder standing for all its ``checkpoint-*``."""
    found = []
    for path in map(Path, paths):
        if not path.exists():
            raise EffdlError(f"checkpoint {path} does not exist")
        folders = [path] if (path / "config.json").is_file() else sorted(path.glob("checkpoint-*"))
        if not folders:
            raise EffdlError(f"{path} is neither a checkpoint folder nor a run folder with checkpoint-* inside")
        for folder in folders:
            match = re.search(r"(\d+)$", folder.name)
            found.append((int(match.group(1)) if match else len(found), folder))
    return sorted(found)


def affinity_over_training(paths: list[str], n_tokens: int = 8192) -> list[tuple[int, float]]:
    """(step, affinity score on held-out text) for each checkpoint, in training order."""
    scores = []
    for step, folder in run_checkpoints(paths):
        trace = trace_corpus(load_moe(folder), "val", n_tokens)
        scores.append((step, affinity_score(transition_counts(trace.experts, trace.n_experts))))
    return scores


@dataclass
class PlacementReport:
    placements: dict[str, Placement]  # method -> placement solved on the held-in trace
    held_out: dict[str, float]  # method -> cross-GPU fraction on the held-out trace


def place_and_score(fit: RoutingTrace, score: RoutingTrace, n_gpus: int,
                    methods: tuple[str, ...] = ("round_robin", "staged", "ilp"),
                    time_limit_s: float = 60.0) -> PlacementReport:
    """Solve each method on the held-in ``fit`` trace; score every placement on the held-out ``score`` trace."""
    if (fit.n_layers, fit.n_experts) != (score.n_layers, score.n_experts):
        raise EffdlError("the held-in and held-out traces come from different models")
    fit_counts = transition_counts(fit.experts, fit.n_experts)
    score_counts = transition_counts(score.experts, score.n_experts)
    placements = {method: solve(fit_counts, n_gpus, method, time_limit_s, model=fit.model) for method in methods}
    held_out = {name: cross_gpu_fraction(score_counts, p.gpu_of) for name, p in placements.items()}
    return PlacementReport(placements, held_out)


def corpus_prompts(n_requests: int, prompt_len: int, split: str = "val") -> list[list[int]]:
    """``n_requests`` prompts of ``prompt_len`` bytes cut from evenly spaced places in the corpus split."""
    tokens = corpus_tokens(split)
    starts = torch.linspace(0, tokens.numel() - prompt_len - 1, n_requests).long()
    return [tokens[s:s + prompt_len].long().tolist() for s in starts]
