"""The tokenizer: text <-> ids over HF `tokenizers` (Rust), loaded from an HF folder or from GGUF metadata.

A GGUF file carries its vocabulary as plain lists; `from_gguf_metadata` rebuilds the same tokenizer llama.cpp
runs (pre-tokenizer regexes, token types and SentencePiece rules from llama.cpp's `llama-vocab.cpp`), so ids
match llama.cpp's exactly, and `save` writes it as `tokenizer.json` + `tokenizer_config.json` that
transformers' `AutoTokenizer` loads unchanged.

`IncrementalDetokenizer` turns a stream of generated ids into text deltas the way vLLM and TGI do
(`detokenize_incrementally`): decode a short window of previous tokens with and without the new one and emit
the difference once it no longer ends in a partial UTF-8 character.
"""

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from lmforge import atomic
from lmforge.data import chat_format
from lmforge.errors import UserError

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp, `llm_tokenizer_bpe`). Each regex splits every piece
# the previous one produced, keeping matches and the text between them, which is what tokenizers'
# Split(behavior="isolated") does; ByteLevel then maps bytes to the GPT-2 alphabet.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# The (?i:...) of the original Llama 3 / Qwen2 regexes spelled out, as llama.cpp does: case folding would
# also match characters such as U+017F (long s) that llama.cpp does not.
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA_CPP_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")

_PRE_REGEXES: dict[str, tuple[str, ...]] = {
    "default": _LLAMA_CPP_DEFAULT,
    **dict.fromkeys(("gpt-2", "gpt2", "mpt", "olmo", "jais", "trillion", "granite-docling"), (_GPT2,)),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"), (r"\p{N}", _GPT2)
    ),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe"), (_LLAMA3,)),
    **dict.fromkeys(("qwen2", "stablelm2", "hunyuan"), (_QWEN2,)),
}
# The Llama 3 family: llama.cpp matches a whole pre-token against the vocabulary before merging
# (`ignore_merges`) and adds BOS unless the file says otherwise.
_IGNORE_MERGES_PRE = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3"})

# GGUF token types (gguf.TokenType).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6

# Special tokens that end a turn in the common chat formats (llama.cpp's end-of-generation list, trimmed).
_END_OF_TURN = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|end|>",
    "<end_of_turn>",
    "<|return|>",
    "</s>",
)
# transformers' placeholder for "no limit" in tokenizer_config.json.
_NO_MAX_LENGTH = int(1e20)
_SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")


class Tokenizer:
    """Byte-level BPE or SentencePiece-style BPE tokenizer with the model's special tokens and chat template."""

    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        add_bos_token: bool = False,
        chat_template: str | None = None,
        model_max_length: int | None = None,
        extra_stop_ids: Sequence[int] = (),
    ) -> None:
        self._tok = tok
        self._plain_tok: tokenizers.Tokenizer | None = None
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.unk_token = unk_token
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._id_of(bos_token)
        self.eos_id = self._id_of(eos_token)
        self.pad_id = self._id_of(pad_token)
        self.unk_id = self._id_of(unk_token)

        special = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        stops = {special[name] for name in _END_OF_TURN if name in special}
        stops.update(i for i in (self.eos_id, *extra_stop_ids) if i is not None)
        self.stop_ids: frozenset[int] = frozenset(stops)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    # --- loading and saving ---------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, path: str | Path) -> "Tokenizer":
        """Load an HF tokenizer folder: tokenizer.json plus tokenizer_config.json (and the chat template files)."""
        folder = Path(path)
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise UserError(
                f"{tok_file} not found: lmforge needs the fast-tokenizer file; "
                "write it with transformers' AutoTokenizer.from_pretrained(...).save_pretrained(folder)"
            )
        try:
            tok = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust side raises a bare Exception for malformed files
            raise UserError(
                f"{tok_file} is not a valid tokenizer.json ({e}); re-export it with transformers"
            ) from e
        config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        specials = {
            name: _token_content(config.get(name, special_map.get(name)), folder / "tokenizer_config.json")
            for name in _SPECIAL_NAMES
        }
        add_bos = config.get("add_bos_token")
        if add_bos is None:  # not written down: tell from the post-processor (Llama 3 style files)
            add_bos = _post_processor_adds(tok, specials["bos_token"])
        max_len = config.get("model_max_length")
        return cls(
            tok,
            **specials,
            add_bos_token=bool(add_bos),
            chat_template=_chat_template_from_folder(folder, config),
            model_max_length=max_len if isinstance(max_len, int) and max_len < _NO_MAX_LENGTH else None,
        )

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> "Tokenizer":
        """Build the tokenizer llama.cpp would run from a GGUF file's `tokenizer.*` metadata."""
        model = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if model is None or not tokens:
            raise UserError(
                "GGUF file has no tokenizer (tokenizer.ggml.model/tokens missing); use one that has"
            )
        types = list(meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
        if model == "gpt2":
            tok = _byte_level_bpe(
                tokens, meta.get("tokenizer.ggml.merges") or [], meta.get("tokenizer.ggml.pre")
            )
        elif model == "llama":
            tok = _sentencepiece_bpe(tokens, types, meta)
        else:
            raise UserError(
                f"unsupported tokenizer model {model!r} in GGUF file (supported: 'gpt2', 'llama')"
            )
        _add_gguf_special_tokens(tok, tokens, types)

        def token(key: str) -> str | None:
            i = meta.get(f"tokenizer.ggml.{key}_token_id")
            return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

        bos = token("bos")
        # Without the key, llama.cpp adds BOS for SentencePiece vocabularies and Llama 3, not other BPEs.
        default_bos = model == "llama" or meta.get("tokenizer.ggml.pre") in _IGNORE_MERGES_PRE
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_bos)) and bos is not None
        if add_bos:
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos}:0 $A:0",
                pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, tok.token_to_id(bos))],
            )
        elif model == "gpt2":
            tok.post_processor = processors.ByteLevel(trim_offsets=False)
        arch = meta.get("general.architecture")
        ctx = meta.get(f"{arch}.context_length")
        extra_stops = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
        return cls(
            tok,
            bos_token=bos,
            eos_token=token("eos"),
            pad_token=token("padding"),
            unk_token=token("unknown"),
            add_bos_token=add_bos,
            chat_template=meta.get("tokenizer.chat_template"),
            model_max_length=ctx if isinstance(ctx, int) else None,
            extra_stop_ids=[i for i in extra_stops if isinstance(i, int)],
        )

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json so transformers' AutoTokenizer loads the same tokenizer."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **{name: getattr(self, name) for name in _SPECIAL_NAMES},
            "add_bos_token": self.add_bos_token,
            "add_eos_token": False,
            # transformers would otherwise "clean up" spaces before punctuation when decoding
            "clean_up_tokenization_spaces": False,
        }
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        atomic.write_text(folder / "tokenizer.json", self._tok.to_str())
        atomic.write_text(
            folder / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        )

    # --- text <-> ids ---------------------------------------------------------------------------------

    def encode(self, text: str, *, add_bos: bool = False, parse_special: bool = True) -> list[int]:
        """Token ids of `text`; with parse_special=False, special tokens such as <|im_start|> are plain text."""
        ids = self._backend(parse_special).encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def encode_batch(
        self, texts: Sequence[str], *, add_bos: bool = False, parse_special: bool = True
    ) -> list[list[int]]:
        """`encode` for many texts at once, in parallel in the Rust library."""
        encodings = self._backend(parse_special).encode_batch(list(texts), add_special_tokens=False)
        prefix = [self.bos_id] if add_bos and self.bos_id is not None else []
        return [prefix + e.ids for e in encodings]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def _backend(self, parse_special: bool) -> tokenizers.Tokenizer:
        if parse_special:
            return self._tok
        # A second copy with special-token matching off, rather than toggling the shared flag (encode may run
        # on several threads at once).
        if self._plain_tok is None:
            plain = tokenizers.Tokenizer.from_str(self._tok.to_str())
            plain.encode_special_tokens = True
            self._plain_tok = plain
        return self._plain_tok

    # --- chat -----------------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: list[dict], *, add_generation_prompt: bool = False, **extra: Any
    ) -> str:
        """The prompt text for `messages`, rendered with the model's chat template as transformers does.

        `extra` become template variables as in transformers (e.g. tools=[...] for templates that take tools).
        """
        if self.chat_template is None:
            raise UserError(
                "this model's tokenizer has no chat template; pass plain text as the prompt instead"
            )
        # like transformers: the special tokens that are set, which explicit keyword arguments override
        specials = {name: getattr(self, name) for name in _SPECIAL_NAMES}
        variables = {k: v for k, v in specials.items() if v is not None} | extra
        return chat_format.render(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=variables.pop("bos_token", None),
            eos_token=variables.pop("eos_token", None),
            **variables,
        )


class IncrementalDetokenizer:
    """Streaming decode that never emits half a UTF-8 character; O(1) work per token.

    vLLM's prefix_offset/read_offset scheme: the window holds the ids whose text was emitted last (context) and
    the ids not emitted yet. Each step decodes the window with and without the pending ids and emits the
    difference, so decoders that depend on the neighbouring token (SentencePiece's leading space, byte fallback,
    byte-level BPE splitting a character over tokens) give exactly the text of a full decode.
    """

    # How many prompt tokens serve as context for the first generated token (vLLM uses 5).
    _PROMPT_CONTEXT = 5

    def __init__(
        self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True, prompt_ids: Sequence[int] = ()
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._window = list(prompt_ids[-self._PROMPT_CONTEXT :])
        self._read_offset = len(self._window)  # window[:read_offset] is context, the rest is pending
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._pieces)

    def add(self, token_id: int) -> str:
        """Take one generated id; return the text it completes (often "", e.g. mid-character)."""
        self._window.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """The rest at the end of generation, with any incomplete character as U+FFFD."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        context_text = self._decode(self._window[: self._read_offset])
        full_text = self._decode(self._window)
        if len(full_text) <= len(context_text) or (not final and full_text.endswith("\ufffd")):
            return ""  # nothing visible yet, or an incomplete character: wait for more tokens
        delta = full_text[len(context_text) :]
        # The ids just emitted become the context for the next ones; older ids are dropped.
        del self._window[: self._read_offset]
        self._read_offset = len(self._window)
        self._pieces.append(delta)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)


# --- building from GGUF -------------------------------------------------------------------------------


def _vocab(tokens: Sequence[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a repeated string keeps its first id, as llama.cpp's text-to-token map does
    return vocab


def _byte_level_bpe(tokens: Sequence[str], merges: Sequence[str], pre: str | None) -> tokenizers.Tokenizer:
    """GPT-2 style byte-level BPE with the pre-tokenizer llama.cpp picks for `tokenizer.ggml.pre`."""
    pre = pre or "default"
    regexes = _PRE_REGEXES.get(pre)
    if regexes is None:
        warnings.warn(
            f"unknown GGUF pre-tokenizer {pre!r}; falling back to the GPT-2 rule, ids may differ from llama.cpp",
            stacklevel=3,
        )
        regexes = (_GPT2,)
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = tokenizers.Tokenizer(
        models.BPE(vocab=_vocab(tokens), merges=pairs, ignore_merges=pre in _IGNORE_MERGES_PRE)
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(
    tokens: Sequence[str], types: Sequence[int], meta: dict[str, Any]
) -> tokenizers.Tokenizer:
    """llama.cpp's SentencePiece tokenizer (`llm_tokenizer_spm`) as a BPE with byte fallback.

    llama.cpp repeatedly merges the adjacent pair whose concatenation is the highest-scoring vocabulary entry;
    a BPE whose merges are all such pairs, ranked by that score, makes the same choices (transformers' GGUF
    converter does the same). Pieces left outside the vocabulary fall back to <0xNN> byte tokens.
    """
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise UserError(
            "GGUF 'llama' tokenizer has no tokenizer.ggml.scores; the file is incomplete, re-convert it"
        )
    vocab = _vocab(tokens)
    merges = []
    for i in sorted(range(len(tokens)), key=lambda i: -scores[i]):
        t = tokens[i]
        if types[i] == _BYTE or vocab[t] != i:
            continue
        merges.extend((t[:k], t[k:]) for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    tok = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    add_space = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    # A normalizer (not Metaspace) so the space prefix also goes after every special token, as in llama.cpp.
    steps = [normalizers.Replace(" ", "\u2581")]
    tok.normalizer = normalizers.Sequence(([normalizers.Prepend("\u2581")] if add_space else []) + steps)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if add_space else [])
    )
    return tok


def _add_gguf_special_tokens(tok: tokenizers.Tokenizer, tokens: Sequence[str], types: Sequence[int]) -> None:
    # CONTROL and UNKNOWN tokens are special: matched in text only when parse_special=True, dropped by
    # skip_special_tokens. USER_DEFINED tokens are matched always, as llama.cpp does, and decode as text.
    special = [
        AddedToken(tokens[i], special=True, normalized=False)
        for i, t in enumerate(types)
        if t in (_UNKNOWN, _CONTROL)
    ]
    user = [
        AddedToken(tokens[i], special=False, normalized=False)
        for i, t in enumerate(types)
        if t == _USER_DEFINED
    ]
    tok.add_special_tokens(special)
    tok.add_tokens(user)


# --- reading and writing folders ----------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); fix or delete the file") from e
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _token_content(value: Any, source: Path) -> str | None:
    # transformers writes a special token either as a string or as a serialised AddedToken dict.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise UserError(f"{source}: a special token must be a string or {{'content': ...}}, found {value!r}")


def _post_processor_adds(tok: tokenizers.Tokenizer, bos: str | None) -> bool:
    if bos is None or tok.post_processor is None:
        return False
    state = json.loads(tok.post_processor.__getstate__())
    for p in state.get("processors", [state]):  # a Sequence post-processor wraps a list
        if p.get("type") == "TemplateProcessing" and p.get("single"):
            first = p["single"][0]
            return first.get("SpecialToken", {}).get("id") == bos
    return False


def _chat_template_from_folder(folder: Path, config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None:
        template = _read_json(folder / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # several named templates: the one called "default" is for chat
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise UserError(f"{folder}: chat_template must be a string, found {type(template).__name__}")
    return template


def pad_id_of(tokenizer: Tokenizer) -> int:
    """Padding positions carry no loss, so any id works; prefer the tokenizer's pad, then eos."""
    for i in (tokenizer.pad_id, tokenizer.eos_id):
        if i is not None:
            return i
    return 0
