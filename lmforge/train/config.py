"""TrainConfig: one frozen, typed config for every training run (pretraining today; fine-tuning, distillation
reuse it). Recipes in `recipes/` are YAML diffs from these defaults; `lmforge.config_io` loads them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lmforge.errors import UserError
from lmforge.models.config import ModelConfig

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")  # the model store's name rule: runs register there
DISTRIBUTED = ("auto", "ddp", "fsdp")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to min_lr (nanoGPT's get_lr)."""

    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 100
    decay_steps: int = 0  # steps over which lr decays to min_lr; 0 = max_steps
    weight_decay: float = 0.1  # 2-D weights only: not norms, biases or embeddings
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    fused: bool = True  # the fused AdamW kernel where the device has one, else foreach

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise UserError(
                f"need 0 <= optim.min_lr <= optim.lr and lr > 0, got lr {self.lr}, min_lr {self.min_lr}"
            )
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise UserError("optim.warmup_steps and optim.decay_steps must be >= 0")
        if not all(0 <= b < 1 for b in self.betas):
            raise UserError(f"optim.betas must lie in [0, 1), got {list(self.betas)}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.eps <= 0:
            raise UserError("optim.weight_decay and optim.grad_clip must be >= 0 and optim.eps > 0")


def _small_model() -> ModelConfig:
    # A few million parameters: trains on a laptop CPU in minutes. vocab_size comes from the data.
    return ModelConfig(n_layer=4, n_head=4, n_embd=256, max_seq_len=256)


@dataclass(frozen=True)
class TrainConfig:
    name: str = "run"  # run folder runs/<name>; the trained model is stored under this name
    data: str = "data/prepared"  # a folder written by `lmforge data prepare`
    init_from: str | None = None  # a store name or HF folder to continue training (then `model` is unused)
    model: ModelConfig = field(default_factory=_small_model)
    batch_size: int = 16  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 256
    max_steps: int = 1000
    max_minutes: float = 0.0  # stop gracefully after this much time (lr decays to fit it); 0 = no limit
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval_every: int = 100  # steps; 0 = only at the end
    eval_batches: int = 20  # validation windows of batch_size x seq_len per evaluation
    early_stop_patience: int = 0  # evaluations without improvement before stopping; 0 = off
    early_stop_min_delta: float = 0.0  # an improvement must beat the best val loss by this much
    checkpoint_every: int = 0  # steps; 0 = only at the end
    log_every: int = 10  # steps between metrics.jsonl lines and progress updates
    out_dir: str = ""  # default runs/<name>
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"  # auto = bf16 autocast on CUDA, float32 on CPU
    threads: int = 0  # CPU threads per process; 0 = $LMFORGE_THREADS or all cores split between ranks
    compile: bool = False
    distributed: str = "auto"  # auto = DDP under torchrun, nothing otherwise; ddp | fsdp
    tensorboard: bool = True
    sample_prompt: str = ""  # text the final sample continues; "" = start from end-of-text

    def __post_init__(self) -> None:
        if not _NAME_RE.fullmatch(self.name):
            raise UserError(
                f"run name {self.name!r} must be lowercase letters, digits, '.', '_' or '-' (it names the model in the store)"
            )
        if not self.out_dir:
            object.__setattr__(self, "out_dir", f"runs/{self.name}")
        for key in ("batch_size", "grad_accum", "seq_len", "max_steps"):
            if getattr(self, key) <= 0:
                raise UserError(f"{key} must be positive, got {getattr(self, key)}")
        for key in ("eval_every", "eval_batches", "early_stop_patience", "checkpoint_every", "log_every"):
            if getattr(self, key) < 0:
                raise UserError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.log_every == 0:
            object.__setattr__(self, "log_every", 1)
        if self.max_minutes < 0 or self.early_stop_min_delta < 0:
            raise UserError("max_minutes and early_stop_min_delta must be >= 0")
        if self.init_from is None and self.seq_len > self.model.max_seq_len:
            raise UserError(
                f"seq_len {self.seq_len} exceeds model.max_seq_len {self.model.max_seq_len}; "
                "raise model.max_seq_len or lower seq_len"
            )
        if self.distributed not in DISTRIBUTED:
            raise UserError(f"distributed must be one of {', '.join(DISTRIBUTED)}, got {self.distributed!r}")
        if self.dtype not in ("auto", "float32", "fp32", "bfloat16", "bf16"):
            raise UserError(f"dtype must be auto, float32 or bfloat16 (training), got {self.dtype!r}")
        if self.early_stop_patience and not self.eval_every:
            raise UserError("early_stop_patience needs eval_every > 0 (early stopping acts on evaluations)")

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step in one process (times world size under DDP)."""
        return self.batch_size * self.grad_accum * self.seq_len
