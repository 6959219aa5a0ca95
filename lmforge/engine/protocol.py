"""The seam between the server and the engine: all the server sees (vLLM's `EngineClient`, smaller)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractContextManager
from typing import Protocol, TypeVar, runtime_checkable

from lmforge.engine.types import EngineStats, ModelInfo, RequestOutput, SamplingParams

T = TypeVar("T")


@runtime_checkable
class EngineClient(Protocol):
    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        request_id: str,
        *,
        salt: str = "",
        lora: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; the last has finished=True. Raises UserError for a prompt that can never
        run (too long for the context or the cache) or an adapter not in `model_info().loras`,
        EngineOverloaded when the queue is full, EngineDraining while shutting down. `salt` keeps prefix-cache
        sharing within one tenant; `lora` names the LoRA adapter to apply (None = the base model). Closing the
        iterator early (client gone) aborts the request."""
        ...

    def arriving(self) -> AbstractContextManager[None]:
        """Held by the server while a request is on its way to `generate` (its prompt being rendered, its admit
        waiting for the ledger): an idle engine gathering a burst of requests waits for it, briefly."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a request; its cache is freed within one engine step. Unknown ids are ignored."""
        ...

    async def run(self, fn: Callable[[], T]) -> T:
        """fn() on the thread that runs the engine's torch work, between steps: other torch work of the server
        (a classifier served beside the model) goes here, so that the process keeps one OpenMP team (see
        `runtime.run_in_thread`). Raises EngineDraining when the engine is not running."""
        ...

    def health(self) -> EngineStats: ...

    def model_info(self) -> ModelInfo: ...
