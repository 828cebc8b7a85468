"""ModelConfig: one dataclass for every decoder-only model effdl runs.

A config describes a Llama-family decoder (Llama, Mistral, Qwen2) or its
Mixtral-style MoE variant (``n_experts > 0``). Named presets cover tests
(``tiny``), demos (``small``), real sizes for planning (``llama-125m`` ...
``llama-8b``) and MoE (``moe-tiny``, ``mixtral-8x7b``). ``from_hf`` / ``to_hf``
translate to and from a Hugging Face ``config.json`` dict.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from effdl.errors import EffdlError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "mixtral")
SUPPORTED_ROPE_SCALING = ("default", "linear", "llama3")

# Byte-level tokenizer: 256 byte ids, then <|bos|> and <|eos|>.
BYTE_VOCAB_SIZE = 258


@dataclass
class ModelConfig:
    vocab_size: int = BYTE_VOCAB_SIZE
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    ffn_dim: int = 688
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    head_dim: int = 0  # 0 = dim // n_heads, as in Llama; Mistral/Qwen checkpoints may set it explicitly
    n_experts: int = 0  # 0 = dense SwiGLU FFN; > 0 = Mixtral-style MoE FFN in every layer
    experts_per_token: int = 2
    norm_topk_prob: bool = True  # Mixtral renormalises the k gate weights; GPT-MoE/Switch top-1 must not (see moe.py)
    router_aux_coef: float = 0.01  # load-balancing loss weight in training (HF router_aux_loss_coef)
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 has biases on q/k/v projections
    sliding_window: int | None = None  # Mistral: each query sees at most this many keys
    rope_scaling: dict[str, Any] | None = None
    bos_id: int | None = 256
    eos_id: int | None = 257
    model_type: str = "llama"
    # HF config keys we do not model but must not lose on a load/save round trip.
    extra_hf: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise EffdlError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise EffdlError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise EffdlError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.n_experts and not 1 <= self.experts_per_token <= self.n_experts:
            raise EffdlError(f"experts_per_token must be in [1, {self.n_experts}], got {self.experts_per_token}")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise EffdlError(
                f"unsupported model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_SCALING:
            raise EffdlError(
                f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_SCALING)}"
            )

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count computed from the config alone (no model built)."""
        d, hd = self.dim, self.head_dim
        attn = d * hd * (self.n_heads + 2 * self.n_kv_heads) + self.n_heads * hd * d
        if self.qkv_bias:
            attn += hd * (self.n_heads + 2 * self.n_kv_heads)
        ffn = 3 * d * self.ffn_dim
        if self.is_moe:
            ffn = self.n_experts * ffn + d * self.n_experts
        layer = attn + ffn + 2 * d
        total = self.n_layers * layer + d
        if include_embeddings:
            total += self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return total

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (derived fields are re-derived)."""
        if "dim" in changes or "n_heads" in changes:
            changes.setdefault("head_dim", 0)
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise EffdlError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return cls(**copy.deepcopy({**PRESETS[name], **overrides}))

    # ----------------------------------------------------------------- HF config.json

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict (Llama, Mistral, Qwen2, Mixtral)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise EffdlError(
                f"unsupported model_type {model_type!r} in config.json; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            n_heads = hf["num_attention_heads"]
            rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
            rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
            rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"} or None
            if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
                rope_scaling = None
            uses_window = model_type == "mistral" or hf.get("use_sliding_window", False)
            cfg = cls(
                model_type=model_type,
                vocab_size=hf["vocab_size"],
                dim=hf["hidden_size"],
                n_layers=hf["num_hidden_layers"],
                n_heads=n_heads,
                n_kv_heads=hf.get("num_key_value_heads") or n_heads,
                ffn_dim=hf["intermediate_size"],
                max_seq_len=hf.get("max_position_embeddings", 2048),
                rope_theta=float(rope_theta),
                norm_eps=hf.get("rms_norm_eps", 1e-6),
                head_dim=hf.get("head_dim") or 0,
                n_experts=hf.get("num_local_experts", 0) if model_type == "mixtral" else 0,
                experts_per_token=hf.get("num_experts_per_tok", 2),
                norm_topk_prob=hf.get("norm_topk_prob", True),
                router_aux_coef=hf.get("router_aux_loss_coef", cls.router_aux_coef),
                tie_embeddings=hf.get("tie_word_embeddings", False),
                qkv_bias=model_type == "qwen2" or hf.get("attention_bias", False),
                sliding_window=hf.get("sliding_window") if uses_window else None,
                rope_scaling=rope_scaling,
                bos_id=_first(hf.get("bos_token_id")),
                eos_id=_first(hf.get("eos_token_id")),
                extra_hf={k: v for k, v in hf.items() if k not in _HF_KEYS_WE_MAP},
            )
        except KeyError as e:
            raise EffdlError(f"config.json of a {model_type} model lacks the required key {e.args[0]!r}") from None
        if hf.get("mlp_bias") or (model_type == "llama" and hf.get("attention_bias")):
            raise EffdlError("checkpoints with mlp_bias or Llama attention_bias are not supported")
        return cfg

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` dict that ``transformers`` loads as the same model."""
        arch = {
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
            "mixtral": "MixtralForCausalLM",
        }[self.model_type]
        hf: dict[str, Any] = {
            **self.extra_hf,
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_seq_len,
            "rope_theta": self.rope_theta,
            "rope_scaling": copy.deepcopy(self.rope_scaling),  # callers (transformers) mutate it
            "rms_norm_eps": self.norm_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_id,
        }
        if self.model_type == "llama":
            hf.update(attention_bias=False, mlp_bias=False)
        if self.model_type in ("mistral", "mixtral", "qwen2"):
            hf["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            hf["use_sliding_window"] = self.sliding_window is not None
        if self.model_type == "mixtral":
            # transformers' Mixtral ignores norm_topk_prob (it always renormalises), so GPT-MoE presets
            # (norm_topk_prob=False) compute as trained only through effdl's own loader.
            hf.update(num_local_experts=self.n_experts, num_experts_per_tok=self.experts_per_token,
                      norm_topk_prob=self.norm_topk_prob, router_aux_loss_coef=self.router_aux_coef)
        return hf


def _first(token_id: int | list[int] | None) -> int | None:
    """HF allows a list of eos ids; we stop on the first."""
    return token_id[0] if isinstance(token_id, list) else token_id


_HF_KEYS_WE_MAP = {
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta",
    "rope_scaling", "rope_parameters", "rms_norm_eps", "tie_word_embeddings", "hidden_act", "bos_token_id",
    "eos_token_id", "attention_bias", "mlp_bias", "sliding_window", "use_sliding_window", "num_local_experts",
    "num_experts_per_tok", "norm_topk_prob", "router_aux_loss_coef",
    "torch_dtype", "dtype", "transformers_version", "max_window_layers",
}

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

PRESETS: dict[str, dict[str, Any]] = {
    # ~1.5M params: unit tests and smoke runs.
    "tiny": dict(dim=128, n_layers=6, n_heads=4, n_kv_heads=2, ffn_dim=512, max_seq_len=1024),
    # ~24M params: demos and short training runs on a CPU.
    "small": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1408, max_seq_len=2048),
    # GPT-3-small-sized Llama with a 32K BPE vocabulary.
    "llama-125m": dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048,
                       max_seq_len=2048, bos_id=1, eos_id=2),
    # Llama 3.2 1B and Llama 3.1 8B shapes, for planning and GPU runs.
    "llama-1b": dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                     max_seq_len=131072, rope_theta=500000.0, tie_embeddings=True, rope_scaling=_LLAMA3_ROPE,
                     bos_id=128000, eos_id=128001),
    "llama-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                     max_seq_len=131072, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
                     bos_id=128000, eos_id=128001),
    # ~4M params, 8 experts top-2: MoE tests and ExFlow demos.
    "moe-tiny": dict(model_type="mixtral", dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=256,
                     n_experts=8, experts_per_token=2, max_seq_len=1024),
    # GPT-MoE (DeepSpeed-MoE / Switch style, as ExFlow studies): top-1 routing on softmax-over-all weights,
    # 8 to 64 small experts in each of 6 layers; "-top2" variants route to two.
    **{f"gpt-moe-{e}e": dict(model_type="mixtral", dim=128, n_layers=6, n_heads=4, n_kv_heads=2, ffn_dim=128,
                             n_experts=e, experts_per_token=1, norm_topk_prob=False, router_aux_coef=0.05,
                             max_seq_len=1024)
       for e in (8, 16, 32, 64)},
    "gpt-moe-16e-top2": dict(model_type="mixtral", dim=128, n_layers=6, n_heads=4, n_kv_heads=2, ffn_dim=128,
                             n_experts=16, experts_per_token=2, norm_topk_prob=False, router_aux_coef=0.05,
                             max_seq_len=1024),
    "mixtral-8x7b": dict(model_type="mixtral", vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                         ffn_dim=14336, n_experts=8, experts_per_token=2, max_seq_len=32768,
                         rope_theta=1e6, bos_id=1, eos_id=2),
}
