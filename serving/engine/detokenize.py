"""Incremental detokenization: the text of a growing token stream in O(1) work per token.

Byte-level BPE tokens are byte strings that may split a UTF-8 character. Decoding the whole
sequence at every step would cost O(length) per token; instead each token's bytes go through
an incremental UTF-8 decoder, which emits complete characters and holds a split one until its
last byte arrives. The pieces concatenate to exactly ``tokenizer.decode(ids)`` (both replace
invalid bytes by U+FFFD per maximal invalid subpart, as the Unicode standard recommends).
"""

from __future__ import annotations

import codecs
import re
from functools import lru_cache

from matta.tokenizer import Tokenizer


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-character alphabet back to bytes (the inverse of ``bytes_to_unicode``)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_METASPACE = "\u2581"


@lru_cache(maxsize=8)
def token_byte_table(tokenizer: Tokenizer) -> tuple[bytes, ...]:
    """The raw bytes of every token id; a token outside the byte alphabet falls back to its decoded text.

    SentencePiece-style vocabularies (Llama 2, Mistral: ``▁`` for a space, ``<0xNN>`` byte-fallback
    tokens) map to their bytes too: decoding such a token alone would drop its leading space.
    """
    decoder = _byte_decoder()
    table: list[bytes] = [b""] * tokenizer.vocab_size
    added = {t.content for t in tokenizer.backend.get_added_tokens_decoder().values()}
    for token, token_id in tokenizer.backend.get_vocab(with_added_tokens=True).items():
        if token not in added and all(c in decoder for c in token):
            table[token_id] = bytes(decoder[c] for c in token)
        elif token not in added and (byte := _BYTE_FALLBACK.fullmatch(token)):
            table[token_id] = bytes([int(byte.group(1), 16)])
        elif token not in added and _METASPACE in token:
            table[token_id] = token.replace(_METASPACE, " ").encode()
        else:
            table[token_id] = tokenizer.decode([token_id]).encode()
    return tuple(table)


class IncrementalDetokenizer:
    """Feed token ids one at a time; get the new complete text each time."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._table = token_byte_table(tokenizer)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if token_id >= len(self._table):
            # An embedding row past the tokenizer (vocabularies padded to a round size): no text.
            return ""
        return self._utf8.decode(self._table[token_id])

    def flush(self) -> str:
        """End of stream: a dangling partial character becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)
