"""Chat messages -> prompt text through the model's jinja chat template.

`render` gives exactly what transformers' `tokenizer.apply_chat_template(messages, tokenize=False)` gives: the
same sandboxed jinja environment (transformers/utils/chat_template_utils.py: trim_blocks, lstrip_blocks,
loopcontrols, a non-escaping `tojson`, `raise_exception`, `strftime_now`) and the same variables (`messages`,
`tools`, `documents`, `add_generation_prompt`, the special tokens). Messages are checked first, so a bad request
fails with one clear line instead of a jinja traceback.

Later: `tokenize_conversation(...)` for fine-tuning (ids plus a loss mask over the assistant turns) belongs here.
"""

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmforge.errors import UserError

# Names a message's reasoning arrives under; transformers copies it to `reasoning_content` (what templates
# read) and `thinking` (what gpt-oss templates read).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def render(
    template: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool,
    bos_token: str | None,
    eos_token: str | None,
    **extra: Any,
) -> str:
    """Render `messages` with the chat `template`; `extra` becomes template variables (tools=..., etc.)."""
    chat = [_alias_reasoning(m) for m in validate_messages(messages)]
    compiled = _compile(template)
    # transformers passes only the special tokens that are set, and always passes tools and documents.
    variables: dict[str, Any] = {"tools": None, "documents": None}
    variables.update((k, v) for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v is not None)
    variables.update(extra)
    try:
        return compiled.render(messages=chat, add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as e:
        # raise_exception() in templates reports conversation problems ("roles must alternate ...")
        raise UserError(f"chat template rejected the conversation: {e}") from None


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Check the messages and return copies with OpenAI text-part lists joined into one string."""
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise UserError("messages must be a list of {'role': ..., 'content': ...} objects")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise UserError(
                f"messages[{i}] must be an object with 'role' and 'content', got {type(message).__name__}"
            )
        role = message.get("role")
        if not isinstance(role, str):
            raise UserError(f"messages[{i}].role must be a string such as 'user', got {role!r}")
        out = dict(message)
        content = message.get("content")
        if isinstance(content, list):
            out["content"] = _join_text_parts(content, i)
        elif not isinstance(content, str) and not (content is None and message.get("tool_calls")):
            # content may be null only on an assistant message that calls tools (OpenAI's rule)
            raise UserError(
                f"messages[{i}].content must be a string or a list of text parts, got {type(content).__name__}"
            )
        checked.append(out)
    return checked


def _join_text_parts(parts: list[Any], i: int) -> str:
    texts = []
    for part in parts:
        if (
            not isinstance(part, Mapping)
            or part.get("type") != "text"
            or not isinstance(part.get("text"), str)
        ):
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise UserError(
                f"messages[{i}].content: only {{'type': 'text', 'text': ...}} parts are supported, got {kind!r}"
            )
        texts.append(part["text"])
    return "\n".join(texts)  # vLLM joins text parts the same way


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


@lru_cache(maxsize=64)
def _compile(template: str) -> jinja2.Template:
    """Compile a template once (servers render the same one per request)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"chat template has a syntax error on line {e.lineno}: {e.message}") from None


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False
) -> str:
    # jinja's own tojson escapes HTML characters (<, >, &, '), which changes the prompt
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace() that refuses underscore names, so a template cannot reach Python internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set namespace attribute {name!r}")
