"""Weight-name maps between lmforge's model and HF / GGUF checkpoints.

lmforge's names are HF Llama's without the `model.` prefix, so the llama family maps by prefix. GPT-2
stores q/k/v fused in a Conv1D (weights transposed) and is split here. GGUF (llama.cpp) renames
everything and, for the `llama` architecture, permutes the rows of Q and K so that its interleaved
RoPE kernel matches HF's half-split one; `unpermute_qk` undoes that.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from lmforge.errors import UserError
from lmforge.models.config import ModelConfig, gpt2_config


def hf_to_lmforge(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    if cfg.arch == "gpt2":
        return _gpt2_from_hf(sd, cfg)
    out = {}
    for name, t in sd.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some older checkpoints saved
        out[name.removeprefix("model.")] = t
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def lmforge_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    if cfg.arch == "gpt2":
        return _gpt2_to_hf(sd, cfg)
    out = {}
    for name, t in sd.items():
        if name == "lm_head.weight":
            if not cfg.tie_embeddings:
                out[name] = t
            continue
        out["model." + name] = t
    return out


_GPT2_LAYER = {
    "ln_1": "input_layernorm",
    "ln_2": "post_attention_layernorm",
    "attn.c_proj": "self_attn.o_proj",
    "mlp.c_fc": "mlp.up_proj",
    "mlp.c_proj": "mlp.down_proj",
}


def _gpt2_from_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        name = name.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of old checkpoints
        if name == "wte.weight":
            out["embed_tokens.weight"] = t
        elif name == "wpe.weight":
            out["embed_positions.weight"] = t
        elif name.startswith("ln_f."):
            out["norm." + name[5:]] = t
        elif name == "lm_head.weight":
            if not cfg.tie_embeddings:
                out[name] = t
        elif m := re.fullmatch(r"h\.(\d+)\.(.+)\.(weight|bias)", name):
            i, mod, kind = m.groups()
            prefix = f"layers.{i}."
            if mod == "attn.c_attn":
                # Conv1D weight is (in, out): transpose to Linear's (out, in) before splitting q|k|v.
                parts = (t.t() if kind == "weight" else t).split(cfg.n_embd, dim=0)
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), parts, strict=True):
                    out[f"{prefix}self_attn.{proj}.{kind}"] = part.contiguous()
            elif mod in _GPT2_LAYER:
                is_conv = mod.endswith(("c_proj", "c_fc")) and kind == "weight"
                out[f"{prefix}{_GPT2_LAYER[mod]}.{kind}"] = t.t().contiguous() if is_conv else t
            else:
                raise UserError(f"unexpected tensor {name!r} in a GPT-2 checkpoint")
        else:
            raise UserError(f"unexpected tensor {name!r} in a GPT-2 checkpoint")
    return out


def _gpt2_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    inverse = {v: k for k, v in _GPT2_LAYER.items()}
    for name, t in sd.items():
        if name == "embed_tokens.weight":
            out["transformer.wte.weight"] = t
        elif name == "embed_positions.weight":
            out["transformer.wpe.weight"] = t
        elif name.startswith("norm."):
            out["transformer.ln_f." + name[5:]] = t
        elif name == "lm_head.weight":
            if not cfg.tie_embeddings:
                out[name] = t
        else:
            m = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", name)
            i, mod, kind = m.groups()
            prefix = f"transformer.h.{i}."
            if mod == "self_attn.q_proj":
                q, k, v = (sd[f"layers.{i}.self_attn.{p}.{kind}"] for p in ("q_proj", "k_proj", "v_proj"))
                fused = torch.cat([q, k, v], dim=0)
                out[f"{prefix}attn.c_attn.{kind}"] = fused.t().contiguous() if kind == "weight" else fused
            elif mod in ("self_attn.k_proj", "self_attn.v_proj"):
                continue
            else:
                hf_mod = inverse[mod]
                is_conv = hf_mod.endswith(("c_proj", "c_fc")) and kind == "weight"
                out[f"{prefix}{hf_mod}.{kind}"] = t.t().contiguous() if is_conv else t
    return out


# ---------------------------------------------------------------------------------------------- GGUF

_GGUF_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOP = {
    "token_embd": "embed_tokens",
    "position_embd": "embed_positions",
    "output_norm": "norm",
    "output": "lm_head",
}
GGUF_ARCHS = ("llama", "mistral", "qwen2", "gpt2")


def config_from_gguf(meta: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise UserError(f"unsupported GGUF architecture {arch!r}; lmforge imports {', '.join(GGUF_ARCHS)}")

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise UserError(f"GGUF metadata lacks {arch}.{name}")
        return value

    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
    n_embd, n_head = int(key("embedding_length")), int(key("attention.head_count"))
    tied = "output.weight" not in tensor_names
    common = dict(
        vocab_size=int(vocab),
        n_layer=int(key("block_count")),
        n_head=n_head,
        n_embd=n_embd,
        intermediate_size=int(key("feed_forward_length")),
        max_seq_len=int(key("context_length")),
        tie_embeddings=tied,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
    )
    if arch == "gpt2":
        return gpt2_config(norm_eps=float(key("attention.layer_norm_epsilon")), **common)
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    rope: dict[str, Any] = {}
    if scaling == "linear":
        rope = {"rope_type": "linear", "rope_factor": float(key("rope.scaling.factor"))}
    elif scaling not in ("none", None):
        raise UserError(f"GGUF rope scaling {scaling!r} is not supported (supported: none, linear)")
    has_qkv_bias = "blk.0.attn_q.bias" in tensor_names
    return ModelConfig(
        arch="qwen2" if arch == "qwen2" else "llama",
        n_kv_head=int(key("attention.head_count_kv", n_head)),
        head_dim=int(meta.get(f"{arch}.attention.key_length", n_embd // n_head)),
        norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        qkv_bias=has_qkv_bias,
        attn_out_bias="blk.0.attn_output.bias" in tensor_names,
        sliding_window=meta.get(f"{arch}.attention.sliding_window"),
        **rope,
        **common,
    )


def gguf_name(name: str) -> str:
    """llama.cpp tensor name -> lmforge parameter name (fused GPT-2 qkv keeps its GGUF name)."""
    stem, _, kind = name.rpartition(".")
    if stem in _GGUF_TOP:
        return f"{_GGUF_TOP[stem]}.{kind}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if m and m.group(2) in _GGUF_LAYER:
        return f"layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}.{kind}"
    if m and m.group(2) == "attn_qkv":
        return name
    raise UserError(f"unexpected tensor {name!r} in the GGUF file")


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's convert_hf_to_gguf `permute` of Q/K rows (weights or biases)."""
    # llama.cpp: reshape(n_head, 2, hd // 2).swapaxes(1, 2); the inverse reads the rows as (n_head, hd // 2, 2).
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_to_lmforge(
    gguf_arch: str, tensors: dict[str, torch.Tensor], cfg: ModelConfig
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        ours = gguf_name(name)
        if ours.endswith("attn_qkv.weight") or ours.endswith("attn_qkv.bias"):
            i = ours.split(".")[1]
            kind = ours.rsplit(".", 1)[1]
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), t.split(cfg.n_embd, dim=0), strict=True):
                out[f"layers.{i}.self_attn.{proj}.{kind}"] = part.contiguous()
            continue
        if gguf_arch in ("llama", "mistral") and ".self_attn.q_proj." in ours:
            t = unpermute_qk(t, cfg.n_head)
        elif gguf_arch in ("llama", "mistral") and ".self_attn.k_proj." in ours:
            t = unpermute_qk(t, cfg.n_kv_head)
        out[ours] = t
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out
