"""Single-sequence generation over the paged KV cache: the CLI's generator and the engine's slow twin.

`generate` is the reference that the batched engine is tested against; `generate` itself is tested against a
full causal forward without a cache (tests/models/test_smollm2.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from lmforge.engine.sampling import SamplingTensors, sample, token_counts, token_mask, update_counts
from lmforge.engine.types import SamplingParams
from lmforge.errors import UserError
from lmforge.models import kernels
from lmforge.models.gpt import GPT
from lmforge.models.kv_cache import CacheBatch, KVCache
from lmforge.models.layers import pack_linears, packed_weights


@dataclass
class GeneratedToken:
    id: int
    logprob: float
    finish_reason: str | None = None  # "stop" (eos / stop token) or "length" on the last token
    top_ids: list[int] | None = None
    top_logprobs: list[float] | None = None


def check_prompt(prompt_ids: Sequence[int], max_seq_len: int) -> None:
    if not prompt_ids:
        raise UserError("the prompt is empty; give at least one token of text")
    if len(prompt_ids) >= max_seq_len:
        raise UserError(
            f"the prompt is {len(prompt_ids)} tokens but the model's context is {max_seq_len} tokens; shorten it "
            f"by at least {len(prompt_ids) - max_seq_len + 1} tokens to leave room for one generated token"
        )


@torch.inference_mode()
def generate(
    model: GPT,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    *,
    eos_ids: frozenset[int] = frozenset(),
    block_size: int = 16,
    prefill_chunk: int = 2048,
) -> Iterator[GeneratedToken]:
    """Yield generated tokens one by one; the last one carries its finish reason."""
    cfg = model.config
    check_prompt(prompt_ids, cfg.max_seq_len)
    pack_linears(model)  # as the engine does: the same kernels, so the same tokens as the engine's
    device = model.lm_head.weight.device
    dtype = model.lm_head.weight.dtype
    max_new = min(params.max_tokens, cfg.max_seq_len - len(prompt_ids))
    total = len(prompt_ids) + max_new
    cache = KVCache(
        cfg, num_blocks=-(-total // block_size), block_size=block_size, dtype=dtype, device=device
    )
    table = list(range(cache.num_blocks))  # contiguous: attention reads the cache through views
    stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))

    st = SamplingTensors.from_params([params], device)
    gen = None if params.seed is None else torch.Generator(device).manual_seed(params.seed)
    counts = token_counts([[]], cfg.vocab_size, device) if st.any_penalties else None
    prompt_mask = token_mask([prompt_ids], cfg.vocab_size, device) if st.any_repetition_penalty else None

    kernels_ok = kernels.suited(model.lm_head.weight)
    ids = torch.tensor(prompt_ids, dtype=torch.long, device=device)
    done = 0
    while done < len(ids):  # prefill in chunks so a long prompt's attention scores stay bounded
        n = min(prefill_chunk, len(ids) - done)
        batch = CacheBatch.build([table], [done], [n], block_size, device, cfg.sliding_window)
        pos = torch.arange(done, done + n, device=device)
        with packed_weights(fused_kernels=kernels_ok):
            logits = model(
                ids[done : done + n],
                positions=pos,
                cache=cache,
                batch=batch,
                logits_rows=torch.tensor([n - 1]),
            )
        done += n

    for step in range(max_new):
        res = sample(logits, st, [gen], counts, prompt_mask, num_logprobs=params.logprobs or 0)
        token = int(res.token_ids[0])
        finish = "stop" if token in stop_ids else ("length" if step == max_new - 1 else None)
        yield GeneratedToken(
            token,
            float(res.logprobs[0]),
            finish,
            None if res.top_ids is None else res.top_ids[0].tolist(),
            None if res.top_logprobs is None else res.top_logprobs[0].tolist(),
        )
        if finish is not None:
            return
        if counts is not None:
            update_counts(counts, res.token_ids)
        pos = len(prompt_ids) + step
        batch = CacheBatch.build([table], [pos], [1], block_size, device, cfg.sliding_window)
        # not around the yield: the caller's code runs between tokens
        with packed_weights(fused_kernels=kernels_ok):
            logits = model(
                res.token_ids, positions=torch.tensor([pos], device=device), cache=cache, batch=batch
            )
