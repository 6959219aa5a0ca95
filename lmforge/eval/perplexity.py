"""Perplexity with a sliding window, batched over windows.

The window rule is HF's perplexity guide ("Perplexity of fixed-length models"): windows of `max_length` tokens
start every `stride` tokens; each window scores only the tokens the previous window did not reach, so every
token is scored exactly once, with up to `max_length - 1` tokens of left context (at least
`max_length - stride` once the first window is full). A large stride is fast with less context (it is capped
at max_length - 1: the first scored token of a window needs a token before it); a small stride is slower and
closer to the model's true perplexity.

Each document is prefixed with one token (BOS, else EOS — lm-evaluation-harness's `prefix_token_id`) so its
first real token is scored too; then the scored text is the whole document and

    loss = total NLL / tokens,  perplexity = exp(loss),  bits per byte = total NLL / ln 2 / UTF-8 bytes,

the last being comparable across tokenizers. `train` imports this module for its validation loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from lmforge.data.tokenizer import Tokenizer
from lmforge.models.gpt import GPT


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) of a sequence go in; targets at positions [score_from, end) are scored."""

    begin: int
    end: int
    score_from: int


@dataclass(frozen=True)
class PerplexityResult:
    loss: float  # mean NLL per scored token, nats
    perplexity: float
    bits_per_byte: float | None  # None when the byte count is unknown
    num_tokens: int
    num_bytes: int | None
    num_windows: int
    total_nll: float

    def to_dict(self) -> dict:
        return asdict(self)


def windows(n: int, max_length: int, stride: int) -> list[Window]:
    """Sliding windows over a sequence of n tokens whose targets are positions 1..n-1 (0 is only context)."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    # a step of max_length would leave each later window's first target with no context inside the window
    step = min(stride, max_length - 1)
    out: list[Window] = []
    prev_end, begin = 1, 0
    while n > 1:
        end = min(begin + max_length, n)
        if end > prev_end:
            out.append(Window(begin, end, prev_end))
        prev_end = end
        if end == n:
            break
        begin += step
    return out


def prefix_token_id(tokenizer: Tokenizer) -> int | None:
    return tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id


@torch.inference_mode()
def sequence_nll(
    model: GPT,
    sequences: Sequence[Sequence[int]],
    *,
    max_length: int,
    stride: int,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> list[tuple[float, int, int]]:
    """(summed NLL in nats, scored tokens, windows) per sequence; position 0 of each sequence is not scored."""
    jobs = [(i, w) for i, seq in enumerate(sequences) for w in windows(len(seq), max_length, stride)]
    nll = [0.0] * len(sequences)
    count = [0] * len(sequences)
    nwin = [0] * len(sequences)
    device = model.lm_head.weight.device
    for lo in range(0, len(jobs), batch_size):
        batch = jobs[lo : lo + batch_size]
        width = max(w.end - w.begin for _, w in batch)
        # right padding is safe: attention is causal, so pad tokens never reach the scored positions
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (i, w) in enumerate(batch):
            ids[row, : w.end - w.begin] = torch.tensor(sequences[i][w.begin : w.end])
        ids = ids.to(device)
        logprobs = F.log_softmax(model(ids), dim=-1)  # (B, T, V) float32
        for row, (i, w) in enumerate(batch):
            targets = ids[row, w.score_from - w.begin : w.end - w.begin]  # (n,)
            preds = logprobs[row, w.score_from - w.begin - 1 : w.end - w.begin - 1]  # (n, V)
            nll[i] -= preds.gather(-1, targets[:, None]).sum().item()
            count[i] += len(targets)
            nwin[i] += 1
        if on_batch is not None:
            on_batch(len(batch))
    return list(zip(nll, count, nwin, strict=True))


def num_windows(lengths: Sequence[int], max_length: int, stride: int) -> int:
    """How many windows `sequence_nll` will run (for a progress bar)."""
    return sum(len(windows(n, max_length, stride)) for n in lengths)


def summarize(total_nll: float, num_tokens: int, num_bytes: int | None, n_windows: int) -> PerplexityResult:
    loss = total_nll / num_tokens if num_tokens else float("nan")
    bpb = total_nll / math.log(2) / num_bytes if num_bytes else None
    return PerplexityResult(loss, math.exp(loss), bpb, num_tokens, num_bytes, n_windows, total_nll)


def encode_documents(tokenizer: Tokenizer, texts: Sequence[str]) -> tuple[list[list[int]], int]:
    """Token sequences to score (prefix token + text) and the UTF-8 byte count of the scored text."""
    prefix = prefix_token_id(tokenizer)
    encoded = tokenizer.encode_batch(list(texts), parse_special=False)
    num_bytes = 0
    sequences = []
    for text, ids in zip(texts, encoded, strict=True):
        if not ids:
            continue
        if prefix is not None:
            sequences.append([prefix, *ids])
            num_bytes += len(text.encode("utf-8"))
        else:  # no BOS/EOS to condition on: the first token is context only, so its bytes are not scored
            sequences.append(ids)
            num_bytes += len(text.encode("utf-8")) - len(tokenizer.decode(ids[:1]).encode("utf-8"))
    return sequences, num_bytes


def perplexity(
    model: GPT,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    *,
    max_length: int,
    stride: int,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of `texts`, each scored as its own document."""
    sequences, num_bytes = encode_documents(tokenizer, texts)
    return perplexity_of_ids(
        model,
        sequences,
        num_bytes,
        max_length=max_length,
        stride=stride,
        batch_size=batch_size,
        on_batch=on_batch,
    )


def perplexity_of_ids(
    model: GPT,
    sequences: Sequence[Sequence[int]],
    num_bytes: int | None,
    *,
    max_length: int,
    stride: int,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of token sequences (position 0 of each is context only) whose scored text has `num_bytes`."""
    per_seq = sequence_nll(
        model, sequences, max_length=max_length, stride=stride, batch_size=batch_size, on_batch=on_batch
    )
    total = sum(s[0] for s in per_seq)
    tokens = sum(s[1] for s in per_seq)
    return summarize(total, tokens, num_bytes, sum(s[2] for s in per_seq))


@torch.inference_mode()
def loglikelihood(
    model: GPT,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    max_length: int,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether greedy decoding would produce it) per (context, continuation).

    As lm-evaluation-harness: the model sees the last `max_length` tokens of context + continuation minus its
    final token, and the continuation's logprobs are read off the last len(continuation) positions. Requests run
    longest first (less padding; a batch too big for memory fails at once) and come back in input order.
    """
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    device = model.lm_head.weight.device
    for lo in range(0, len(order), batch_size):
        idx = order[lo : lo + batch_size]
        inputs, conts = [], []
        for i in idx:
            ctx, cont = requests[i]
            if not cont:
                raise ValueError(f"request {i} has an empty continuation")
            whole = [*ctx, *cont][-(max_length + 1) :]
            inputs.append(whole[:-1])
            conts.append(list(cont))
        width = max(len(x) for x in inputs)
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        for row, x in enumerate(inputs):
            ids[row, : len(x)] = torch.tensor(x)
        logprobs = F.log_softmax(model(ids.to(device)), dim=-1)  # (B, T, V) float32
        for row, (i, x, cont) in enumerate(zip(idx, inputs, conts, strict=True)):
            lp = logprobs[row, len(x) - len(cont) : len(x)]  # (n_cont, V)
            target = torch.tensor(cont, device=lp.device)
            total = lp.gather(-1, target[:, None]).sum().item()
            greedy = bool((lp.argmax(-1) == target).all())
            out[i] = (total, greedy)
        if on_batch is not None:
            on_batch(len(idx))
    return out
