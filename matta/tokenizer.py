"""Byte-level BPE tokenizer (HF ``tokenizers``), stored in a checkpoint as tokenizer.json."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

END_OF_TEXT = "<|endoftext|>"


class Tokenizer:
    """Thin wrapper over a HF ``tokenizers.Tokenizer`` with an end-of-text token.

    ``eos_id`` names that token (an imported Llama-family tokenizer ends with ``</s>``,
    ``<|end_of_text|>``, ``<|im_end|>``, ...); by default it is ``<|endoftext|>``, matta's own.
    """

    def __init__(self, backend: HFTokenizer, eos_id: int | None = None) -> None:
        self.backend = backend
        if eos_id is None:
            eos_id = backend.token_to_id(END_OF_TEXT)
            if eos_id is None:
                raise ValueError(f"tokenizer has no {END_OF_TEXT!r} token")
        elif backend.id_to_token(eos_id) is None:
            raise ValueError(f"end-of-text id {eos_id!r} is not in the tokenizer's vocabulary")
        self.eos_id: int = eos_id

    @property
    def eos_token(self) -> str:
        return self.backend.id_to_token(self.eos_id)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Train a GPT-2 style byte-level BPE; ``<|endoftext|>`` gets id 0."""
        if vocab_size < 257 + 1:
            raise ValueError(f"vocab_size {vocab_size} is too small for byte-level BPE (needs >= 258)")
        backend = HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[END_OF_TEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend)

    @classmethod
    def from_file(cls, path: str | Path, eos_id: int | None = None) -> Tokenizer:
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"{path}: not a valid tokenizer.json ({exc})") from exc
        return cls(backend, eos_id)

    def save(self, path: str | Path) -> None:
        self.backend.save(str(path))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> str:
        """The text of one token on its own (for logprob tables and stop-string checks)."""
        return self.backend.decode([token_id], skip_special_tokens=False)
