"""POST /v1/classifications: label probabilities for one text or a list of texts, from a served classifier.

    {"model": "tickets", "input": "My parcel never came"}
    -> {"id": "clf-...", "object": "classification", "model": "tickets",
        "data": [{"index": 0, "label": "shipping", "score": 0.97, "scores": {"billing": 0.01, ...}}],
        "usage": {"prompt_tokens": 6, "total_tokens": 6}}

The classifier (an `engine.Classifier`, `lmforge serve --classifier NAME=PATH`) is served beside the generation
model under its own name. Texts are tokenised as in training (`data.labels.encode_texts`: the tokenizer's BOS,
special-token strings as plain text). Errors are OpenAI's shape: 404 for a model this server does not classify
with, 400 for an empty input, an empty text, too many texts or a text past the context.

Metering: `classification_usage` is what a request is billed for (its texts' tokens; a classifier generates
none); the usage block in the response is that object. On a server with a database the route needs an API key
allowed to use the classifier's name, like the other /v1 routes, and is metered like them: admitted (rate
limits, the budget hold of its prompt tokens) before the classifier runs, then settled completed with the
usage the client is told, or failed (0 tokens: no answer) if classifying raises.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from lmforge.data.tokenizer import Tokenizer
from lmforge.engine import EngineDraining
from lmforge.errors import UserError
from lmforge.serve.auth import ApiKey, AuthError, api_error, check_model, require_admitted_key
from lmforge.serve.deps import ServerState, get_state
from lmforge.serve.errors import APIError
from lmforge.serve.protocol import ErrorResponse
from lmforge.serve.routes.openai import Meter

if TYPE_CHECKING:
    from lmforge.engine import Classifier

MAX_INPUTS = 2048  # texts per request (OpenAI's limit on embedding inputs)

router = APIRouter()


@dataclass(frozen=True)
class ServedClassifier:
    """A classifier served at /v1/classifications: the name clients send, the model, and its tokenizer."""

    name: str
    classifier: Classifier
    tokenizer: Tokenizer


def load_served(spec: str | None, device: str = "auto", dtype: str = "auto") -> ServedClassifier | None:
    """`lmforge serve --classifier NAME=PATH`: the classifier folder at PATH served as NAME (None: no spec)."""
    if spec is None:
        return None
    name, sep, path = spec.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise UserError(f"--classifier takes NAME=PATH (a classifier folder), got {spec!r}")
    from lmforge.engine import Classifier

    folder = Path(path.strip()).expanduser()
    return ServedClassifier(
        name.strip(), Classifier.load(folder, device, dtype), Tokenizer.from_folder(folder)
    )


# --- the wire format ----------------------------------------------------------------------------------


class ClassificationRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    input: str | list[str]
    user: str | None = None


class ClassificationItem(BaseModel):
    index: int
    label: str
    score: float  # the probability of `label`, the most likely one
    scores: dict[str, float]  # every label's probability, in the classifier's label order


class ClassificationUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class Classification(BaseModel):
    id: str
    object: Literal["classification"] = "classification"
    model: str
    data: list[ClassificationItem]
    usage: ClassificationUsage


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 503)
}


# --- the route ----------------------------------------------------------------------------------------


def classification_usage(prompts: list[list[int]]) -> ClassificationUsage:
    """What a classification request costs: the tokens of its texts (it generates none). Metering bills this."""
    prompt_tokens = sum(len(ids) for ids in prompts)
    return ClassificationUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens)


def _served(state: ServerState, model: str) -> ServedClassifier:
    served = state.classifier
    if served is None or model != served.name:
        where = (
            f"this server classifies with '{served.name}'" if served else "this server serves no classifier"
        )
        raise APIError(
            404, f"The model '{model}' does not exist; {where}.", param="model", code="model_not_found"
        )
    return served


def _texts(body: ClassificationRequest) -> list[str]:
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise APIError(
            400, "The input is empty; give a string or a non-empty list of strings.", param="input"
        )
    if len(texts) > MAX_INPUTS:
        raise APIError(400, f"At most {MAX_INPUTS} inputs per request, got {len(texts)}.", param="input")
    for i, text in enumerate(texts):
        if not text.strip():
            where = "The input" if isinstance(body.input, str) else f"Input {i}"
            raise APIError(400, f"{where} is empty.", param="input")
    return texts


def _check_lengths(prompts: list[list[int]], max_seq_len: int) -> None:
    for i, ids in enumerate(prompts):
        if len(ids) > max_seq_len:
            raise APIError(
                400,
                f"This model's maximum context length is {max_seq_len} tokens. However, input {i} resulted in "
                f"{len(ids)} tokens. Please reduce the length of the input.",
                param="input",
                code="context_length_exceeded",
            )


@router.post("/v1/classifications", response_model=Classification, responses=_ERRORS)
async def create_classification(
    body: ClassificationRequest, request: Request, key: ApiKey | None = Depends(require_admitted_key)
) -> Classification:
    state = get_state(request)
    if state.draining:
        raise EngineDraining()
    served = _served(state, body.model)
    if key is not None:
        try:
            check_model(key, body.model)
        except AuthError as e:
            raise api_error(e) from None
    texts = _texts(body)
    tok = served.tokenizer
    # as data.labels.encode_texts (the server does not import the training data code)
    prompts = await run_in_threadpool(tok.encode_batch, texts, add_bos=tok.add_bos_token, parse_special=False)
    _check_lengths(prompts, served.classifier.max_seq_len)
    usage = classification_usage(prompts)
    response_id = f"clf-{uuid.uuid4().hex}"
    tokens = (0, 0)  # (prompt, completion) tokens billed: none until the client has its answer
    meter = None
    if key is not None and state.db is not None:
        meter = Meter(
            request,
            state,
            key,
            body.model,
            request_id=response_id,
            prompt_tokens=usage.prompt_tokens,
            max_completion_tokens=0,
            billed=lambda: tokens,
        )
        await meter.admit()  # RateLimited / QuotaExceeded before the classifier runs
    try:
        # on the engine's thread: one OpenMP team per process (EngineClient.run)
        probs = await state.engine.run(partial(served.classifier.classify, prompts))
        data = []
        for i, p in enumerate(probs):
            label = max(p, key=p.__getitem__)
            data.append(ClassificationItem(index=i, label=label, score=p[label], scores=p))
    except BaseException as e:
        if meter is not None:
            await meter.ended(e)  # failed (an error) or cancelled (shutdown), billed nothing
        raise
    state.metrics.prompt_tokens.inc(usage.prompt_tokens)
    tokens = (usage.prompt_tokens, 0)
    if meter is not None:
        await meter.ended(None)
    return Classification(id=response_id, model=body.model, data=data, usage=usage)
