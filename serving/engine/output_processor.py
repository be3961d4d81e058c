"""Output processing: sampled token ids to the text a client sees, in the engine core.

Incremental detokenization (O(1) per token, :mod:`serving.engine.detokenize`), end of sequence, the
token budget and the context window, stop strings (text that could still grow into one is held
back until it cannot, and a stop string is never streamed), and the :class:`SequenceOutput` of
each iteration. It runs where the stop decision must be made, in the core, beside the scheduler
that frees the slot: a sequence that hit a stop string runs no further decode step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from matta.tokenizer import Tokenizer
from serving.engine.detokenize import IncrementalDetokenizer
from serving.messages import Logprob, Sampling, SequenceOutput


@dataclass(eq=False)
class _Text:
    request_id: int
    index: int
    prompt_tokens: int
    sampling: Sampling
    detok: IncrementalDetokenizer
    stream: bool = True  # an output per token; else the first token's, then one at the end
    text: str = ""
    emitted: int = 0  # characters of ``text`` already sent
    tokens: int = 0
    unsent: list[int] = field(default_factory=list)  # token ids not sent yet (not streamed)
    unsent_logprobs: list[Logprob] = field(default_factory=list)


@dataclass
class OutputProcessor:
    """One :class:`_Text` per live sequence, keyed by the scheduler's sequence id."""

    tokenizer: Tokenizer
    eos_token_id: int | None
    n_ctx: int
    _seqs: dict[int, _Text] = field(default_factory=dict)

    def add(self, seq_id: int, request_id: int, index: int, prompt_tokens: int, sampling: Sampling,
            stream: bool = True) -> None:
        self._seqs[seq_id] = _Text(request_id, index, prompt_tokens, sampling, IncrementalDetokenizer(self.tokenizer),
                                   stream)

    def token(self, seq_id: int, token: int, logprob: Logprob | None, now: float, width: str,
              prompt_logprobs: list[Logprob] | None = None, predicted_s: float | None = None,
              queue_s: float = 0.0) -> SequenceOutput | None:
        """Append one sampled token; the output says whether the sequence finished (and why). None:
        a sequence that is not streamed keeps its tokens until it finishes (its first token excepted)."""
        seq = self._seqs[seq_id]
        seq.tokens += 1
        p = seq.sampling
        finish = None
        start = len(seq.text)
        if token == self.eos_token_id:
            finish = "stop"
            seq.text += seq.detok.flush()
        else:
            seq.text += seq.detok.push(token)
            if seq.tokens >= p.max_tokens or seq.prompt_tokens + seq.tokens >= self.n_ctx:
                finish = "length"
                seq.text += seq.detok.flush()
        if p.stop:
            longest = max(len(s) for s in p.stop)
            window = max(0, start - longest + 1)
            hits = [pos for s in p.stop if (pos := seq.text.find(s, window)) != -1]
            if hits:
                seq.text = seq.text[: min(hits)]
                finish = "stop"
        if finish is None and not seq.stream and seq.tokens > 1:
            seq.unsent.append(token)
            if logprob is not None:
                seq.unsent_logprobs.append(logprob)
            return None
        if finish is None:
            holdback = max((len(s) for s in p.stop), default=1) - 1  # a tail that could grow into a stop string
            end = max(seq.emitted, len(seq.text) - holdback)
        else:
            end = len(seq.text)
        text = seq.text[seq.emitted:end]
        seq.emitted = end
        token_ids, logprobs = [*seq.unsent, token], [*seq.unsent_logprobs, *([logprob] if logprob is not None else [])]
        seq.unsent, seq.unsent_logprobs = [], []
        if finish is not None:
            del self._seqs[seq_id]
        return SequenceOutput(seq.request_id, seq.index, token_ids, text, now,
                              logprobs if p.logprobs is not None else None, prompt_logprobs, finish,
                              seq.prompt_tokens, seq.tokens, queue_s if finish else 0.0, width, predicted_s)

    def finish(self, seq_id: int, reason: str, now: float, width: str | None = None,
               prompt_logprobs: list[Logprob] | None = None, queue_s: float = 0.0) -> SequenceOutput | None:
        """End a sequence without a new token (refused, cancelled, aborted, or nothing to generate);
        None when it already ended."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return None
        return SequenceOutput(seq.request_id, seq.index, [], "", now, None, prompt_logprobs, reason,
                              seq.prompt_tokens, seq.tokens, queue_s, width)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._seqs
