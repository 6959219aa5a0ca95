"""Sequence classification: a decoder's final hidden states, pooled per row, through a linear `score` head.

The layout is transformers' *ForSequenceClassification (LlamaForSequenceClassification,
GPT2ForSequenceClassification, ...): the decoder (its lm_head dropped) and a bias-free `score` Linear
(num_labels, n_embd). `hf_config()` adds `id2label` / `label2id` / `num_labels` / `pad_token_id` to the decoder's
config.json and `hf_weights()` names the tensors as transformers does, so a saved folder loads in
AutoModelForSequenceClassification unchanged; `from_hf` reads such a folder back, ours or transformers'.

Pooling (`pooling`): "last" takes each row's last real token (transformers' rule: the last token that is not
padding; rows here are right-padded with known lengths, so position length - 1), "mean" averages the real
tokens. transformers implements only last-token pooling: a mean-pooled folder loads there but pools
differently. config.json records the pooling under "pooling", which lmforge honours.

References: HF `modeling_llama.py` LlamaForSequenceClassification (head, pooling), `modeling_gpt2.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lmforge.errors import UserError
from lmforge.models.config import ModelConfig, config_to_hf
from lmforge.models.convert import hf_to_lmforge, lmforge_to_hf
from lmforge.models.gpt import GPT
from lmforge.models.layers import rope_inv_freq

POOLINGS = ("last", "mean")
HEAD = "score.weight"  # the head's name in transformers' checkpoints, and in ours
DECODER = "model."  # our state_dict prefix of the decoder's tensors (transformers' for the llama family)
HF_CLASSIFIERS = {
    "llama": "LlamaForSequenceClassification",
    "mistral": "MistralForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
    "gpt2": "GPT2ForSequenceClassification",
}


def pool(hidden: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per row of right-padded hidden states (B, T, C) whose real tokens are the first `lengths`
    (B,): the last real token's state, or the mean over the real tokens. -> (B, C)"""
    if pooling == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
    real = torch.arange(hidden.shape[1], device=hidden.device) < lengths[:, None]  # (B, T)
    return (hidden * real[..., None]).sum(1) / lengths[:, None].to(hidden.dtype)


class SequenceClassifier(nn.Module):
    """A decoder-only model with a classification head: input ids (B, T) -> logits (B, num_labels)."""

    def __init__(
        self,
        decoder: GPT,
        labels: Sequence[str],
        *,
        pooling: str = "last",
        pad_token_id: int | None = None,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise UserError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if not labels or len(set(labels)) != len(labels):
            raise UserError(f"a classifier needs distinct labels, got {list(labels)}")
        # Without its LM head the decoder's forward returns the final (normed) hidden states, in float32; the
        # (V, C) head's matmul, the largest in a small model, is not computed at all.
        decoder.lm_head = nn.Identity()
        self.model = decoder
        self.labels = tuple(labels)
        self.pooling = pooling
        self.pad_token_id = pad_token_id
        w = decoder.embed_tokens.weight
        self.score = nn.Linear(decoder.config.n_embd, len(labels), bias=False, device=w.device, dtype=w.dtype)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def init_head(self, generator: torch.Generator | None = None) -> None:
        """transformers' init of `score`: N(0, initializer_range)."""
        with torch.no_grad():
            nn.init.normal_(self.score.weight, 0.0, self.config.initializer_range, generator=generator)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, num_labels), float32. input_ids (B, T) right-padded; lengths (B,) = real tokens per row
        (None: every row is T long). Causal attention keeps the padding out of the real tokens' states."""
        if lengths is None:
            lengths = torch.full((input_ids.shape[0],), input_ids.shape[1], device=input_ids.device)
        if int(lengths.min()) < 1:
            raise ValueError("every row needs at least one token")
        hidden = self.model(input_ids)  # (B, T, C)
        pooled = pool(hidden, lengths, self.pooling)  # (B, C)
        return self.score(pooled.to(self.score.weight.dtype)).float()

    def hf_config(self) -> dict[str, Any]:
        """transformers' config.json of this classifier: the decoder's plus the head's fields."""
        cfg = self.config
        if cfg.arch not in HF_CLASSIFIERS:
            raise UserError(f"no transformers classifier class for architecture {cfg.arch!r}")
        return config_to_hf(cfg) | {
            "architectures": [HF_CLASSIFIERS[cfg.arch]],
            "num_labels": self.num_labels,
            "id2label": {str(i): label for i, label in enumerate(self.labels)},
            "label2id": {label: i for i, label in enumerate(self.labels)},
            "pad_token_id": self.pad_token_id,
            "problem_type": "single_label_classification",
            "pooling": self.pooling,
        }


def hf_weights(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A SequenceClassifier's state_dict (decoder under `model.`, `score.weight`) under transformers' names."""
    decoder = {k.removeprefix(DECODER): v for k, v in state_dict.items() if k.startswith(DECODER)}
    others = set(state_dict) - {HEAD} - {DECODER + k for k in decoder}
    if HEAD not in state_dict or others:
        raise ValueError(
            f"not a SequenceClassifier state_dict (head missing or extra tensors {sorted(others)[:3]})"
        )
    return lmforge_to_hf(decoder, cfg) | {HEAD: state_dict[HEAD]}


def is_classifier_config(hf: dict[str, Any]) -> bool:
    """Whether an HF config.json describes a sequence classifier (ours or transformers')."""
    return any(str(a).endswith("ForSequenceClassification") for a in hf.get("architectures") or ())


def labels_from_hf(hf: dict[str, Any]) -> list[str]:
    """The label names in id order, from `id2label` (transformers' LABEL_i names when it is absent)."""
    id2label = hf.get("id2label")
    if isinstance(id2label, dict) and id2label:
        try:
            ids = sorted((int(k), str(v)) for k, v in id2label.items())
        except ValueError:
            raise UserError(f"config.json id2label keys must be integers, got {list(id2label)[:3]}") from None
        if [i for i, _ in ids] != list(range(len(ids))):
            raise UserError(f"config.json id2label must number the labels 0..{len(ids) - 1}")
        return [label for _, label in ids]
    n = hf.get("num_labels")
    if not isinstance(n, int) or n < 1:
        raise UserError("config.json of a classifier has neither id2label nor num_labels")
    return [f"LABEL_{i}" for i in range(n)]


def from_hf(
    hf: dict[str, Any],
    hf_state_dict: dict[str, torch.Tensor],
    cfg: ModelConfig,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SequenceClassifier:
    """A SequenceClassifier from a classifier folder's config.json and tensors (transformers' names). Built on
    the meta device and assigned, so memory holds one copy of the weights."""
    device = torch.device(device)
    sd = dict(hf_state_dict)
    head = sd.pop(HEAD, None)
    labels = labels_from_hf(hf)
    if head is None or tuple(head.shape) != (len(labels), cfg.n_embd):
        shape = None if head is None else tuple(head.shape)
        raise UserError(f"classifier weights need {HEAD} of shape {(len(labels), cfg.n_embd)}, found {shape}")
    decoder_sd = {k: v.to(device=device, dtype=dtype) for k, v in hf_to_lmforge(sd, cfg).items()}
    decoder_sd.pop("lm_head.weight", None)
    with torch.device("meta"):
        decoder = GPT(cfg)
    decoder.lm_head = nn.Identity()
    missing, unexpected = decoder.load_state_dict(decoder_sd, strict=False, assign=True)
    if missing or unexpected:
        raise UserError(
            f"classifier checkpoint does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    decoder.inv_freq = rope_inv_freq(cfg).to(device)
    pad = hf.get("pad_token_id")
    model = SequenceClassifier(
        decoder,
        labels,
        pooling=hf.get("pooling", "last"),
        pad_token_id=pad if isinstance(pad, int) else None,
    )
    model.score.weight = nn.Parameter(head.to(device=device, dtype=dtype))
    return model.eval()
