"""Tokenizer tests against real references: llama.cpp's ids for SmolLM2 (the shared fixture), transformers'
AutoTokenizer on the saved folder, a plain-Python twin of llama.cpp's SentencePiece algorithm, and the `regex`
module for the pre-tokenizer patterns."""

import json
import warnings
from pathlib import Path

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import pre_tokenizers

from lmforge.data.tokenizer import IncrementalDetokenizer, Tokenizer
from lmforge.errors import UserError


@pytest.fixture(scope="module")
def tok(smollm2_metadata) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(smollm2_metadata)


@pytest.fixture(scope="module")
def lines(shared_dir) -> list[dict]:
    path = shared_dir / "fixtures" / "smollm2_tokenizer_llamacpp.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    tok.save(folder)
    return folder


# --- GGUF byte-level BPE vs llama.cpp -------------------------------------------------------------------


def test_ids_match_llama_cpp_exactly(tok, lines):
    for line in lines:
        assert tok.encode(line["text"], parse_special=False) == line["ids"], line["text"]
        assert tok.encode(line["text"]) == line["ids_parse_special"], line["text"]


def test_decode_round_trips(tok, lines):
    for line in (x for x in lines if x["roundtrip_ok"]):
        assert tok.decode(line["ids"]) == line["text"]
        assert tok.decode(line["ids_parse_special"]) == line["text"]


def test_special_tokens_and_stop_ids(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert tok.vocab_size == 49152
    assert tok.token_to_id("<|im_end|>") == 2 and tok.id_to_token(1) == "<|im_start|>"
    assert tok.token_to_id("no such token") is None
    assert tok.stop_ids == frozenset({tok.eos_id, tok.token_to_id("<|endoftext|>")})
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.model_max_length == 8192


def test_special_token_text_vs_id(tok):
    assert tok.encode("<|im_start|>") == [1]
    assert len(tok.encode("<|im_start|>", parse_special=False)) > 1
    assert tok.encode("hi", add_bos=True) == [tok.bos_id, *tok.encode("hi")]
    assert tok.decode([1, *tok.encode("hi"), 2], skip_special_tokens=True) == "hi"


def test_encode_batch_matches_encode(tok, lines):
    texts = [x["text"] for x in lines]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, parse_special=False, add_bos=True) == [
        tok.encode(t, parse_special=False, add_bos=True) for t in texts
    ]


# --- saving and loading -----------------------------------------------------------------------------------


def test_saved_folder_loads_in_transformers_with_same_ids(tok, saved, lines):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(saved)
    for line in lines:
        assert hf(line["text"])["input_ids"] == line["ids_parse_special"], line["text"]
        assert hf(line["text"], split_special_tokens=True)["input_ids"] == line["ids"], line["text"]
        assert hf.decode(line["ids_parse_special"]) == tok.decode(line["ids_parse_special"])
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == (tok.bos_token, tok.eos_token, tok.pad_token)
    assert hf.chat_template == tok.chat_template


def test_from_folder_round_trip(tok, saved, lines):
    loaded = Tokenizer.from_folder(saved)
    for line in lines:
        assert loaded.encode(line["text"]) == tok.encode(line["text"])
        assert loaded.encode(line["text"], parse_special=False) == tok.encode(
            line["text"], parse_special=False
        )
    for name in ("vocab_size", "bos_id", "eos_id", "pad_id", "stop_ids", "chat_template", "add_bos_token"):
        assert getattr(loaded, name) == getattr(tok, name), name
    assert loaded.model_max_length == 8192


def test_from_folder_finds_separate_chat_template_files(saved, tmp_path):
    config = json.loads((saved / "tokenizer_config.json").read_text())
    template = config.pop("chat_template")
    for name, content in [
        ("chat_template.jinja", template),
        ("chat_template.json", json.dumps({"chat_template": template})),
    ]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "tokenizer.json").write_text((saved / "tokenizer.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        (folder / name).write_text(content)
        assert Tokenizer.from_folder(folder).chat_template == template


def test_from_folder_reads_special_tokens_map_and_added_token_dicts(saved, tmp_path):
    (tmp_path / "tokenizer.json").write_text((saved / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|im_start|>"}))
    loaded = Tokenizer.from_folder(tmp_path)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.chat_template) == (1, 2, None, None)


def test_folder_without_tokenizer_json_is_a_user_error(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(UserError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


def test_add_bos_token_survives_save_and_transformers(smollm2_metadata, tmp_path):
    tok = Tokenizer.from_gguf_metadata({**smollm2_metadata, "tokenizer.ggml.add_bos_token": True})
    assert tok.add_bos_token
    tok.save(tmp_path)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf("Hello there")["input_ids"] == tok.encode("Hello there", add_bos=True)
    assert Tokenizer.from_folder(tmp_path).add_bos_token


# --- pre-tokenizers ---------------------------------------------------------------------------------------

# The regexes as written in the models' own tokenizer.json files (with (?i:...)), run by the `regex` module.
_ORIGINAL_REGEX = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "gpt-2": r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
}


@pytest.mark.parametrize("pre", sorted(_ORIGINAL_REGEX))
def test_pre_tokenizer_regexes_match_the_originals(smollm2_metadata, lines, pre):
    tok = Tokenizer.from_gguf_metadata({**smollm2_metadata, "tokenizer.ggml.pre": pre})
    to_bytes_alphabet = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    texts = [x["text"] for x in lines] + ["I'LL say it's 12345678 DON'T\r\n\r\n  x", "a\n\n\tb  \n"]
    for text in texts:
        ours = [piece for piece, _ in tok._tok.pre_tokenizer.pre_tokenize_str(text)]
        expected = [
            to_bytes_alphabet.pre_tokenize_str(p)[0][0] for p in regex.findall(_ORIGINAL_REGEX[pre], text)
        ]
        assert ours == expected, text


def test_unknown_pre_tokenizer_warns_and_uses_gpt2(smollm2_metadata):
    with pytest.warns(UserWarning, match="mystery"):
        tok = Tokenizer.from_gguf_metadata({**smollm2_metadata, "tokenizer.ggml.pre": "mystery"})
    gpt2 = Tokenizer.from_gguf_metadata({**smollm2_metadata, "tokenizer.ggml.pre": "gpt-2"})
    assert tok.encode("In 2026,  42 apples") == gpt2.encode("In 2026,  42 apples")


def test_known_pre_tokenizers_do_not_warn(smollm2_metadata):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for pre in ("smollm", "gpt-2", "default", "llama-bpe", "qwen2"):
            Tokenizer.from_gguf_metadata({**smollm2_metadata, "tokenizer.ggml.pre": pre})


def test_llama3_pre_tokenizer_adds_bos_unless_told_not_to(smollm2_metadata):
    meta = {k: v for k, v in smollm2_metadata.items() if k != "tokenizer.ggml.add_bos_token"}
    assert Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.pre": "llama-bpe"}).add_bos_token
    assert not Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.pre": "smollm"}).add_bos_token
    assert not Tokenizer.from_gguf_metadata(smollm2_metadata).add_bos_token


def test_unsupported_tokenizer_model_is_a_user_error(smollm2_metadata):
    with pytest.raises(UserError, match="unsupported tokenizer model 'bert'"):
        Tokenizer.from_gguf_metadata({**smollm2_metadata, "tokenizer.ggml.model": "bert"})


# --- incremental detokenisation -----------------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int], **kwargs) -> list[str]:
    detok = IncrementalDetokenizer(tok, **kwargs)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_equals_full_decode(tok, lines, skip):
    for line in lines:
        ids = line["ids_parse_special"]
        full = tok.decode(ids, skip_special_tokens=skip)
        deltas = _stream(tok, ids, skip_special_tokens=skip)
        assert "".join(deltas) == full, line["text"]
        if "\ufffd" not in full:
            assert not any("\ufffd" in d for d in deltas), line["text"]


def test_incremental_splits_characters_across_tokens(tok):
    # Byte-level BPE splits these characters over several tokens: nothing shows until a character is whole.
    ids = tok.encode("🚀🔥")
    assert len(ids) > 2
    deltas = _stream(tok, ids)
    assert "".join(deltas) == "🚀🔥" and "" in deltas


def test_incremental_after_prompt_keeps_leading_space(tok):
    prompt = tok.encode("<|im_start|>assistant\nThe answer")
    completion = tok.encode(" is 42.")
    assert "".join(_stream(tok, completion, prompt_ids=prompt)) == " is 42."


def test_incremental_flush_shows_incomplete_bytes(tok):
    ids = tok.encode("🚀")
    detok = IncrementalDetokenizer(tok)
    assert detok.add(ids[0]) == ""
    assert detok.flush() == tok.decode(ids[:1]) and "\ufffd" in detok.text


def test_incremental_work_per_token_stays_constant(tok, lines):
    ids = [i for line in lines for i in line["ids_parse_special"]] * 20
    detok = IncrementalDetokenizer(tok)
    longest = 0
    for i in ids:
        detok.add(i)
        longest = max(longest, len(detok._window))
    detok.flush()
    assert detok.text == tok.decode(ids, skip_special_tokens=True)
    assert longest <= 8  # the decoded window never grows with the length of the generation


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
def test_incremental_equals_full_decode_on_any_text(tok, text):
    ids = tok.encode(text)
    assert "".join(_stream(tok, ids, skip_special_tokens=False)) == tok.decode(ids)


# --- SentencePiece ('llama') GGUF vocabularies --------------------------------------------------------------

_SPM_PIECES = [
    "▁", "a", "b", "c", "h", "e", "l", "o", "w", "r", "d", "x",
    "ab", "bc", "▁a", "▁ab", "abc", "▁abc", "he", "ll", "llo", "hell", "hello", "▁h", "▁he", "▁hello",
    "▁w", "or", "ld", "wor", "world", "▁world", "▁x", "xx", "<", "s>",
]  # fmt: skip


def _spm_metadata(add_space_prefix: bool = True) -> dict:
    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tokens = specials + byte_tokens + _SPM_PIECES + ["<|user|>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(_SPM_PIECES) + [4]
    # Distinct scores, longer pieces first, with a twist so that score order is not just length order.
    scores = (
        [0.0] * (3 + 256) + [len(p) * 10.0 - i * 0.01 * (-1) ** i for i, p in enumerate(_SPM_PIECES)] + [0.0]
    )
    return {
        "general.architecture": "llama",
        "llama.context_length": 128,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_space_prefix": add_space_prefix,
    }


def _llama_cpp_spm(text: str, meta: dict) -> list[int]:
    """llama.cpp's `llm_tokenizer_spm` written out plainly: merge the best-scoring adjacent pair, leftmost first."""
    tokens, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if meta["tokenizer.ggml.add_space_prefix"]:
        text = " " + text
    symbols = list(text.replace(" ", "▁"))
    while True:
        best = None
        for i in range(len(symbols) - 1):
            merged = symbols[i] + symbols[i + 1]
            if merged in vocab and (best is None or scores[vocab[merged]] > scores[vocab[best[1]]]):
                best = (i, merged)
        if best is None:
            break
        symbols[best[0] : best[0] + 2] = [best[1]]
    ids = []
    for s in symbols:
        ids.extend([vocab[s]] if s in vocab else [vocab[f"<0x{b:02X}>"] for b in s.encode()])
    return ids


@pytest.fixture(scope="module")
def spm() -> Tokenizer:
    return Tokenizer.from_gguf_metadata(_spm_metadata())


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet="abcdehlorwx é😀", max_size=30))
def test_spm_matches_llama_cpp_algorithm(spm, text):
    expected = _llama_cpp_spm(text, _spm_metadata()) if text else []
    assert spm.encode(text, parse_special=False) == expected
    assert spm.decode(expected) == text
    assert "".join(_stream(spm, expected)) == text


def test_spm_special_tokens_and_space_prefix(spm):
    assert spm.add_bos_token and spm.encode("hello", add_bos=True) == [1, spm.token_to_id("▁hello")]
    # llama.cpp puts the space prefix after every special token; user-defined tokens are always matched
    ids = [2, spm.token_to_id("▁hello"), spm.token_to_id("<|user|>"), spm.token_to_id("▁world")]
    assert spm.encode("</s>hello<|user|>world") == ids
    assert spm.encode("</s>", parse_special=False) != [2]
    assert spm.decode(spm.encode("hello world")) == "hello world"
    assert spm.stop_ids == frozenset({2})


def test_spm_incremental_keeps_space_with_prompt(spm):
    prompt = spm.encode("hello")
    world = spm.token_to_id("▁world")
    detok = IncrementalDetokenizer(spm, prompt_ids=prompt)
    assert detok.add(world) == " world"
    # without the prompt as context the first token's space prefix is stripped, as in a full decode
    assert IncrementalDetokenizer(spm).add(world) == "world"


def test_spm_without_space_prefix(tmp_path):
    spm = Tokenizer.from_gguf_metadata(_spm_metadata(add_space_prefix=False))
    meta = _spm_metadata(add_space_prefix=False)
    assert spm.encode("hello world") == _llama_cpp_spm("hello world", meta)
    spm.save(tmp_path)
    assert Tokenizer.from_folder(tmp_path).encode("hello world") == spm.encode("hello world")


def test_spm_saved_folder_loads_in_transformers(spm, tmp_path):
    from transformers import AutoTokenizer

    spm.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for text in ["hello world", "</s>hello<|user|>world", "abc é😀 xx"]:
        assert hf(text)["input_ids"] == spm.encode(text, add_bos=True), text
        assert hf.decode(spm.encode(text)) == spm.decode(spm.encode(text))
