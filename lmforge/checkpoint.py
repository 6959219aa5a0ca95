"""The checkpoint folder: load (HF folder or GGUF), save (HF folder), validate.

An lmforge checkpoint is an HF-format folder that transformers, vLLM, PEFT and lm-evaluation-harness read
unchanged: config.json, model.safetensors (sharded with an index above `max_shard_bytes`),
tokenizer.json, tokenizer_config.json, generation_config.json, plus lmforge.json (format version,
lmforge version, run config, metrics). Folders are written under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import lmforge
from lmforge import atomic
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.models import classifier
from lmforge.models.config import ModelConfig, config_from_hf, config_to_hf
from lmforge.models.convert import config_from_gguf, gguf_to_lmforge, hf_to_lmforge, lmforge_to_hf
from lmforge.models.gguf_reader import dequantize, read_gguf
from lmforge.models.gpt import GPT, build_model

FORMAT_VERSION = 1
MAX_SHARD_BYTES = 5 * 1024**3


@dataclass
class Checkpoint:
    model: GPT | classifier.SequenceClassifier  # the latter for a *ForSequenceClassification folder
    tokenizer: Tokenizer
    config: ModelConfig
    path: Path
    format: str  # "hf" | "gguf"
    eos_ids: frozenset[int]  # token ids that end generation

    @property
    def name(self) -> str:
        return self.path.stem if self.format == "gguf" else self.path.name


def find_weights(path: str | Path) -> tuple[Path, str]:
    """(file or folder, "gguf" | "hf") for a path that is a .gguf file, an HF folder, or a folder with one .gguf."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"{path} is not a .gguf file or a model folder")
        return path, "gguf"
    if not path.is_dir():
        raise UserError(f"model path {path} does not exist")
    if (path / "config.json").exists():
        return path, "hf"
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0], "gguf"
    if len(ggufs) > 1:
        raise UserError(f"{path} holds several .gguf files; point at one of them")
    raise UserError(f"{path} has neither config.json nor a .gguf file; is it a model folder?")


def load(
    path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Checkpoint:
    weights, fmt = find_weights(path)
    if fmt == "gguf":
        return _load_gguf(weights, device, dtype)
    return _load_hf(weights, device, dtype)


def _load_gguf(path: Path, device, dtype) -> Checkpoint:
    gf = read_gguf(path)
    cfg = config_from_gguf(gf.metadata, set(gf.tensors))
    raw = {name: dequantize(t, torch.float32) for name, t in gf.tensors.items()}
    sd = gguf_to_lmforge(gf.metadata["general.architecture"], raw, cfg)
    model = build_model(cfg, sd, device=device, dtype=dtype)
    tok = Tokenizer.from_gguf_metadata(gf.metadata)
    return Checkpoint(model, tok, cfg, path, "gguf", _eos_ids(cfg, tok, None))


def _load_hf(path: Path, device, dtype) -> Checkpoint:
    hf_cfg = _read_json(path / "config.json")
    cfg = config_from_hf(hf_cfg)
    if classifier.is_classifier_config(hf_cfg):
        model = classifier.from_hf(hf_cfg, _read_safetensors(path), cfg, device=device, dtype=dtype)
    else:
        model = build_model(cfg, hf_to_lmforge(_read_safetensors(path), cfg), device=device, dtype=dtype)
    tok = Tokenizer.from_folder(path)
    gen = _read_json(path / "generation_config.json") if (path / "generation_config.json").exists() else None
    return Checkpoint(model, tok, cfg, path, "hf", _eos_ids(cfg, tok, gen))


def _eos_ids(cfg: ModelConfig, tok: Tokenizer, gen: dict | None) -> frozenset[int]:
    ids = set(tok.stop_ids)
    for source in (cfg.eos_token_id, (gen or {}).get("eos_token_id")):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list):
            ids.update(source)
    return frozenset(ids)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(_read_json(index)["weight_map"].values()))
        return [folder / f for f in files]
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} has no model.safetensors; is it a model folder?")
    return files


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in _safetensors_files(folder):
        check_safetensors(f)
        sd.update(load_file(f))
    return sd


def check_safetensors(path: Path) -> None:
    """Header parses and the file is exactly as long as the header says (catches truncation)."""
    size = path.stat().st_size if path.exists() else -1
    if size < 0:
        raise UserError(f"{path} is missing")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path} is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise UserError(
                f"{path} is truncated or not a safetensors file: header of {n} bytes in a {size}-byte file"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{path} is corrupt: its safetensors header is not valid JSON") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise UserError(f"{path} is truncated or corrupt: expected {8 + n + end} bytes, found {size}")


def validate(path: str | Path) -> None:
    """Raise UserError if the model at `path` cannot be loaded (truncated/corrupt weights, bad config)."""
    weights, fmt = find_weights(path)
    if fmt == "gguf":
        gf = read_gguf(weights)
        config_from_gguf(gf.metadata, set(gf.tensors))
        return
    config_from_hf(_read_json(weights / "config.json"))
    for f in _safetensors_files(weights):
        check_safetensors(f)
    if not (weights / "tokenizer.json").exists():
        raise UserError(f"{weights} has no tokenizer.json")


def save(
    folder: str | Path,
    model: GPT | classifier.SequenceClassifier,
    tokenizer: Tokenizer,
    *,
    run_config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write an HF-format folder atomically: everything goes to a temporary sibling, then is renamed.

    A model with `hf_config()` (a SequenceClassifier, or a training wrapper of one) is written as
    transformers' *ForSequenceClassification: its config.json and `models.classifier.hf_weights` names."""
    folder = Path(folder)
    cfg = model.config
    with atomic.folder(folder) as tmp:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        if hasattr(model, "hf_config"):
            sd, hf_config = classifier.hf_weights(weights, cfg), model.hf_config()
        else:
            sd, hf_config = lmforge_to_hf(weights, cfg), config_to_hf(cfg)
        _save_weights(tmp, sd, max_shard_bytes)
        atomic.write_json(tmp / "config.json", hf_config)
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": sorted(_eos_ids(cfg, tokenizer, None))}
        atomic.write_json(tmp / "generation_config.json", gen)
        tokenizer.save(tmp)
        meta = {
            "format_version": FORMAT_VERSION,
            "lmforge_version": lmforge.__version__,
            "model_config": cfg.to_dict(),
            "run_config": run_config,
            "metrics": metrics,
        }
        atomic.write_json(tmp / "lmforge.json", meta)
    return folder


def _save_weights(folder: Path, sd: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in sd.values())
    atomic.write_json(
        folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
    )
