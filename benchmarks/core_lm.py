"""effdl's Transformer vs transformers' LlamaForCausalLM: same config, same weights, same machine, same run.

Measures training-step tokens/s (forward + backward + AdamW) and greedy-decode
tokens/s at batch 1 and 8, and checks that both produce the same greedy tokens.

    python benchmarks/core_lm.py [--dim 256 --layers 4 --seq-len 256 --batch 8 --new-tokens 64]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import torch.nn.functional as F
from harness import RESULTS, report, time_interleaved
from transformers import LlamaForCausalLM

from effdl.core.config import ModelConfig
from effdl.core.generate import generate_batch
from effdl.core.hf import load_checkpoint, save_checkpoint
from effdl.core.transformer import Transformer
from effdl.report import bar_plot


def train_step_fn(model, tokens, logits_of):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        logits = logits_of(model, tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=8, n_kv_heads=4, ffn_dim=int(args.dim * 8 / 3),
                      max_seq_len=2048, eos_id=None)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        model = Transformer(cfg)
        model.reset_parameters(std=0.1)  # wider than training init so greedy picks are not near-ties
        save_checkpoint(model, folder)
        ours = load_checkpoint(folder, device=device)
        theirs = LlamaForCausalLM.from_pretrained(folder, attn_implementation="sdpa").to(device)

    rows, series = [], {"effdl": [], "transformers": []}
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), device=device)
    step_tokens = args.batch * args.seq_len
    ours.train(), theirs.train()
    t = time_interleaved({"ours": train_step_fn(ours, tokens, lambda m, x: m(x)),
                          "hf": train_step_fn(theirs, tokens, lambda m, x: m(x).logits)}, repeat=args.repeat)
    rows.append(_row(f"train step {args.batch}x{args.seq_len}", step_tokens, t["ours"], t["hf"]))
    ours.eval(), theirs.eval()

    n = args.new_tokens

    def decode_ours(prompts):
        return generate_batch(ours, prompts.tolist(), n)

    def decode_hf(prompts):
        out = theirs.generate(prompts, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return out[:, args.prompt_len:].tolist()

    for batch in (1, 8):
        prompts = torch.randint(0, 256, (batch, args.prompt_len), device=device)
        same = decode_ours(prompts) == decode_hf(prompts)
        t = time_interleaved({"ours": lambda p=prompts: decode_ours(p), "hf": lambda p=prompts: decode_hf(p)},
                             warmup=1, repeat=args.repeat)
        rows.append(_row(f"greedy decode batch {batch} (same tokens: {same})", batch * n, t["ours"], t["hf"]))

    for row in rows:
        series["effdl"].append(row[1])
        series["transformers"].append(row[2])
    title = f"effdl vs transformers Llama, dim {args.dim}, {args.layers} layers, {device}"
    report("core_lm", title, ["measurement", "effdl tok/s", "transformers tok/s", "ratio", "spread ours/theirs"],
           rows, extra={"args": vars(args)})
    bar_plot(RESULTS / "core_lm.png", [r[0].split(" (")[0] for r in rows], series, title=title, ylabel="tokens/s")


def _row(name, n_tokens, t_ours, t_hf):
    ours, theirs = n_tokens / t_ours.median_s, n_tokens / t_hf.median_s
    return (name, ours, theirs, f"{ours / theirs:.2f}x", f"{t_ours.spread:.0%}/{t_hf.spread:.0%}")


if __name__ == "__main__":
    main()
