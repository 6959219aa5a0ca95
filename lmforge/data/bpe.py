"""The two vocabularies `lmforge data prepare` can build: a byte-level BPE trained on the corpus, and plain bytes.

The BPE is SmolLM2's recipe: digits split one by one, then GPT-2's byte-level pre-tokenizer (no prefix space)
and decoder, so any text (Chinese included) round-trips exactly. Special tokens take the first ids.

The byte vocabulary needs no tokenizer file: id = byte value, 256 = end of text (vocab_size 257).
`ByteTokenizer` gives it the interface the trainer uses (vocab_size, eot_id, encode, decode).
"""

from collections.abc import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge.data.tokenizer import Tokenizer

END_OF_TEXT = "<|endoftext|>"


def train_bpe(
    texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = (END_OF_TEXT,)
) -> Tokenizer:
    """Train a byte-level BPE on `texts` (streamed: the trainer keeps word counts, not texts).

    The end-of-text token is "<|endoftext|>" when listed, else the first special token; it is also BOS, as in
    GPT-2 (never added automatically).
    """
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so nothing is ever unknown
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    eot = END_OF_TEXT if END_OF_TEXT in special_tokens else (special_tokens[0] if special_tokens else None)
    return Tokenizer(tok, bos_token=eot, eos_token=eot)


class ByteTokenizer:
    """The byte vocabulary: ids 0-255 are bytes, 256 ends a document."""

    vocab_size = 257
    eot_id = 256
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Bytes back to text; end-of-text shows as "<|endoftext|>" (or nothing with skip_special_tokens).

        Random windows can start or end inside a multi-byte character; those bytes become U+FFFD.
        """
        eot = b"" if skip_special_tokens else END_OF_TEXT.encode()
        return b"".join(bytes([i]) if i < 256 else eot for i in ids).decode("utf-8", errors="replace")
