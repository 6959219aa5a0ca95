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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # served as "model:name"; kept URL- and log-safe


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
        if isinstance(module, MultiLoRALinear):  # served adapters: the base Linear under its own name
            module = module.base_layer
        elif not isinstance(module, nn.Linear) or ".lora_" in name or name.endswith(".base_layer"):
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
    if any(isinstance(m, LoraLinear | MultiLoRALinear) for m in model.modules()):
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


def _read_adapter(
    model: GPT, folder: Path
) -> tuple[LoraConfig, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The adapter in a PEFT folder, checked against `model` (config, file, names, shapes): its config and,
    per adapted module (our name), its (A (r, in), B (out, r)) tensors as stored."""
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
    weights = {}
    for name, _ in _targets(model, cfg):
        prefix = PEFT_PREFIX + _hf_name(model, name)
        weights[name] = (sd[f"{prefix}.lora_A.weight"], sd[f"{prefix}.lora_B.weight"])
    return cfg, weights


def load_adapter(model: GPT, folder: str | Path) -> LoraConfig:
    """Apply the adapter in a PEFT folder to `model` (in place) and return its config.

    Everything is checked (config, file, names, shapes) before the model is touched.
    """
    cfg, weights = _read_adapter(model, Path(folder))
    apply_lora(model, cfg)
    with torch.no_grad():
        for name, (a, b) in weights.items():
            module = model.get_submodule(name)
            module.lora_A.weight.copy_(a)
            module.lora_B.weight.copy_(b)
    return cfg


# ------------------------------------------------------------------------------------------- serving


class _ActiveRows:
    """The rows of the current forward pass that each adapter owns; one object, shared by every
    MultiLoRALinear of a model, set once per step by `MultiLoRA.activate` (vLLM's punica wrapper, smaller)."""

    def __init__(self) -> None:
        self.segments: list[tuple[int, slice | torch.Tensor]] = []  # (adapter slot, its rows)


class MultiLoRALinear(nn.Module):
    """A frozen base Linear serving several adapters at once, each on its own rows of the flattened batch.

    base(x) runs once for all rows, as without adapters; then, per adapter present in the batch, its rows
    get B (A x) * scaling added (S-LoRA / punica's SGMV: segments, not tokens). When an adapter's rows are
    consecutive (the engine groups its batch by adapter) that is two thin GEMMs, the second accumulating in
    place into a view of the output; otherwise a gather, two GEMMs and a scatter-add. Rows of no adapter keep
    the base output bit for bit. A and B are held per adapter rather than padded into one tensor: each
    adapter keeps its own rank, and the loop over adapters present is what a CPU does with segments anyway.
    They are stored transposed and contiguous, A^T (in, r) and B^T (r, out), so that x A^T B^T is two plain
    row-major GEMMs (at 16 rows on 2 cores, 20% less time per layer than F.linear's transposed operands).
    """

    def __init__(self, base_layer: nn.Linear, active: _ActiveRows):
        super().__init__()
        self.base_layer = base_layer
        self.active = active
        # by adapter slot; None where that adapter leaves this layer alone
        self.lora_At: list[torch.Tensor | None] = []  # (in, r)
        self.lora_Bt: list[torch.Tensor | None] = []  # (r, out)
        self.scaling: list[float] = []

    def add_adapter(self, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        """Serve adapter `slot` here: A (r, in) and B (out, r) as PEFT stores them."""
        w = self.base_layer.weight
        missing = slot + 1 - len(self.lora_At)
        self.lora_At += [None] * missing
        self.lora_Bt += [None] * missing
        self.scaling += [0.0] * missing
        self.lora_At[slot] = a.to(device=w.device, dtype=w.dtype).t().contiguous()
        self.lora_Bt[slot] = b.to(device=w.device, dtype=w.dtype).t().contiguous()
        self.scaling[slot] = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        segments = self.active.segments
        if not segments:
            return out
        x2, out2 = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])  # (N, in), (N, out)
        for slot, rows in segments:
            at = self.lora_At[slot] if slot < len(self.lora_At) else None
            if at is None:
                continue
            h = x2[rows] @ at  # (n, r)
            if isinstance(rows, slice):  # in place, fused: out[rows] += scaling * h B^T
                out2[rows].addmm_(h, self.lora_Bt[slot], alpha=self.scaling[slot])
            else:
                out2.index_add_(0, rows, h @ self.lora_Bt[slot], alpha=self.scaling[slot])
        return out


def _segments(token_slots: torch.Tensor, device: torch.device) -> list[tuple[int, slice | torch.Tensor]]:
    """(slot, rows) per adapter in a per-token slot index (-1 = none): a slice when the rows are consecutive
    (one sequence, or sequences side by side), else their indices on `device`."""
    segments = []
    for slot in torch.unique(token_slots).tolist():
        if slot < 0:
            continue
        rows = (token_slots == slot).nonzero().flatten()
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        segments.append((slot, slice(lo, hi) if hi - lo == len(rows) else rows.to(device)))
    return segments


class MultiLoRA:
    """Several LoRA adapters served over one base model, the adapter chosen per token of the batch.

    `add(name, folder)` loads a PEFT adapter folder and swaps a MultiLoRALinear in for each Linear it targets
    (the first adapter does the first swap: a model with no adapters keeps its plain Linears and its speed).
    A forward pass inside `activate(token_slots)` adds each adapter's delta to its tokens' rows only; outside
    it (or with no adapter tokens) the model computes exactly what its base does.

    References: vLLM `lora/` (LoRAModelManager, punica's per-token mapping), S-LoRA (Sheng et al. 2023).
    """

    def __init__(self, model: GPT):
        self.model = model
        self.names: list[str] = []  # slot -> name
        self.configs: list[LoraConfig] = []
        self._active = _ActiveRows()
        self._device = model.lm_head.weight.device

    def add(self, name: str, folder: str | Path) -> int:
        """Load the adapter in `folder` under `name`; returns its slot. Everything is checked before the
        model is touched."""
        if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name):
            raise UserError(
                f"LoRA adapter name {name!r} must be letters, digits, '.', '_' or '-' (starting with a "
                "letter or digit)"
            )
        if name in self.names:
            raise UserError(f"a LoRA adapter named {name!r} is already loaded")
        cfg, weights = _read_adapter(self.model, Path(folder))
        if "lm_head" in weights:
            raise UserError(
                f"the adapter in {folder} adapts lm_head, which serving does not support; "
                "merge it into the model instead (merge_lora)"
            )
        slot = len(self.names)
        for module_name, (a, b) in weights.items():
            layer = self.model.get_submodule(module_name)
            if not isinstance(layer, MultiLoRALinear):
                layer = MultiLoRALinear(layer, self._active)
                _swap(self.model, module_name, layer)
            layer.add_adapter(slot, a, b, cfg.scaling)
        self.names.append(name)
        self.configs.append(cfg)
        return slot

    def slot(self, name: str) -> int:
        """The slot of adapter `name`; UserError when no adapter has that name."""
        try:
            return self.names.index(name)
        except ValueError:
            loaded = ", ".join(self.names) or "none"
            raise UserError(f"no LoRA adapter named {name!r} is loaded (loaded: {loaded})") from None

    @contextmanager
    def activate(self, token_slots: Sequence[int] | torch.Tensor) -> Iterator[None]:
        """Within this block, each row t of the model's flattened tokens gets adapter `token_slots[t]`
        (-1 = the base model alone)."""
        slots = torch.as_tensor(token_slots, dtype=torch.long, device="cpu")
        if slots.numel() and int(slots.max()) >= len(self.names):
            raise ValueError(f"adapter slot {int(slots.max())} is not loaded ({len(self.names)} are)")
        self._active.segments = _segments(slots, self._device)
        try:
            yield
        finally:
            self._active.segments = []
