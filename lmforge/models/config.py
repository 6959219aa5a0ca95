"""One frozen ModelConfig for the decoder-only family, and its mapping to/from HF `config.json`.

Families are flags, not classes: GPT-2 is (learned positions, LayerNorm, GELU MLP, biases everywhere);
Llama/Mistral are (RoPE, RMSNorm, SwiGLU, optional GQA); Qwen2 is Llama plus biases on q/k/v.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lmforge.errors import UserError

ARCHS = ("llama", "mistral", "qwen2", "gpt2")
HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "llama"
    vocab_size: int = 32000
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None = n_head (multi-head); fewer = grouped-query attention
    n_embd: int = 768
    intermediate_size: int | None = None  # None = 4 * n_embd (GELU MLP) or Llama's 8/3 rule rounded to 256
    head_dim: int | None = None  # None = n_embd // n_head
    max_seq_len: int = 2048
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    norm_eps: float = 1e-5
    mlp: str = "swiglu"  # "swiglu" (gate/up/down) | "gelu" (up/down)
    activation: str = "silu"
    pos_embedding: str = "rope"  # "rope" | "learned"
    rope_theta: float = 10000.0
    rope_type: str = "default"  # "default" | "linear" | "llama3"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 scaling only
    rope_high_freq_factor: float = 4.0  # llama3 scaling only
    rope_original_max_seq_len: int = 8192  # llama3 scaling only
    qkv_bias: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False
    norm_bias: bool = False  # LayerNorm has a bias, RMSNorm does not
    tie_embeddings: bool = False
    sliding_window: int | None = None
    dropout: float = 0.0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise UserError(f"unknown architecture {self.arch!r}; lmforge supports {', '.join(ARCHS)}")
        if self.n_kv_head is None:
            object.__setattr__(self, "n_kv_head", self.n_head)
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise UserError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
            object.__setattr__(self, "head_dim", self.n_embd // self.n_head)
        if self.intermediate_size is None:
            if self.mlp == "gelu":
                size = 4 * self.n_embd
            else:
                size = 256 * ((int(8 * self.n_embd / 3) + 255) // 256)
            object.__setattr__(self, "intermediate_size", size)
        if self.n_head % self.n_kv_head:
            raise UserError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.norm not in ("rmsnorm", "layernorm"):
            raise UserError(f"norm must be 'rmsnorm' or 'layernorm', got {self.norm!r}")
        if self.mlp not in ("swiglu", "gelu"):
            raise UserError(f"mlp must be 'swiglu' or 'gelu', got {self.mlp!r}")
        if self.activation not in ACTIVATIONS:
            raise UserError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.pos_embedding not in ("rope", "learned"):
            raise UserError(f"pos_embedding must be 'rope' or 'learned', got {self.pos_embedding!r}")
        if self.rope_type not in ROPE_TYPES:
            raise UserError(
                f"rope scaling {self.rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
            )
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def n_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        c, h, kv = self.n_embd, self.head_dim, self.n_kv_head
        attn = c * h * (self.n_head + 2 * kv) + self.n_head * h * c
        attn += (self.n_head + 2 * kv) * h if self.qkv_bias else 0
        attn += c if self.attn_out_bias else 0
        n_mats = 3 if self.mlp == "swiglu" else 2
        mlp = n_mats * c * self.intermediate_size
        mlp += (self.intermediate_size * (n_mats - 1) + c) if self.mlp_bias else 0
        norms = 2 * c * (2 if self.norm_bias else 1)
        emb = self.vocab_size * c * (1 if self.tie_embeddings else 2)
        emb += self.max_seq_len * c if self.pos_embedding == "learned" else 0
        return self.n_layer * (attn + mlp + norms) + emb + c * (2 if self.norm_bias else 1)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def gpt2_config(**kw: Any) -> ModelConfig:
    """The GPT-2 family's flags; keyword arguments override sizes."""
    flags = dict(
        arch="gpt2",
        norm="layernorm",
        norm_bias=True,
        mlp="gelu",
        activation="gelu_new",
        pos_embedding="learned",
        qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        tie_embeddings=True,
    )
    return ModelConfig(**{**flags, **kw})


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Build a ModelConfig from an HF `config.json` dict (Llama, Mistral, Qwen2, GPT-2)."""
    try:
        return _config_from_hf(hf)
    except KeyError as e:
        raise UserError(
            f"config.json lacks {e.args[0]!r}, which a {hf.get('model_type')} model needs"
        ) from None


def _config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        return gpt2_config(
            vocab_size=hf["vocab_size"],
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
            intermediate_size=hf.get("n_inner") or 4 * hf["n_embd"],
            max_seq_len=hf.get("n_positions", 1024),
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            activation=_hf_act(hf.get("activation_function", "gelu_new")),
            tie_embeddings=hf.get("tie_word_embeddings", True),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )
    if model_type not in ("llama", "mistral", "qwen2"):
        raise UserError(
            f"unsupported model_type {model_type!r} in config.json; lmforge loads llama, mistral, qwen2 and gpt2"
        )
    rope = _rope_from_hf(hf)
    sliding = hf.get("sliding_window")
    if model_type == "qwen2" and not hf.get("use_sliding_window", False):
        sliding = None
    return ModelConfig(
        arch=model_type,
        vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"],
        n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        n_embd=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        head_dim=hf.get("head_dim"),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp="swiglu",
        activation=_hf_act(hf.get("hidden_act", "silu")),
        pos_embedding="rope",
        qkv_bias=True if model_type == "qwen2" else bool(hf.get("attention_bias", False)),
        attn_out_bias=False if model_type == "qwen2" else bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=sliding,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        **rope,
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The HF `config.json` dict that transformers, vLLM and llama.cpp's converter read."""
    common = {
        "architectures": [HF_ARCHITECTURES[cfg.arch]],
        "model_type": cfg.arch,
        "vocab_size": cfg.vocab_size,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.initializer_range,
        "torch_dtype": "float32",
    }
    if cfg.arch == "gpt2":
        return {
            **common,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_embd": cfg.n_embd,
            "n_inner": cfg.intermediate_size,
            "n_positions": cfg.max_seq_len,
            "n_ctx": cfg.max_seq_len,
            "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": cfg.activation,
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout,
        }
    out = {
        **common,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": cfg.activation,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": _rope_to_hf(cfg),
        "attention_dropout": cfg.dropout,
    }
    if cfg.arch == "llama":
        out["attention_bias"] = cfg.qkv_bias
        out["mlp_bias"] = cfg.mlp_bias
    if cfg.arch in ("mistral", "qwen2"):
        out["sliding_window"] = cfg.sliding_window
    if cfg.arch == "qwen2":
        out["use_sliding_window"] = cfg.sliding_window is not None
    return out


def _hf_act(name: str) -> str:
    if name not in ACTIVATIONS:
        raise UserError(
            f"unsupported activation {name!r} in config.json (supported: {', '.join(ACTIVATIONS)})"
        )
    return name


def _rope_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    # transformers 5 writes `rope_parameters`; older configs write `rope_theta` + `rope_scaling`.
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UserError(f"rope scaling {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    out: dict[str, Any] = {"rope_theta": float(theta), "rope_type": rope_type}
    if rope_type != "default":
        out["rope_factor"] = float(merged["factor"])
    if rope_type == "llama3":
        out["rope_low_freq_factor"] = float(merged["low_freq_factor"])
        out["rope_high_freq_factor"] = float(merged["high_freq_factor"])
        out["rope_original_max_seq_len"] = int(merged["original_max_position_embeddings"])
    return out


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any] | None:
    if cfg.rope_type == "default":
        return None
    out: dict[str, Any] = {"rope_type": cfg.rope_type, "factor": cfg.rope_factor}
    if cfg.rope_type == "llama3":
        out |= {
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_seq_len,
        }
    return out
