"""The inference engine. The server may import only the names exported here."""

from lmforge.engine.protocol import EngineClient
from lmforge.engine.types import (
    EngineDraining,
    EngineOverloaded,
    EngineStats,
    ModelInfo,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)

__all__ = [
    "AsyncEngine",
    "Classifier",
    "EngineClient",
    "EngineConfig",
    "EngineDraining",
    "EngineOverloaded",
    "EngineStats",
    "LLMEngine",
    "ModelInfo",
    "RequestOutput",
    "SamplingParams",
    "TokenLogprob",
]


def __getattr__(name: str):
    # The torch-backed classes load on first use, so `import lmforge.engine` stays light for the server's types.
    if name in ("LLMEngine", "EngineConfig"):
        from lmforge.engine import engine

        return getattr(engine, name)
    if name == "AsyncEngine":
        from lmforge.engine.client import AsyncEngine

        return AsyncEngine
    if name == "Classifier":
        from lmforge.engine.classifier import Classifier

        return Classifier
    raise AttributeError(name)
