"""LoRA: low-rank adapters on the model's Linear projections, saved and loaded in PEFT's layout.

A targeted projection W (out, in) becomes W x + B A drop(x) * alpha / r with A (r, in), B (out, r): B starts
at zero, so an adapted model first computes exactly what its base does, and only A and B train.

References: Hu et al. 2021 "LoRA"; HF PEFT `tuners/lora/layer.py` (init, module and weight names,
`adapter_config.json` / `adapter_model.safetensors`), PEFT `check_target_module_exists` (target matching).
Adapters save and load for the llama family (llama, mistral, qwen2), whose HF module names are ours with a
`model.` prefix; GPT-2's fused, transposed c_attn has no per-projection HF name to save under.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge import atomic
from lmforge.errors import UserError
from lmforge.models.gpt import GPT
from lmforge.models.layers import Linear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> its LoraModel -> the HF *ForCausalLM
_REGEX_CHARS = set("\\^$*+?{}[]|()")
_SAVABLE_ARCHS = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class LoraConfig:
    """target_modules follow PEFT: a plain name ("q_proj", or a dotted suffix "self_attn.q_proj") matches a
    module whose name ends with it; a string with regex metacharacters must match a whole module name. Names
    are tried both as ours ("layers.0.self_attn.q_proj") and as HF's ("model.layers.0.self_attn.q_proj")."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self):
        targets = (
            (self.target_modules,) if isinstance(self.target_modules, str) else tuple(self.target_modules)
        )
        object.__setattr__(self, "target_modules", targets)
        if not isinstance(self.r, int) or self.r <= 0:
            raise UserError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if self.alpha <= 0:
            raise UserError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise UserError(f"LoRA target_modules must be non-empty names or patterns, got {targets!r}")
        for t in targets:
            if _is_regex(t):
                try:
                    re.compile(t)
                except re.error as e:
                    raise UserError(f"LoRA target pattern {t!r} is not a valid regex ({e})") from None

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoraLinear(nn.Module):
    """A frozen base Linear plus a trainable low-rank update: base(x) + B(A(drop(x))) * alpha / r.

    Submodule names are PEFT's (`base_layer`, `lora_A`, `lora_B`) less its per-adapter ModuleDicts, so our
    parameter names are PEFT's saved names. Init is PEFT's default: A Kaiming-uniform, B zero.
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float, generator=None):
        super().__init__()
        self.base_layer = base_layer
        self.r, self.scaling = r, alpha / r
        w = base_layer.weight
        self.lora_A = Linear(base_layer.in_features, r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = Linear(r, base_layer.out_features, bias=False, device=w.device, dtype=w.dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_B.weight)
        self.train(base_layer.training)  # an eval-mode model stays in eval mode (dropout off)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """W + B @ A * scaling, computed in fp32 and returned in the base weight's dtype."""
        w = self.base_layer.weight
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()  # (out, r) @ (r, in)
        return (w.float() + delta * self.scaling).to(w.dtype)


def _is_regex(target: str) -> bool:
    return any(c in _REGEX_CHARS for c in target)


def _hf_name(model: GPT, name: str) -> str:
    """Our module name -> its name inside the HF *ForCausalLM (llama family)."""
    if model.config.arch not in _SAVABLE_ARCHS:
        raise UserError(
            f"LoRA adapters save and load for {', '.join(_SAVABLE_ARCHS)} models, not {model.config.arch!r}"
        )
    return name if name == "lm_head" else "model." + name


def _matches(target: str, names: tuple[str, ...]) -> bool:
    if _is_regex(target):
        return any(re.fullmatch(target, n) for n in names)
    return any(n == target or n.endswith("." + target) for n in names)


def _targets(model: GPT, cfg: LoraConfig) -> list[tuple[str, nn.Linear]]:
    """The (name, Linear) pairs that cfg adapts; UserError when none match or a tied head would."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or ".lora_" in name or name.endswith(".base_layer"):
            continue
        names = (name, name if name == "lm_head" else "model." + name)
        if any(_matches(t, names) for t in cfg.target_modules):
            found.append((name, module))
    if not found:
        raise UserError(f"LoRA target_modules {list(cfg.target_modules)} match no Linear layer of the model")
    if model.config.tie_embeddings and any(name == "lm_head" for name, _ in found):
        raise UserError(
            "LoRA cannot adapt lm_head of a model with tied embeddings (it would change them too)"
        )
    return found


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def apply_lora(model: GPT, cfg: LoraConfig, generator: torch.Generator | None = None) -> GPT:
    """Wrap every targeted Linear in a LoraLinear, in place, and freeze every base parameter."""
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise UserError("the model already has LoRA adapters; merge_lora it before applying new ones")
    targets = _targets(model, cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in targets:
        _swap(model, name, LoraLinear(module, cfg.r, cfg.alpha, cfg.dropout, generator))
    return model


@torch.no_grad()
def merge_lora(model: GPT) -> GPT:
    """Fold each adapter into its base weight (W += B @ A * scaling) and put the plain Linear back.

    Base parameters stay frozen as apply_lora left them.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLinear):
            module.base_layer.weight.copy_(module.merged_weight())
            _swap(model, name, module.base_layer)
    return model


def lora_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The adapter tensors only, under the names PEFT saves in adapter_model.safetensors."""
    sd = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            prefix = PEFT_PREFIX + _hf_name(model, name)
            sd[f"{prefix}.lora_A.weight"] = module.lora_A.weight.detach()
            sd[f"{prefix}.lora_B.weight"] = module.lora_B.weight.detach()
    return sd


def _peft_targets(model: GPT, cfg: LoraConfig) -> str | list[str]:
    """target_modules as PEFT reads them: names (suffix match), one full-name regex, or else the explicit
    HF names of every adapted module (a list mixing regexes and names has no PEFT spelling)."""
    regexes = [t for t in cfg.target_modules if _is_regex(t)]
    if not regexes:
        return list(cfg.target_modules)
    if len(cfg.target_modules) == 1:
        return regexes[0]
    return [_hf_name(model, name) for name, m in model.named_modules() if isinstance(m, LoraLinear)]


def save_adapter(model: GPT, folder: str | Path, cfg: LoraConfig, base_model_name_or_path: str) -> None:
    """Write a PEFT adapter folder (adapter_config.json + adapter_model.safetensors), atomically: both files
    go to a temporary sibling folder, which is then renamed into place."""
    sd = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    if not sd:
        raise UserError("the model has no LoRA adapters to save; call apply_lora first")
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": _peft_targets(model, cfg),
        "bias": "none",
        "base_model_name_or_path": base_model_name_or_path,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    with atomic.folder(folder) as tmp:
        save_file(sd, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        atomic.write_json(tmp / ADAPTER_CONFIG, adapter_config)


def _read_adapter_config(path: Path) -> LoraConfig:
    try:
        raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing; is {path.parent} a PEFT adapter folder?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        raise UserError(f"{path} is not a LoRA adapter config (peft_type {raw.get('peft_type')!r})")
    unsupported = {
        "bias": raw.get("bias", "none") != "none",
        "fan_in_fan_out": bool(raw.get("fan_in_fan_out")),
        "use_rslora": bool(raw.get("use_rslora")),
        "use_dora": bool(raw.get("use_dora")),
        "rank_pattern": bool(raw.get("rank_pattern")),
        "alpha_pattern": bool(raw.get("alpha_pattern")),
        "modules_to_save": bool(raw.get("modules_to_save")),
        "layers_to_transform": raw.get("layers_to_transform") is not None,
    }
    if any(unsupported.values()):
        names = [k for k, bad in unsupported.items() if bad]
        raise UserError(f"{path} uses PEFT options lmforge does not support: {', '.join(names)}")
    targets = raw.get("target_modules")
    if not targets:
        raise UserError(f"{path} has no target_modules")
    try:
        return LoraConfig(
            r=int(raw["r"]),
            alpha=float(raw["lora_alpha"]),
            dropout=float(raw.get("lora_dropout", 0.0)),
            target_modules=(targets,) if isinstance(targets, str) else tuple(sorted(targets)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path} lacks or has a bad r / lora_alpha ({e})") from None


def _read_adapter_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise UserError(f"{path} is missing; is {path.parent} a PEFT adapter folder?")
    try:
        sd = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is truncated or not a safetensors file ({e})") from None
    out = {}
    for key, t in sd.items():
        # PEFT strips the adapter name when saving; tolerate files that kept it.
        out[key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")] = t
    return out


def load_adapter(model: GPT, folder: str | Path) -> LoraConfig:
    """Apply the adapter in a PEFT folder to `model` (in place) and return its config.

    Everything is checked (config, file, names, shapes) before the model is touched.
    """
    folder = Path(folder)
    cfg = _read_adapter_config(folder / ADAPTER_CONFIG)
    sd = _read_adapter_weights(folder / ADAPTER_WEIGHTS)
    expected = {}
    for name, module in _targets(model, cfg):
        prefix = PEFT_PREFIX + _hf_name(model, name)
        expected[f"{prefix}.lora_A.weight"] = (cfg.r, module.in_features)
        expected[f"{prefix}.lora_B.weight"] = (module.out_features, cfg.r)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"adapter in {folder} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for key, shape in expected.items():
        if tuple(sd[key].shape) != shape:
            raise UserError(
                f"adapter tensor {key} has shape {tuple(sd[key].shape)}, the model needs {shape}; "
                "was the adapter trained on a different base model?"
            )
    apply_lora(model, cfg)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoraLinear):
                prefix = PEFT_PREFIX + _hf_name(model, name)
                module.lora_A.weight.copy_(sd[f"{prefix}.lora_A.weight"])
                module.lora_B.weight.copy_(sd[f"{prefix}.lora_B.weight"])
    return cfg
