"""LLMEngine: continuous batching over the paged KV cache, synchronous. One step is

    schedule -> run the model on every scheduled token -> sample where a sequence's known tokens are done -> update

Token ids in, token ids out: tokenising, chat templates, detokenising and stop strings belong to the server.
`AsyncEngine` (client.py) runs `step()` on its own thread for the server.

LoRA adapters (`add_lora`) are served side by side over the one base model: each request names its adapter
(or none), and one forward pass applies each adapter to its own requests' tokens (`MultiLoRA`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.engine.block_manager import BlockManager
from lmforge.engine.generate import check_prompt
from lmforge.engine.sampling import SamplingTensors, sample, token_counts, token_mask
from lmforge.engine.scheduler import Scheduler, SeqState
from lmforge.engine.types import EngineStats, RequestOutput, SamplingParams, TokenLogprob
from lmforge.errors import UserError
from lmforge.models import kernels
from lmforge.models.gpt import GPT
from lmforge.models.kv_cache import CacheBatch, DenseDecode, KVCache
from lmforge.models.layers import pack_linears, packed_weights
from lmforge.models.lora import MultiLoRA


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 64  # sequences decoded together
    max_num_batched_tokens: int = 512  # tokens per step: bounds a step's latency, chunks long prompts
    kv_cache_mb: float = 1024.0  # memory for keys and values; sets how many tokens can be in flight
    block_size: int = 16
    enable_prefix_caching: bool = True
    long_prefill_token_threshold: int = 0  # > 0: cap one prompt's chunk per step (fairness to decodes)
    # oneDNN-packed copies of the linear weights (CPU fp32; layers.Linear.pack): decode steps 1.14-1.27x faster,
    # one more copy of the weights in memory
    pack_weights: bool = True
    # a dense copy of the decoding sequences' contexts (kv_cache.DenseDecode), so that batched decode attention
    # reads a view instead of gathering them from the paged cache every step; None: a quarter of kv_cache_mb on
    # top of it, 0: off (always gather)
    dense_decode_mb: float | None = None
    # norms, SwiGLU and the dense decode attention as fused C kernels (models/kernels.py: CPU, fp32, built with
    # the system's C compiler on first use): a 16-sequence step 1.12x faster; where they cannot load, PyTorch's ops
    fused_kernels: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1 or self.block_size < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens and block_size must be at least 1")
        if not (0 < self.kv_cache_mb < math.inf):
            raise ValueError(f"kv_cache_mb must be a positive number, got {self.kv_cache_mb}")
        if self.dense_decode_mb is not None and not (0 <= self.dense_decode_mb < math.inf):
            raise ValueError(
                f"dense_decode_mb must be 0 (off) or a positive number, got {self.dense_decode_mb}"
            )


@dataclass
class _Request:
    seq: SeqState
    params: SamplingParams
    stop_ids: frozenset[int]
    generator: torch.Generator | None
    lora: int = -1  # adapter slot in the engine's MultiLoRA; -1 = the base model
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    started: bool = False
    serial: int = 0  # unique per request, unlike its id (reusable once finished): keys its dense-copy row


class LLMEngine:
    def __init__(
        self, model: GPT, config: EngineConfig = EngineConfig(), *, eos_ids: frozenset[int] = frozenset()
    ):
        self.model = model.eval()
        if config.pack_weights:
            pack_linears(self.model)
        self.config = config
        self.eos_ids = eos_ids
        self.model_config = model.config
        param = model.lm_head.weight
        self.device, self.dtype = param.device, param.dtype
        self.cache = KVCache.from_budget(
            model.config,
            int(config.kv_cache_mb * 2**20),
            config.block_size,
            dtype=self.dtype,
            device=self.device,
        )
        dense_mb = config.kv_cache_mb / 4 if config.dense_decode_mb is None else config.dense_decode_mb
        self.dense = DenseDecode(self.cache, int(dense_mb * 2**20), max_rows=config.max_num_seqs)
        self._serials = itertools.count()
        self.block_manager = BlockManager(
            self.cache.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            config.long_prefill_token_threshold,
        )
        self.requests: dict[str, _Request] = {}
        self.loras: MultiLoRA | None = None  # created by the first add_lora: no adapters, no swapped layers
        self.fused_kernels = config.fused_kernels and kernels.suited(param)
        if self.fused_kernels:
            kernels.lib()  # built (once per machine) or loaded now, not in the first request's step

    # -- adapters --------------------------------------------------------------------------------------------

    def add_lora(self, name: str, path: str | Path) -> None:
        """Load the PEFT adapter folder at `path`, to be requested as `lora=name`. Call it before serving
        (not while another thread runs `step()`): loading swaps the model's layers."""
        if self.loras is None:
            self.loras = MultiLoRA(self.model)
        self.loras.add(name, path)
        if self.config.pack_weights:  # the wrapped projections leave their Fused copies: pack them one by one
            pack_linears(self.model)

    @property
    def lora_names(self) -> tuple[str, ...]:
        return () if self.loras is None else tuple(self.loras.names)

    def _lora_slot(self, lora: str | None) -> int:
        if lora is None:
            return -1
        if self.loras is None:
            raise UserError(f"no LoRA adapter named {lora!r} is loaded (loaded: none)")
        return self.loras.slot(lora)

    # -- requests --------------------------------------------------------------------------------------------

    def check_request(
        self, prompt_ids: Sequence[int], params: SamplingParams, lora: str | None = None
    ) -> None:
        """Raise UserError for a request that can never run (too long for the context or the whole cache,
        or an adapter that is not loaded)."""
        self._lora_slot(lora)
        check_prompt(prompt_ids, self.model_config.max_seq_len)
        capacity = self.block_manager.capacity_tokens
        if len(prompt_ids) >= capacity:
            raise UserError(
                f"the prompt is {len(prompt_ids)} tokens but the KV cache holds {capacity}; "
                "shorten the prompt or start the server with a larger --kv-cache-mb"
            )

    def add_request(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        salt: str = "",
        lora: str | None = None,
    ) -> None:
        """Queue a request. `salt` (the tenant) and `lora` (an adapter from add_lora; None = the base model)
        both namespace the prefix cache: blocks are shared only between requests with equal salt and adapter,
        since an adapter changes every layer's keys and values."""
        self.check_request(prompt_ids, params, lora)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if "\x00" in salt:
            raise ValueError("a cache salt may not contain NUL (it separates the adapter name)")
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        gen = None if params.seed is None else torch.Generator(self.device).manual_seed(params.seed)
        cache_salt = salt if lora is None else f"{salt}\x00lora:{lora}"
        seq = SeqState(request_id, list(prompt_ids), salt=cache_salt)
        self.scheduler.add(seq)
        self.requests[request_id] = _Request(
            seq, params, stop_ids, gen, self._lora_slot(lora), serial=next(self._serials)
        )

    def abort(self, request_id: str) -> None:
        if self.requests.pop(request_id, None) is not None:
            self.scheduler.abort(request_id)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    def stats(self, *, ready: bool = True, draining: bool = False) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            ready=ready,
            draining=draining,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=bm.usage,
            prefix_cache_queries=bm.prefix_cache_queries,
            prefix_cache_hits=bm.prefix_cache_hits,
            num_preemptions=self.scheduler.num_preemptions,
        )

    # -- the loop --------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        outputs = [self._finish(rid, "length") for rid in sched.out_of_cache if rid in self.requests]
        if not sched.scheduled:
            return outputs
        scheduled = sched.scheduled
        if self.loras is not None:  # each adapter's tokens side by side (one slice of rows); sched follows
            scheduled.sort(key=lambda s: self.requests[s.request_id].lora)

        ids, positions, token_loras, sample_rows, sampled = [], [], [], [], []
        start = 0
        for s in scheduled:
            req = self.requests[s.request_id]
            if not req.started:  # first step after admission: the prefix-cache hit is known
                req.started, req.num_cached_tokens = True, s.num_cached
            lo, hi = s.num_cached, s.num_cached + s.num_new_tokens
            ids.extend(req.seq.all_token_ids[lo:hi])
            positions.extend(range(lo, hi))
            token_loras.extend([req.lora] * s.num_new_tokens)
            start += s.num_new_tokens
            if s.sample:
                sample_rows.append(start - 1)
                sampled.append(req)
        batch = CacheBatch.build(
            sched.block_tables, sched.num_cached, sched.num_new, self.cache.block_size, self.device,
            self.model_config.sliding_window,
        )  # fmt: skip
        try:
            self.dense.plan(
                [self.requests[scheduled[i].request_id].serial for i in batch.decode_index], batch
            )
            with self._adapters(token_loras), packed_weights(self.fused_kernels):
                logits = self.model(
                    torch.tensor(ids, dtype=torch.long, device=self.device),
                    positions=torch.tensor(positions, dtype=torch.long, device=self.device),
                    cache=self.cache,
                    batch=batch,
                    logits_rows=torch.tensor(sample_rows, dtype=torch.long, device=self.device),
                )
        except BaseException:
            self.dense.clear()  # its rows may hold part of this step (copy-ins, some layers' appends)
            raise
        tokens = self._sample(logits, sampled) if sampled else {}

        for s in scheduled:
            req = self.requests[s.request_id]
            new = tokens.get(s.request_id)
            self.scheduler.update(s.request_id, None if new is None else new.token_id)
            if new is not None:
                outputs.append(self._output(req, new))
        return outputs

    def _adapters(self, token_loras: list[int]) -> contextlib.AbstractContextManager:
        """Each token through its request's adapter for this forward pass; nothing to do when no token has one."""
        if self.loras is None or max(token_loras) < 0:
            return contextlib.nullcontext()
        return self.loras.activate(token_loras)

    def _sample(self, logits: torch.Tensor, reqs: list[_Request]) -> dict[str, TokenLogprob]:
        params = [r.params for r in reqs]
        st = SamplingTensors.from_params(params, self.device)
        vocab = logits.shape[-1]
        counts = prompt_mask = None
        if st.any_penalties:
            counts = token_counts([r.seq.output_ids for r in reqs], vocab, self.device)
        if st.any_repetition_penalty:
            prompt_mask = token_mask([r.seq.prompt_ids for r in reqs], vocab, self.device)
        k = max(p.logprobs or 0 for p in params)
        want = any(p.logprobs is not None for p in params)
        res = sample(
            logits, st, [r.generator for r in reqs], counts, prompt_mask, num_logprobs=k, logprobs=want
        )
        token_ids = res.token_ids.tolist()
        logprobs = res.logprobs.tolist() if res.logprobs is not None else [0.0] * len(reqs)  # unreported
        top_ids = res.top_ids.tolist() if res.top_ids is not None else None
        top_lps = res.top_logprobs.tolist() if res.top_logprobs is not None else None
        out = {}
        for i, r in enumerate(reqs):
            n = r.params.logprobs or 0
            top = list(zip(top_ids[i][:n], top_lps[i][:n], strict=True)) if n and top_ids else []
            out[r.seq.request_id] = TokenLogprob(token_ids[i], logprobs[i], top)
        return out

    def _output(self, req: _Request, new: TokenLogprob) -> RequestOutput:
        seq, params = req.seq, req.params
        n_out = len(seq.output_ids)
        reason = None
        if new.token_id in req.stop_ids:
            reason = "stop"
        elif n_out >= params.max_tokens or seq.num_tokens >= self.model_config.max_seq_len:
            reason = "length"
        out = RequestOutput(
            request_id=seq.request_id,
            new_token_ids=[new.token_id],
            num_prompt_tokens=len(seq.prompt_ids),
            num_output_tokens=n_out,
            finished=reason is not None,
            finish_reason=reason,
            new_logprobs=[new] if params.logprobs is not None else None,
            num_cached_tokens=req.num_cached_tokens,
        )
        if reason is not None:
            self.requests.pop(seq.request_id)
            self.scheduler.finish(seq.request_id)
        return out

    def _finish(self, request_id: str, reason: str) -> RequestOutput:
        req = self.requests.pop(request_id)
        self.scheduler.finish(request_id)
        seq = req.seq
        return RequestOutput(
            request_id,
            [],
            len(seq.prompt_ids),
            len(seq.output_ids),
            True,
            reason,
            None,
            req.num_cached_tokens,
        )

    # -- convenience -----------------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
        loras: Sequence[str | None] | None = None,
    ) -> list[list[int]]:
        """Run prompts to completion together, each with its adapter (`loras`, default none); output token ids
        in prompt order (tests, benchmarks, eval)."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        llist = [None] * len(prompts) if loras is None else list(loras)
        base = f"gen-{time.monotonic_ns()}"
        for i, (p, sp, lora) in enumerate(zip(prompts, plist, llist, strict=True)):
            self.add_request(f"{base}-{i}", p, sp, lora=lora)
        results: dict[str, list[int]] = {f"{base}-{i}": [] for i in range(len(prompts))}
        while self.has_unfinished:
            for out in self.step():
                if out.request_id in results:
                    results[out.request_id].extend(out.new_token_ids)
        return [results[f"{base}-{i}"] for i in range(len(prompts))]
