"""`lmforge train`: next-token pretraining (from scratch, or continued from a model with `init_from`).

Builds the tokenizer, the model and the batch source from a prepared data folder, hands them to the one
loop with the cross-entropy loss, then registers the trained model in the store under the run's name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge import checkpoint, config_io, store
from lmforge.data.loader import BatchLoader, TokenShards
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.models.gpt import build_model
from lmforge.train import loop
from lmforge.train.config import TrainConfig
from lmforge.train.losses import next_token_loss

END_OF_TEXT = "<|endoftext|>"


@dataclass
class PretrainResult:
    val_loss: float | None
    steps: int
    stopped: str
    run_dir: Path
    model_dir: Path | None  # the run's HF folder (rank 0 only)
    store_name: str | None  # the store name it was registered under (rank 0 only)
    sample: str  # greedy continuation of cfg.sample_prompt ("" on ranks other than 0)


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    """The prepared folder's meta.json, checked for what training needs."""
    data_dir = Path(data_dir)
    path = data_dir / "meta.json"
    if not data_dir.is_dir():
        raise UserError(f"data folder {data_dir} does not exist; create it with `lmforge data prepare`")
    if not path.is_file():
        raise UserError(f"{data_dir} has no meta.json; is it a folder written by `lmforge data prepare`?")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); prepare the data again") from None
    missing = {"format", "dtype", "vocab_size", "eot_id", "tokenizer", "splits"} - set(meta)
    if missing:
        raise UserError(f"{path} lacks {', '.join(sorted(missing))}; prepare the data again")
    if meta["format"] != 1:
        raise UserError(f"{path} has format {meta['format']}; this lmforge reads format 1")
    for split in ("train", "val"):
        if not sum(s["num_tokens"] for s in meta["splits"].get(split, [])):
            raise UserError(f"{data_dir} has no {split} tokens; prepare more data or a larger val share")
    return meta


def byte_tokenizer() -> Tokenizer:
    """The byte vocabulary (id = byte value, 256 = end of text) as an HF tokenizer.json tokenizer, so a model
    trained on `tokenizer: bytes` data is a complete HF folder that transformers and `lmforge generate` read."""
    import tokenizers
    from tokenizers import AddedToken, decoders, models, pre_tokenizers

    # GPT-2's byte -> printable-character table, which the ByteLevel pre-tokenizer/decoder use.
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    char = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    tok = tokenizers.Tokenizer(models.BPE(vocab={char[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(END_OF_TEXT, special=True)])  # id 256
    return Tokenizer(tok, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT)


def load_tokenizer(data_dir: str | Path, meta: dict[str, Any]) -> Tokenizer:
    if meta["tokenizer"] == "bytes":
        return byte_tokenizer()
    return Tokenizer.from_folder(Path(data_dir) / meta["tokenizer"])


def build(cfg: TrainConfig, meta: dict[str, Any]) -> nn.Module:
    """A fresh model sized by cfg.model with the data's vocabulary, or the `init_from` model's weights."""
    if cfg.init_from is not None:
        ck = checkpoint.load(store.resolve(cfg.init_from))
        if ck.config.vocab_size < meta["vocab_size"]:
            raise UserError(
                f"{cfg.init_from} has {ck.config.vocab_size} tokens but the data uses {meta['vocab_size']}; "
                f"prepare the data with --tokenizer {cfg.init_from}"
            )
        if cfg.seq_len > ck.config.max_seq_len:
            raise UserError(
                f"seq_len {cfg.seq_len} exceeds {cfg.init_from}'s max_seq_len {ck.config.max_seq_len}; lower seq_len"
            )
        return ck.model.train()
    eot = meta["eot_id"]
    model_cfg = cfg.model.replace(vocab_size=meta["vocab_size"], bos_token_id=eot, eos_token_id=eot)
    return build_model(model_cfg).train()


def run(cfg: TrainConfig, *, resume: bool = False) -> PretrainResult:
    meta = read_meta(cfg.data)
    dist = loop.setup(cfg)
    try:
        tokenizer = load_tokenizer(cfg.data, meta)
        model = build(cfg, meta)
        train_shards, val_shards = TokenShards(cfg.data, "train"), TokenShards(cfg.data, "val")
        batches = BatchLoader(
            train_shards,
            cfg.batch_size,
            cfg.seq_len,
            seed=cfg.seed,
            rank=dist.rank,
            world_size=dist.world_size,
        )

        def eval_fn(m: nn.Module) -> float:
            return val_loss(m, val_shards, cfg, dist)

        result = loop.train(
            model,
            batches,
            cfg,
            next_token_loss,
            tokenizer=tokenizer,
            eval_fn=eval_fn,
            dist=dist,
            resume=resume,
            run_config=config_io.to_dict(cfg),
        )
        name, sample = None, ""
        if dist.is_main:
            name = store.pull(str(result.model_dir), name=cfg.name, force=True).name
            if dist.mode != "fsdp":  # a sharded model cannot run forward on one rank alone
                sample = greedy_sample(model, tokenizer, cfg.sample_prompt, meta["eot_id"], dist.device)
        return PretrainResult(
            result.val_loss,
            result.state.step,
            result.stopped,
            Path(cfg.out_dir),
            result.model_dir,
            name,
            sample,
        )
    finally:
        loop.teardown(dist)


def val_loss(model: nn.Module, shards: Any, cfg: TrainConfig, dist: loop.Dist) -> float:
    """Mean next-token loss over the first cfg.eval_batches global batches of fixed validation windows;
    under DDP each rank scores its share of every batch and the sums are all-reduced."""
    total = torch.zeros(2, dtype=torch.float64)  # (sum of per-row losses, rows)
    for x, y in shards.eval_batches(
        cfg.eval_batches, cfg.batch_size, cfg.seq_len, rank=dist.rank, world_size=dist.world_size
    ):
        loss = next_token_loss(model, (x.to(dist.device), y.to(dist.device)))
        total += torch.tensor([float(loss) * len(x), len(x)], dtype=torch.float64)
    if dist.mode != "none":
        import torch.distributed as tdist

        tdist.all_reduce(total)
    if total[1] == 0:
        raise UserError(
            f"the validation split is shorter than one window of seq_len {cfg.seq_len} + 1 tokens"
        )
    return float(total[0] / total[1])


@torch.no_grad()
def greedy_sample(
    model: nn.Module, tokenizer: Tokenizer, prompt: str, eot_id: int, device: torch.device, max_new: int = 64
) -> str:
    """A short greedy continuation to eyeball the model (no KV cache: the trainer may not import the engine)."""
    was_training = model.training
    model.eval()
    ids = tokenizer.encode(prompt) if prompt else [eot_id]
    out: list[int] = []
    ctx = model.config.max_seq_len
    for _ in range(max_new):
        x = torch.tensor([(ids + out)[-ctx:]], device=device)
        nxt = int(model(x)[0, -1].argmax())
        if nxt == eot_id:
            break
        out.append(nxt)
    model.train(was_training)
    return prompt + tokenizer.decode(out)
