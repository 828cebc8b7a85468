"""Hugging Face checkpoint adapter: local folder <-> ``Transformer``.

A checkpoint folder holds ``config.json`` and either ``model.safetensors`` or
``model.safetensors.index.json`` with its shards (Llama, Mistral, Qwen2,
Mixtral layouts). Loading never touches the network. Saving writes the same
layout, so ``transformers.AutoModelForCausalLM.from_pretrained`` reads ours.

The only model-specific knowledge is ``hf_key_map``: which HF tensors make up
each of our parameters (we fuse q/k/v and gate/up into single matmuls).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from effdl.core.config import ModelConfig
from effdl.core.transformer import Transformer, rope_inv_freq
from effdl.errors import EffdlError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 2**30


def hf_key_map(cfg: ModelConfig) -> dict[str, list[str]]:
    """For each of our parameter names, the HF tensor names it is built from, in concatenation order."""
    keys: dict[str, list[str]] = {"tok_embeddings.weight": ["model.embed_tokens.weight"]}
    for i in range(cfg.n_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        attn = hf + "self_attn."
        keys[ours + "attention.wqkv.weight"] = [attn + f"{p}_proj.weight" for p in "qkv"]
        if cfg.qkv_bias:
            keys[ours + "attention.wqkv.bias"] = [attn + f"{p}_proj.bias" for p in "qkv"]
        keys[ours + "attention.wo.weight"] = [attn + "o_proj.weight"]
        if cfg.is_moe:
            moe = hf + "block_sparse_moe."
            experts = range(cfg.n_experts)
            keys[ours + "feed_forward.gate.weight"] = [moe + "gate.weight"]
            keys[ours + "feed_forward.w13"] = [moe + f"experts.{e}.{w}.weight" for e in experts for w in ("w1", "w3")]
            keys[ours + "feed_forward.w2"] = [moe + f"experts.{e}.w2.weight" for e in experts]
        else:
            keys[ours + "feed_forward.w13.weight"] = [hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"]
            keys[ours + "feed_forward.w2.weight"] = [hf + "mlp.down_proj.weight"]
        keys[ours + "attention_norm.weight"] = [hf + "input_layernorm.weight"]
        keys[ours + "ffn_norm.weight"] = [hf + "post_attention_layernorm.weight"]
    keys["norm.weight"] = ["model.norm.weight"]
    keys["output.weight"] = ["model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"]
    return keys


def _fuse(name: str, parts: list[Tensor], cfg: ModelConfig) -> Tensor:
    """Combine HF tensors into our parameter ``name`` (inverse of ``_split``)."""
    if len(parts) == 1:
        return parts[0]
    if cfg.is_moe and name.endswith("feed_forward.w13"):
        pairs = zip(parts[0::2], parts[1::2], strict=True)
        return torch.stack([torch.cat(pair) for pair in pairs])  # (E, 2F, D)
    if cfg.is_moe and name.endswith("feed_forward.w2"):
        return torch.stack(parts)  # (E, D, F)
    return torch.cat(parts)  # q|k|v or gate|up along the output dim


def _split(name: str, tensor: Tensor, cfg: ModelConfig) -> list[Tensor]:
    """Our parameter ``name`` as the list of HF tensors ``hf_key_map`` names for it."""
    if name.endswith("wqkv.weight") or name.endswith("wqkv.bias"):
        hd = cfg.head_dim
        return list(tensor.split([cfg.n_heads * hd, cfg.n_kv_heads * hd, cfg.n_kv_heads * hd]))
    if name.endswith("feed_forward.w13.weight"):
        return list(tensor.chunk(2))
    if cfg.is_moe and name.endswith("feed_forward.w13"):
        return [half for expert in tensor for half in expert.chunk(2)]
    if cfg.is_moe and name.endswith("feed_forward.w2"):
        return list(tensor.unbind())
    return [tensor]


# --------------------------------------------------------------------------- loading


def model_folder(path: str | Path) -> Path:
    """``path`` if it holds a model (``config.json``) or does not exist (the loader then says so), else the
    newest ``checkpoint-*`` folder inside it that holds one: a training run's folder serves its last checkpoint."""
    path = Path(path)
    if not path.is_dir() or (path / "config.json").is_file():
        return path
    candidates = sorted(p for p in path.glob("checkpoint-*") if (p / "config.json").is_file())
    if not candidates:
        raise EffdlError(f"{path} holds neither a model (config.json) nor a checkpoint-* folder with one")
    return candidates[-1]


def load_config(path: str | Path) -> ModelConfig:
    """The ``ModelConfig`` of a checkpoint folder."""
    folder = _checkpoint_folder(path)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise EffdlError(f"checkpoint folder {folder} has no {CONFIG_FILE}")
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise EffdlError(f"{config_path} is not valid JSON: {e}") from None
    return ModelConfig.from_hf(hf)


def load_checkpoint(path: str | Path, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> Transformer:
    """Load an HF-format checkpoint folder into a ``Transformer`` (no network access).

    ``dtype`` defaults to the dtype the weights are stored in. Raises
    ``EffdlError`` naming the problem for a missing folder/file, an
    unsupported model type, a truncated file or weights that do not fit the config.
    """
    folder = _checkpoint_folder(path)
    cfg = load_config(folder)
    available = _tensor_files(folder)
    key_map = hf_key_map(cfg)

    needed = {k for parts in key_map.values() for k in parts}
    missing = sorted(needed - available.keys())
    if missing:
        raise EffdlError(f"checkpoint {folder} does not match its config: missing tensors {_few(missing)}")
    ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unexpected = sorted(k for k in available.keys() - needed - ignorable if not k.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise EffdlError(f"checkpoint {folder} does not match its config: unexpected tensors {_few(unexpected)}")

    with torch.device("meta"):
        model = Transformer(cfg)
    expected = model.state_dict()
    state: dict[str, Tensor] = {}
    with _open_all(folder, set(available.values())) as handles:
        for name, hf_names in key_map.items():
            parts = [handles[available[k]].get_tensor(k) for k in hf_names]
            tensor = _fuse(name, parts, cfg)
            if tensor.shape != expected[name].shape:
                raise EffdlError(
                    f"checkpoint {folder} does not match its config: {', '.join(hf_names[:3])} give "
                    f"{tuple(tensor.shape)} for {name}, the config implies {tuple(expected[name].shape)}"
                )
            state[name] = tensor.to(device=device, dtype=dtype or tensor.dtype)

    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.inv_freq = rope_inv_freq(cfg).to(device)
    return model.eval()


def _checkpoint_folder(path: str | Path) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise EffdlError(f"checkpoint folder {folder} does not exist")
    if not folder.is_dir():
        raise EffdlError(f"checkpoint path {folder} is not a folder (expected config.json + {WEIGHTS_FILE})")
    return folder


def _tensor_files(folder: Path) -> dict[str, str]:
    """Map each tensor name in the checkpoint to the safetensors file holding it."""
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise EffdlError(f"{index_path} is not a valid safetensors index: {e!r}") from None
        for file in set(weight_map.values()):
            if not (folder / file).is_file():
                raise EffdlError(f"shard {file} listed in {index_path} is missing")
        return weight_map
    single = folder / WEIGHTS_FILE
    if not single.is_file():
        found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise EffdlError(f"checkpoint folder {folder} has neither {WEIGHTS_FILE} nor {INDEX_FILE} (found: {found})")
    with _open_all(folder, {WEIGHTS_FILE}) as handles:
        return dict.fromkeys(handles[WEIGHTS_FILE].keys(), WEIGHTS_FILE)


@contextmanager
def _open_all(folder: Path, files: set[str]) -> Iterator[dict[str, Any]]:
    """Open several safetensors files at once; a corrupt or truncated file becomes an EffdlError."""
    with ExitStack() as stack:
        handles = {}
        for file in sorted(files):
            try:
                handles[file] = stack.enter_context(safe_open(str(folder / file), framework="pt"))
            except (SafetensorError, OSError) as e:
                raise EffdlError(f"cannot read {folder / file} (truncated or not safetensors?): {e}") from None
        yield handles


def _few(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


# --------------------------------------------------------------------------- saving


def hf_state_dict(model: Transformer) -> Iterator[tuple[str, Tensor]]:
    """The model's weights under HF names, one tensor at a time."""
    cfg = model.config
    params = model.state_dict()
    for name, hf_names in hf_key_map(cfg).items():
        if name == "output.weight" and cfg.tie_embeddings:
            continue  # HF tied checkpoints store the embedding once
        yield from zip(hf_names, _split(name, params[name], cfg), strict=True)


def save_checkpoint(model: Transformer, path: str | Path, tokenizer: Any = None,
                    max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write ``config.json``, safetensors weights (sharded above ``max_shard_bytes``) and, if given, the tokenizer."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    dtype = next(model.parameters()).dtype
    hf_config = {**cfg.to_hf(), "dtype": str(dtype).removeprefix("torch.")}
    (folder / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id}, indent=2) + "\n"
    )

    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in hf_state_dict(model):
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().to("cpu").contiguous()
        size += nbytes
    for stale in (folder / WEIGHTS_FILE, folder / INDEX_FILE, *folder.glob("model-*-of-*.safetensors")):
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(folder)
    return folder
