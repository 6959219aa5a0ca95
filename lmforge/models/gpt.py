"""The decoder-only Transformer: GPT-2, Llama, Mistral and Qwen2 as flags of one class.

References: nanoGPT `model.py` (structure, init), HF `modeling_llama.py` / `modeling_gpt2.py` (numerics),
vLLM (flattened tokens over a paged KV cache). Module names follow HF Llama's (without the `model.`
prefix) so that conversion from the llama family is a rename-free copy.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.errors import UserError
from lmforge.models.config import ModelConfig
from lmforge.models.kv_cache import CacheBatch, KVCache
from lmforge.models.layers import Block, Linear, make_norm, rope_cos_sin, rope_inv_freq


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        if config.pos_embedding == "learned":
            self.embed_positions = nn.Embedding(config.max_seq_len, config.n_embd)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # fp32 whatever the weights' dtype: positions up to 1e5+ need the mantissa.
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """nanoGPT/GPT-2 init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layer)."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p) if name.endswith("norm.weight") else nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layer), generator=generator)
            else:
                nn.init.normal_(p, 0.0, std, generator=generator)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        batch: CacheBatch | None = None,
        logits_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (float32).

        Without a cache: input_ids (B, T) -> logits (B, T, V), causal over each row.
        With a cache: input_ids (N,) — the new tokens of every sequence in `batch`, flattened — and their
        positions (N,); returns logits (N, V), or only the rows `logits_rows` (M, V) (e.g. each
        sequence's last token, which is all that sampling needs).
        """
        if cache is None:
            if positions is None:
                positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
        elif positions is None or batch is None:
            raise ValueError("a cached forward needs positions and a CacheBatch")
        if int(positions.max()) >= self.config.max_seq_len:
            raise ValueError(f"position {int(positions.max())} is past max_seq_len {self.config.max_seq_len}")
        x = self.embed_tokens(input_ids)  # (B, T, C) or (N, C)
        rope = None
        if self.config.pos_embedding == "learned":
            x = x + self.embed_positions(positions)
        else:
            rope = rope_cos_sin(self.inv_freq, positions, x.dtype)
        x = self.embed_dropout(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, None if cache is None else cache.layer(i, batch), batch)
        if logits_rows is not None:
            x = x[logits_rows]
        return self.lm_head(self.norm(x)).float()


def build_model(
    config: ModelConfig,
    state_dict: dict[str, torch.Tensor] | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> GPT:
    """A GPT on `device` in `dtype`: from `state_dict` (lmforge names, strict) or freshly initialised.

    With weights, the model is built on the meta device and the tensors are assigned, so memory holds
    one copy of the weights, not two.
    """
    device = torch.device(device)
    if state_dict is None:
        model = GPT(config)
        model.init_weights()
        return model.to(device=device, dtype=dtype)
    with torch.device("meta"):
        model = GPT(config)
    sd = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}
    if config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(
            f"checkpoint does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(config).to(device)
    return model.eval()
