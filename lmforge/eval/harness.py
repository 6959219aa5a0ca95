"""`lmforge eval`: run tasks against one model, write JSON + markdown reports; `compare` runs side by side.

    run(EvalConfig(model="smollm2-135m-instruct", tasks=("wiki-ppl", "shop-faq"))) -> results dict

Each run writes `results.json`, `report.md` and `samples/<task>.jsonl` (every item's inputs, outputs and scores)
under `out` (default `runs/eval/<model>-<UTC timestamp>/`). The numbers depend only on the model, the task files
and the config (few-shot draws are seeded, decoding is greedy), so a rerun gives the same metrics.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lmforge
from lmforge import atomic
from lmforge.checkpoint import Checkpoint
from lmforge.errors import UserError
from lmforge.eval import metrics, tasks
from lmforge.eval.perplexity import (
    encode_documents,
    loglikelihood,
    num_windows,
    perplexity_of_ids,
    prefix_token_id,
)
from lmforge.eval.tasks import GenItem, MCItem, TaskSpec

DEFAULT_MAX_LENGTH = 1024  # window cap when the model allows more: CPU-friendly, HF guide's choice for GPT-2


@dataclass(frozen=True)
class EvalConfig:
    """One `lmforge eval` invocation; fields map 1:1 to the command's flags."""

    model: str  # store name or path (HF folder / .gguf)
    tasks: tuple[str, ...]  # built-in names, or task types each paired in order with a `data` file
    data: tuple[str, ...] = ()
    batch_size: int = 8  # windows / continuations per forward; sequences decoded together
    max_length: int | None = None  # context window in tokens; None: min(model's max_seq_len, 1024)
    stride: int | None = None  # perplexity window step; None: max_length // 2
    num_fewshot: int = 0
    limit: int | None = None  # first N items (documents for perplexity) of each task
    out: str | None = None  # report folder; None: runs/eval/<model>-<timestamp>
    seed: int = 1234  # few-shot draws
    chat: bool = False  # generation: wrap prompts in the model's chat template
    max_new_tokens: int | None = None  # generation; None: the task's own default
    device: str = "auto"
    dtype: str = "auto"
    progress: bool = True  # rich progress bar on stderr

    def __post_init__(self) -> None:
        # the CLI hands lists; keep the config hashable and serialisable
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "data", tuple(self.data))
        for name in ("batch_size", "limit", "max_new_tokens", "stride"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"{name} must be at least 1, got {value}")
        if self.max_length is not None and self.max_length < 2:
            raise UserError(f"max_length must be at least 2, got {self.max_length}")
        if self.num_fewshot < 0:
            raise UserError(f"num_fewshot must be 0 or more, got {self.num_fewshot}")
        if self.stride is not None and self.max_length is not None and self.stride > self.max_length:
            raise UserError(f"stride ({self.stride}) must not exceed max_length ({self.max_length})")


# ---------------------------------------------------------------------------------------------- run


def run(cfg: EvalConfig, *, checkpoint: Checkpoint | None = None) -> dict[str, Any]:
    """Evaluate every task, write the reports, return the results (also in results.json).

    `checkpoint` skips loading (tests and callers that already hold the model).
    """
    specs = tasks.resolve_tasks(cfg.tasks, cfg.data)  # bad task names fail before the model loads
    classification = [spec for spec in specs if spec.type == "classification"]
    if classification and len(classification) < len(specs):
        raise UserError(
            "classification tasks need a classifier and the other task types a language model: "
            "evaluate them in separate runs"
        )
    if classification:
        return _run_classification(cfg, classification)
    items = {spec.name: tasks.load(spec) for spec in specs}  # so do bad task files
    ckpt = checkpoint if checkpoint is not None else _load_model(cfg)
    if not hasattr(ckpt.model, "lm_head"):
        raise UserError(
            f"{cfg.model} is a text classifier, not a language model; evaluate it with "
            "`--task classification --data FILE` (labelled JSONL or CSV)"
        )
    max_length = min(cfg.max_length or DEFAULT_MAX_LENGTH, ckpt.config.max_seq_len)
    stride = min(cfg.stride or max(max_length // 2, 1), max_length)

    results: dict[str, Any] = {
        "model": ckpt.name,
        "model_path": str(ckpt.path),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "lmforge_version": lmforge.__version__,
        "device": str(ckpt.model.lm_head.weight.device),
        "dtype": str(ckpt.model.lm_head.weight.dtype).removeprefix("torch."),
        "config": asdict(cfg) | {"max_length": max_length, "stride": stride},
        "tasks": {},
    }
    samples: dict[str, list[dict]] = {}
    for spec in specs:
        t0 = time.perf_counter()
        data = items[spec.name]
        if spec.type == "perplexity":
            scores, samples[spec.name] = eval_perplexity(ckpt, data, cfg, max_length, stride)
        elif spec.type == "multiple_choice":
            scores, samples[spec.name] = eval_multiple_choice(ckpt, data, cfg, max_length)
        else:
            scores, samples[spec.name] = eval_generation(ckpt, data, spec, cfg)
        results["tasks"][spec.name] = {
            "type": spec.type,
            "description": spec.description,
            "data": spec.path.name if spec.builtin else str(spec.path),
            "main_metric": spec.main_metric,
            "metrics": scores,
            "seconds": round(time.perf_counter() - t0, 2),
        }
    out = Path(cfg.out) if cfg.out else default_out_dir(ckpt.name)
    write_reports(out, results, samples)
    results["out_dir"] = str(out)
    return results


def _run_classification(cfg: EvalConfig, specs: list[tasks.TaskSpec]) -> dict[str, Any]:
    """Score a classifier on each labelled file as `lmforge classify MODEL --data FILE` does (accuracy, per-class
    precision / recall / F1, macro F1, confusion matrix); each task's full report goes to <out>/<task>/."""
    from lmforge import runtime
    from lmforge.eval import classification

    out = Path(cfg.out) if cfg.out else default_out_dir(Path(cfg.model).name)
    device = runtime.resolve_device(cfg.device)
    results: dict[str, Any] = {
        "model": cfg.model,
        "model_path": cfg.model,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": str(device),
        "dtype": str(runtime.resolve_dtype(cfg.dtype, device)).removeprefix("torch."),
        "lmforge_version": lmforge.__version__,
        "config": asdict(cfg),
        "tasks": {},
    }
    for spec in specs:
        t0 = time.perf_counter()
        folder = out / _file_name(spec.name)
        scores, read = classification.evaluate(
            cfg.model, spec.path, folder, device=cfg.device, dtype=cfg.dtype, limit=cfg.limit
        )
        results["model_path"] = scores["model"]
        results["tasks"][spec.name] = {
            "type": spec.type,
            "description": spec.description,
            "data": str(spec.path),
            "main_metric": spec.main_metric,
            "metrics": {
                "accuracy": scores["accuracy"],
                "f1_macro": scores["f1_macro"],
                "examples": scores["examples"],
            },  # fmt: skip
            "data_report": read.summary(),
            "report": str(folder / classification.REPORT),
            "seconds": round(time.perf_counter() - t0, 2),
        }
    write_reports(out, results, {})
    results["out_dir"] = str(out)
    return results


def _load_model(cfg: EvalConfig) -> Checkpoint:
    from lmforge import checkpoint, runtime, store

    device = runtime.resolve_device(cfg.device)
    return checkpoint.load(
        store.resolve(cfg.model), device=device, dtype=runtime.resolve_dtype(cfg.dtype, device)
    )


def default_out_dir(model_name: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = Path("runs") / "eval" / f"{model_name}-{stamp}"
    n = 1
    while out.exists():  # two runs in the same second
        n += 1
        out = Path("runs") / "eval" / f"{model_name}-{stamp}-{n}"
    return out


# ---------------------------------------------------------------------------------------------- task types


def eval_perplexity(
    ckpt: Checkpoint, data: tasks.PPLData, cfg: EvalConfig, max_length: int, stride: int
) -> tuple[dict, list[dict]]:
    tok = ckpt.tokenizer
    if data.token_ids is not None:  # one prepared stream: first token is context only
        ids = data.token_ids[: cfg.limit] if cfg.limit else data.token_ids
        sequences = [ids]
        num_bytes = len(tok.decode(ids[1:]).encode("utf-8"))
    else:
        texts = data.texts[: cfg.limit] if cfg.limit else data.texts
        sequences, num_bytes = encode_documents(tok, texts)
    total = num_windows([len(s) for s in sequences], max_length, stride)
    with _progress(cfg.progress, "perplexity", total) as advance:
        res = perplexity_of_ids(
            ckpt.model, sequences, num_bytes, max_length=max_length, stride=stride,
            batch_size=cfg.batch_size, on_batch=advance,
        )  # fmt: skip
    return res.to_dict(), [{"num_documents": len(sequences), **res.to_dict()}]


def eval_multiple_choice(
    ckpt: Checkpoint, items: list[MCItem], cfg: EvalConfig, max_length: int
) -> tuple[dict, list[dict]]:
    tok = ckpt.tokenizer
    prefix = prefix_token_id(tok)
    n = min(len(items), cfg.limit or len(items))
    contexts = [tasks.mc_context(items, i, cfg.num_fewshot, cfg.seed) for i in range(n)]
    requests = [
        tasks.encode_pair(tok, ctx, tasks.TARGET_DELIMITER + choice, prefix)
        for ctx, item in zip(contexts, items[:n], strict=True)
        for choice in item.choices
    ]
    with _progress(cfg.progress, "multiple choice", len(requests)) as advance:
        scores = loglikelihood(
            ckpt.model, requests, max_length=max_length, batch_size=cfg.batch_size, on_batch=advance
        )
    samples, acc, acc_norm, k = [], 0, 0, 0
    for i in range(n):
        item = items[i]
        lps = [s[0] for s in scores[k : k + len(item.choices)]]
        k += len(item.choices)
        pred, pred_norm = metrics.choose(lps, [len(c.encode("utf-8")) for c in item.choices])
        acc += pred == item.gold
        acc_norm += pred_norm == item.gold
        samples.append({"context": contexts[i], "choices": list(item.choices), "gold": item.gold,
                        "logprobs": lps, "pred": pred, "pred_norm": pred_norm})  # fmt: skip
    return {"acc": acc / n, "acc_norm": acc_norm / n, "num_items": n}, samples


def eval_generation(
    ckpt: Checkpoint, items: list[GenItem], spec: TaskSpec, cfg: EvalConfig
) -> tuple[dict, list[dict]]:
    from lmforge.engine.engine import EngineConfig, LLMEngine
    from lmforge.engine.types import SamplingParams
    from lmforge.models.kv_cache import KVCache

    tok = ckpt.tokenizer
    n = min(len(items), cfg.limit or len(items))
    max_new = cfg.max_new_tokens or spec.max_new_tokens
    room = ckpt.config.max_seq_len - max_new
    if room < 1:
        raise UserError(f"max_new_tokens ({max_new}) leaves no room for a prompt in the model's context")
    prompts = [tasks.generation_prompt(tok, items, i, cfg.num_fewshot, cfg.seed, cfg.chat) for i in range(n)]
    # chat templates emit real special tokens; plain prompts are text only
    ids = [
        tok.encode(p, add_bos=not cfg.chat and tok.add_bos_token, parse_special=cfg.chat)[-room:]
        for p in prompts
    ]
    # enough cache for a full batch of the longest request, so nothing is preempted
    per_token = KVCache.bytes_per_token(ckpt.config, ckpt.model.lm_head.weight.dtype)
    need = cfg.batch_size * (max(map(len, ids)) + max_new + 16) * per_token
    engine = LLMEngine(
        ckpt.model,
        EngineConfig(max_num_seqs=cfg.batch_size, kv_cache_mb=max(need / 2**20, 1.0)),
        eos_ids=ckpt.eos_ids,
    )
    params = SamplingParams(max_tokens=max_new, temperature=0)
    outputs: list[list[int]] = []
    chunk = cfg.batch_size * 4  # several engine batches per progress update
    with _progress(cfg.progress, "generation", n) as advance:
        for lo in range(0, n, chunk):
            outputs += engine.generate(ids[lo : lo + chunk], params)
            advance(len(ids[lo : lo + chunk]))
    preds = [truncate(tok.decode(o, skip_special_tokens=True), spec.until) for o in outputs]
    refs = [items[i].reference for i in range(n)]
    scores = {
        "exact_match": metrics.exact_match(preds, refs),
        "contains_match": metrics.contains_match(preds, refs),
        "bleu": metrics.bleu(preds, refs, tokenize=spec.bleu_tokenize),
        "chrf": metrics.chrf(preds, refs),
        "num_items": n,
    }
    samples = [
        {"prompt": p, "reference": r, "prediction": y} for p, r, y in zip(prompts, refs, preds, strict=True)
    ]
    return scores, samples


def truncate(text: str, until: tuple[str, ...]) -> str:
    """Text before the first stop string (the engine stops on tokens; stop strings are ours)."""
    cut = min((i for s in until if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


@contextmanager
def _progress(enabled: bool, description: str, total: int) -> Iterator[Callable[[int], None]]:
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


# ---------------------------------------------------------------------------------------------- reports


def write_reports(out: Path, results: dict[str, Any], samples: dict[str, list[dict]]) -> None:
    (out / "samples").mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out / "report.md").write_text(markdown_report(results), encoding="utf-8")
    for name, rows in samples.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (out / "samples" / f"{_file_name(name)}.jsonl").write_text(text, encoding="utf-8")


def _file_name(task: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", task)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def markdown_report(results: dict[str, Any]) -> str:
    cfg = results["config"]
    lines = [
        f"# Evaluation of {results['model']}",
        "",
        f"- model: `{results['model_path']}` ({results['dtype']} on {results['device']})",
        f"- created: {results['created_at']}, lmforge {results['lmforge_version']}",
        f"- max_length {cfg['max_length']}, stride {cfg['stride']}, few-shot {cfg['num_fewshot']}, "
        f"seed {cfg['seed']}, limit {cfg['limit']}, chat {cfg['chat']}",
        "",
        "| task | type | main metric | value | all metrics |",
        "|---|---|---|---|---|",
    ]
    for name, t in results["tasks"].items():
        others = ", ".join(f"{k} {_fmt(v)}" for k, v in t["metrics"].items() if k != t["main_metric"])
        lines.append(
            f"| {name} | {t['type']} | {t['main_metric']} | {_fmt(t['metrics'][t['main_metric']])} | {others} |"
        )
    lines += ["", *(f"- **{name}**: {t['description']}" for name, t in results["tasks"].items()), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- compare


def compare(run_dirs: list[str | Path], out_png: str | Path | None = None) -> str:
    """One markdown table (runs x tasks, each task's main metric) and, with out_png, a bar chart per task."""
    runs = []
    for d in run_dirs:
        path = Path(d) / "results.json"
        if not path.is_file():
            raise UserError(f"{d} is not an eval run folder (no results.json)")
        try:
            runs.append((Path(d), json.loads(path.read_text(encoding="utf-8"))))
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e.msg})") from None
    if not runs:
        raise UserError("compare needs at least one run folder")
    names = [r["model"] for _, r in runs]
    # the same model twice (e.g. before/after fine-tuning under one name): tell rows apart by folder
    labels = [f"{n} ({d.name})" if names.count(n) > 1 else n for n, (d, _) in zip(names, runs, strict=True)]
    task_names: list[str] = []
    for _, r in runs:
        task_names += [t for t in r["tasks"] if t not in task_names]
    main = {}
    for t in task_names:
        main[t] = next(r["tasks"][t]["main_metric"] for _, r in runs if t in r["tasks"])
    header = [f"{t} ({main[t]}{' ↓' if main[t] in tasks.LOWER_IS_BETTER else ''})" for t in task_names]
    lines = ["| model | " + " | ".join(header) + " |", "|---" * (len(task_names) + 1) + "|"]
    values: dict[str, list[float | None]] = {t: [] for t in task_names}
    for label, (_, r) in zip(labels, runs, strict=True):
        cells = []
        for t in task_names:
            v = r["tasks"][t]["metrics"].get(main[t]) if t in r["tasks"] else None
            values[t].append(v)
            cells.append("–" if v is None else _fmt(v))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if out_png is not None:
        _bar_chart(Path(out_png), labels, task_names, main, values)
    return "\n".join(lines) + "\n"


def _bar_chart(
    out_png: Path, labels: list[str], task_names: list[str], main: dict[str, str], values: dict[str, list]
) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and safe off the main thread
    import matplotlib.pyplot as plt

    # one panel per task: metrics differ in scale and direction
    fig, axes = plt.subplots(1, len(task_names), figsize=(3.2 * len(task_names) + 1, 3.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, t in zip(axes[0], task_names, strict=True):
        ys = [float("nan") if v is None else v for v in values[t]]
        ax.bar(range(len(labels)), ys, color=[colors[i % len(colors)] for i in range(len(labels))])
        arrow = " (lower is better)" if main[t] in tasks.LOWER_IS_BETTER else ""
        ax.set_title(f"{t}\n{main[t]}{arrow}", fontsize=9)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    atomic.save_figure(fig, out_png)
