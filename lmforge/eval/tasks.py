"""Evaluation tasks: the four task types, the built-in smoke tasks, and loading/validating task files.

File formats (JSON Lines, one object per line, blank lines skipped):
  multiple_choice  {"context": str, "choices": [str, ...], "gold": int}  — gold indexes choices
  generation       {"prompt": str, "reference": str}
  classification   {"text": str, "label": str | int}
  perplexity       a .txt file (one document), .jsonl of {"text": str} (one document per line), or a .npy
                   1-D array of token ids (prepared shards; scored as one stream, bytes from decoding)
Errors name the file, line and field (`UserError`), so a bad line is found without a traceback.

Multiple choice builds lm-evaluation-harness's requests: each choice becomes the continuation
`" " + choice` of the context; few-shot examples (context + " " + gold choice) come from the same file
excluding the current item, drawn by a `random.Random` seeded with (seed, item index), joined with "\n\n".
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace
from importlib.resources import files
from pathlib import Path
from typing import Any

from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError

TASK_TYPES = ("perplexity", "multiple_choice", "generation", "classification")
# The number a task is ranked by (compare's table and chart); lower is better only for perplexity's.
MAIN_METRIC = {
    "perplexity": "bits_per_byte",
    "multiple_choice": "acc_norm",
    "generation": "exact_match",
    "classification": "accuracy",
}
LOWER_IS_BETTER = {"bits_per_byte", "loss", "perplexity"}
TARGET_DELIMITER = " "  # between a context and its choice/reference, as in lm-evaluation-harness
FEWSHOT_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    type: str
    path: Path
    description: str = ""
    main_metric: str = ""  # "" -> MAIN_METRIC[type]
    max_new_tokens: int = 64  # generation
    until: tuple[str, ...] = ("\n",)  # generation: the answer ends at the first of these strings
    bleu_tokenize: str = "13a"  # sacrebleu tokenizer; "zh" when references are Chinese
    builtin: bool = False

    def __post_init__(self) -> None:
        if self.type not in TASK_TYPES:
            raise UserError(f"unknown task type {self.type!r}; use one of {', '.join(TASK_TYPES)}")
        if not self.main_metric:
            object.__setattr__(self, "main_metric", MAIN_METRIC[self.type])


@dataclass(frozen=True)
class MCItem:
    context: str
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class GenItem:
    prompt: str
    reference: str


@dataclass(frozen=True)
class ClassItem:
    text: str
    label: str | int


@dataclass(frozen=True)
class PPLData:
    texts: list[str] = field(default_factory=list)  # documents, or
    token_ids: list[int] | None = None  # one prepared token stream


def builtin_dir() -> Path:
    return Path(str(files("lmforge.eval") / "builtin"))


_SMOKE = "Smoke-level built-in (a few dozen hand-written items; checks the pipeline, not a benchmark): "

BUILTIN: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "arith",
            "generation",
            Path("arith.jsonl"),
            _SMOKE + "one-step arithmetic word problems, answer is a number; exact match after stripping.",
            max_new_tokens=16,
        ),
        TaskSpec(
            "shop-faq",
            "multiple_choice",
            Path("shop-faq.jsonl"),
            _SMOKE + "a fictional shop's FAQ: the context states a policy, pick the answer it supports.",
        ),
        TaskSpec(
            "en-zh",
            "generation",
            Path("en-zh.jsonl"),
            _SMOKE + "short English<->Chinese phrase translation; chrF (BLEU with sacrebleu's zh tokenizer).",
            main_metric="chrf",
            max_new_tokens=32,
            bleu_tokenize="zh",
        ),
        TaskSpec(
            "wiki-ppl",
            "perplexity",
            Path("wiki-ppl.jsonl"),
            _SMOKE + "short encyclopedia-style paragraphs written for lmforge; bits per byte.",
        ),
    )
}


def resolve_tasks(
    tasks: list[str] | tuple[str, ...], data: list[str] | tuple[str, ...] = ()
) -> list[TaskSpec]:
    """Task names -> specs: a built-in name, or a task type paired in order with the next --data file."""
    if not tasks:
        raise UserError(f"no task given; pass --task with a built-in ({', '.join(BUILTIN)}) or a task type")
    data_files = list(data)
    specs = []
    for name in tasks:
        if name in BUILTIN:
            spec = BUILTIN[name]
            specs.append(replace(spec, path=builtin_dir() / spec.path, builtin=True))
        elif name in TASK_TYPES:
            if not data_files:
                raise UserError(f"task type {name!r} needs a data file: pass --data FILE for it")
            path = Path(data_files.pop(0)).expanduser()
            if not path.is_file():
                raise UserError(f"data file {path} does not exist")
            specs.append(TaskSpec(f"{name}:{path.stem}", name, path, f"{name} on {path}"))
        else:
            known = ", ".join([*BUILTIN, *TASK_TYPES])
            raise UserError(f"unknown task {name!r}; use a built-in or a task type with --data ({known})")
    if data_files:
        raise UserError(f"{len(data_files)} --data file(s) left over: each needs a --task TYPE before it")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise UserError(f"task {next(n for n in names if names.count(n) > 1)!r} is given twice")
    return specs


# ---------------------------------------------------------------------------------------------- loading


def load(spec: TaskSpec) -> list[MCItem] | list[GenItem] | list[ClassItem] | PPLData:
    loader = {
        "multiple_choice": load_multiple_choice,
        "generation": load_generation,
        "classification": load_classification,
        "perplexity": load_perplexity,
    }[spec.type]
    return loader(spec.path)


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; UserError naming the line for anything else."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"task file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        rows.append((n, obj))
    if not rows:
        raise UserError(f"task file {path} is empty: it needs at least one JSON object per line")
    return rows


def _field(path: Path, n: int, obj: dict, name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in obj:
        raise UserError(f"{path}:{n}: missing field {name!r}")
    value = obj[name]
    # bool is an int subclass; true/false is never a valid index or label here
    if not isinstance(value, kind) or isinstance(value, bool):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise UserError(f"{path}:{n}: field {name!r} must be {names}, got {type(value).__name__}")
    return value


def load_multiple_choice(path: Path) -> list[MCItem]:
    items = []
    for n, obj in read_jsonl(path):
        context = _field(path, n, obj, "context", str)
        choices = _field(path, n, obj, "choices", list)
        if len(choices) < 2:
            raise UserError(f"{path}:{n}: field 'choices' needs at least 2 choices, got {len(choices)}")
        for j, c in enumerate(choices):
            if not isinstance(c, str) or not c:
                raise UserError(f"{path}:{n}: field 'choices' item {j} must be a non-empty string")
        gold = _field(path, n, obj, "gold", int)
        if not 0 <= gold < len(choices):
            raise UserError(
                f"{path}:{n}: field 'gold' is {gold}, out of range for {len(choices)} choices (0-{len(choices) - 1})"
            )
        items.append(MCItem(context, tuple(choices), gold))
    return items


def load_generation(path: Path) -> list[GenItem]:
    return [
        GenItem(_field(path, n, obj, "prompt", str), _field(path, n, obj, "reference", str))
        for n, obj in read_jsonl(path)
    ]


def load_classification(path: Path) -> list[ClassItem]:
    return [
        ClassItem(_field(path, n, obj, "text", str), _field(path, n, obj, "label", (str, int)))
        for n, obj in read_jsonl(path)
    ]


def load_perplexity(path: Path) -> PPLData:
    path = Path(path)
    if path.suffix == ".npy":
        import numpy as np

        arr = np.load(path, allow_pickle=False)
        if arr.ndim != 1 or arr.dtype.kind not in "iu" or arr.size < 2:
            raise UserError(
                f"{path}: expected a 1-D integer array of at least 2 token ids, got {arr.dtype} {arr.shape}"
            )
        return PPLData(token_ids=arr.astype("int64").tolist())
    if path.suffix == ".jsonl":
        return PPLData([_field(path, n, obj, "text", str) for n, obj in read_jsonl(path)])
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"text file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise UserError(f"text file {path} is empty")
    return PPLData([text])


# ---------------------------------------------------------------------------------------------- prompts


def fewshot_indices(n_items: int, i: int, k: int, seed: int) -> list[int]:
    """k indices of other items, the same for the same (seed, i) on every run and machine."""
    others = [j for j in range(n_items) if j != i]
    return random.Random(f"{seed}:{i}").sample(others, min(k, len(others)))


def mc_context(items: list[MCItem], i: int, k: int, seed: int) -> str:
    shots = [
        items[j].context + TARGET_DELIMITER + items[j].choices[items[j].gold]
        for j in fewshot_indices(len(items), i, k, seed)
    ]
    return FEWSHOT_SEPARATOR.join([*shots, items[i].context])


def encode_pair(
    tokenizer: Tokenizer, context: str, continuation: str, prefix_id: int | None
) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's split: trailing spaces of the context move to the continuation; encode context and
    context + continuation; the continuation's tokens are the tail. An empty context becomes the prefix token."""
    if not context:
        cont = tokenizer.encode(continuation, parse_special=False)
        if prefix_id is None:
            raise UserError(
                "an empty context needs a BOS or EOS token to condition on; this tokenizer has neither"
            )
        return [prefix_id], cont
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation, parse_special=False)
    ctx = tokenizer.encode(context, parse_special=False)
    return ctx, whole[len(ctx) :]


def generation_prompt(
    tokenizer: Tokenizer, items: list[GenItem], i: int, k: int, seed: int, chat: bool
) -> str:
    """Plain: few-shot "prompt reference" blocks joined by blank lines, then the prompt. Chat: the same shots as
    user/assistant turns, rendered with the model's chat template."""
    shots = [items[j] for j in fewshot_indices(len(items), i, k, seed)]
    if chat:
        messages = []
        for s in shots:
            messages += [{"role": "user", "content": s.prompt}, {"role": "assistant", "content": s.reference}]
        messages.append({"role": "user", "content": items[i].prompt})
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    blocks = [s.prompt + TARGET_DELIMITER + s.reference for s in shots]
    return FEWSHOT_SEPARATOR.join([*blocks, items[i].prompt])
