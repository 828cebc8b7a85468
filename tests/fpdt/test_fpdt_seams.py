"""FPDT drives the core Transformer through its seams only: no copy of the block, the RoPE or the forward loop."""

import ast
from pathlib import Path

import effdl.fpdt

# What the seams (embed, rope, Block.qkv / attention_residual / ffn_residual, head) hide.
INTERNALS = {"wqkv", "wo", "attention_norm", "ffn_norm", "feed_forward", "tok_embeddings", "norm", "output",
             "inv_freq", "rope_cos_sin", "apply_rope", "rope_inv_freq"}


def test_fpdt_touches_no_model_internals():
    for path in sorted(Path(effdl.fpdt.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        used |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
        assert not used & INTERNALS, f"{path.name} uses {sorted(used & INTERNALS)}"
