"""Chat messages -> prompt text through the model's jinja chat template.

`render` gives exactly what transformers' `tokenizer.apply_chat_template(messages, tokenize=False)` gives: the
same sandboxed jinja environment (transformers/utils/chat_template_utils.py: trim_blocks, lstrip_blocks,
loopcontrols, a non-escaping `tojson`, `raise_exception`, `strftime_now`) and the same variables (`messages`,
`tools`, `documents`, `add_generation_prompt`, the special tokens). Messages are checked first, so a bad request
fails with one clear line instead of a jinja traceback.

`tokenize_conversation` gives fine-tuning its ids plus a loss mask over the assistant turns.
"""

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmforge.errors import UserError

if TYPE_CHECKING:  # tokenizer.py imports this module
    from lmforge.data.tokenizer import Tokenizer

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


def tokenize_conversation(tokenizer: "Tokenizer", messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and a mask that is True on exactly the assistant tokens.

    Trained: each assistant message's text up to and including the end-of-turn token that closes it (e.g.
    `<|im_end|>`); not trained: system/user turns, the `<|im_start|>assistant\n` header and whatever the
    template puts after the end-of-turn token (a newline). As transformers does, no BOS is added beyond what
    the template writes.

    The conversation is rendered incrementally: messages[:i] with the generation prompt (the assistant header)
    and messages[:i+1]; the differences are tokenised piece by piece, and the concatenation must equal the
    tokenisation of the whole render. Templates that are not prefix-stable (e.g. ones that drop the reasoning
    of earlier turns) or pieces that tokenise differently at their joins fall back to character offsets.
    """
    chat = validate_messages(messages)
    full = tokenizer.apply_chat_template(chat)
    full_ids = tokenizer.encode(full)
    pieces = _incremental_pieces(tokenizer, chat, full)
    if pieces is not None:
        ids: list[int] = []
        mask: list[bool] = []
        for text, trained in pieces:
            piece_ids = tokenizer.encode(text)
            ids += piece_ids
            mask += _trained_mask(tokenizer, piece_ids) if trained else [False] * len(piece_ids)
        if ids == full_ids:
            return ids, mask
    return full_ids, _mask_from_offsets(tokenizer, chat, full, full_ids)


def _incremental_pieces(tokenizer: "Tokenizer", chat: list[dict], full: str) -> list[tuple[str, bool]] | None:
    """(text, is_assistant) pieces whose concatenation is `full`, or None if the template is not prefix-stable."""
    pieces: list[tuple[str, bool]] = []
    done = ""  # the render of chat[:i]
    for i, message in enumerate(chat):
        if message["role"] == "assistant":
            header = _render_prefix(tokenizer, chat[:i], add_generation_prompt=True)
            if header is None or not header.startswith(done):
                return None
            pieces.append((header[len(done) :], False))
            done = header
        upto = _render_prefix(tokenizer, chat[: i + 1], add_generation_prompt=False)
        if upto is None or not upto.startswith(done):
            return None
        pieces.append((upto[len(done) :], message["role"] == "assistant"))
        done = upto
    if done != full:
        return None
    return [(text, trained) for text, trained in pieces if text]


def _render_prefix(tokenizer: "Tokenizer", chat: list[dict], *, add_generation_prompt: bool) -> str | None:
    if not chat and not add_generation_prompt:
        return ""
    try:
        return tokenizer.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)
    except UserError:  # e.g. "conversation must start with a user message": not renderable piecewise
        return None


def _trained_mask(tokenizer: "Tokenizer", ids: list[int]) -> list[bool]:
    """An assistant piece: train up to and including its first end-of-turn token (all of it if it has none)."""
    end = next((k for k, t in enumerate(ids) if t in tokenizer.stop_ids), len(ids) - 1)
    return [k <= end for k in range(len(ids))]


def _mask_from_offsets(tokenizer: "Tokenizer", chat: list[dict], full: str, ids: list[int]) -> list[bool]:
    """Fallback: find each assistant content in the render, train the tokens overlapping it and the first
    end-of-turn token after it."""
    # Tokenizer has no public offsets; the backend's encoding of the same text gives the same ids.
    encoding = tokenizer._backend(True).encode(full, add_special_tokens=False)
    if encoding.ids != ids:
        raise UserError("cannot align the chat template's text with its tokens for the loss mask")
    offsets = encoding.offsets
    mask = [False] * len(ids)
    cursor = 0
    for i, message in enumerate(chat):
        content = message.get("content") or ""
        if message["role"] != "assistant" or not content:
            continue
        start = full.find(content, cursor)
        if start < 0:
            raise UserError(
                f"messages[{i}]: the chat template changes assistant text, so its tokens cannot be masked"
            )
        end = start + len(content)
        cursor = end
        last = None
        for k, (a, b) in enumerate(offsets):
            if b > start and a < end:
                mask[k] = True
                last = k
        for k in range((last or 0) + 1, len(ids)):
            if ids[k] in tokenizer.stop_ids:
                mask[k] = True
                cursor = max(cursor, offsets[k][1])
                break
    return mask


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
