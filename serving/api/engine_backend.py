"""``matta serve``'s backend: the checkpoint's engine behind the one front end (:mod:`serving.api.frontend`).

Tokenizing, echo and logprob tokens as text happen here, on the API side; the engine
(:mod:`serving.engine.core`) takes token ids and sends back text (its output processor detokenizes
where the stop decision is made). The engine's scheduler chooses the width, admits and refuses:
this backend only passes on the request's allowed widths and targets.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from matta.tokenizer import Tokenizer
from router.policy import LoadSnapshot
from serving import messages as msg
from serving.api.backend import Delta, LogprobEntry, PreparedPrompts
from serving.api.http import APIError
from serving.api.protocol import CompletionRequest
from serving.engine.inproc import EngineStoppedError, RequestStream


@dataclass(frozen=True)
class _Prompt:
    ids: list[int]
    text: str | None  # what echo returns; None: token ids, decoded only if echo asks


class EngineStream:
    """A request's engine outputs as :class:`~serving.api.backend.Delta`: text, echo and logprobs rendered."""

    usage: tuple[int, int] | None = None

    def __init__(self, events: RequestStream, prompts: list[_Prompt], tokenizer: Tokenizer, echo: bool) -> None:
        self._events, self._prompts, self._tokenizer = events, prompts, tokenizer
        self._echo_pending = [echo] * len(prompts)

    def __aiter__(self) -> AsyncIterator[tuple[int, Delta]]:
        return self._deltas()

    async def _deltas(self) -> AsyncIterator[tuple[int, Delta]]:
        async for index, out in self._events:
            text = out.text
            if self._echo_pending[index] and out.finish_reason not in msg.REFUSALS:
                self._echo_pending[index] = False
                prompt = self._prompts[index]
                text = (prompt.text if prompt.text is not None else self._tokenizer.decode(prompt.ids)) + text
            logprobs = [*map(self._entry, out.prompt_logprobs or ()), *map(self._entry, out.logprobs or ())]
            yield index, Delta(text, out.time, tokens=len(out.token_ids), logprobs=logprobs,
                               finish_reason=out.finish_reason, completion_tokens=out.completion_tokens,
                               queue_s=out.queue_s if out.finish_reason is not None else None,
                               width=out.width, predicted_s=out.predicted_s, widths=out.widths)

    def _entry(self, lp: msg.Logprob) -> LogprobEntry:
        token = self._tokenizer.token_bytes
        token_id, logprob, top = lp
        return LogprobEntry(token(token_id), logprob, None if logprob is None else {token(t): v for t, v in top})

    def cancel(self) -> None:
        self._events.cancel()


class EngineBackend:
    """The engine of one checkpoint: every width from one copy of the weights. ``engine`` is the
    in-process :class:`~serving.engine.inproc.Engine` or the :class:`~serving.engine.core_client.EngineCoreClient`
    of an engine-core process; both have the same interface."""

    cost = None  # the engine's scheduler prices every request itself: the front end predicts nothing
    dispatches_width = True

    def __init__(self, engine, tokenizer: Tokenizer, retry_after_s: int = 1) -> None:
        config = engine.config
        self.engine, self.tokenizer, self.retry_after_s = engine, tokenizer, retry_after_s
        self.name = config.name
        self.widths = config.served_widths  # uniform widths and Mix'n'Match profiles, cheapest first
        self.max_model_len = config.n_ctx
        self.vocab_size = config.vocab_size

    @property
    def accepting(self) -> bool:
        return self.engine.accepting

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        self.engine.start()
        try:
            yield
        finally:
            self.engine.stop()

    def prepare(self, prompt) -> PreparedPrompts:
        if isinstance(prompt, str):
            prompts = [_Prompt(self.tokenizer.encode(prompt), prompt)]
        elif all(isinstance(p, str) for p in prompt):
            prompts = [_Prompt(ids, text) for ids, text in zip(self.tokenizer.encode_batch(prompt), prompt, strict=True)]
        elif all(isinstance(p, int) for p in prompt):
            prompts = [_Prompt(list(prompt), None)]
        else:
            prompts = [_Prompt(list(p), None) for p in prompt]
        vocab, n_ctx = self.vocab_size, self.max_model_len
        for i, p in enumerate(prompts):
            if not p.ids:
                raise APIError(400, f"prompt {i} is empty (it has no tokens)", param="prompt")
            bad = next((t for t in p.ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise APIError(400, f"prompt {i} has token id {bad}, outside the vocabulary 0..{vocab - 1}",
                               param="prompt")
            if len(p.ids) > n_ctx:
                raise APIError(413, f"prompt {i} has {len(p.ids)} tokens; this model's context window is {n_ctx} "
                                    "tokens", param="prompt", code="context_length_exceeded")
        if len(prompts) > self.engine.max_queue:
            raise APIError(400, f"{len(prompts)} prompts in one request; this server queues at most "
                                f"{self.engine.max_queue}", param="prompt")
        return PreparedPrompts(n_prompts=len(prompts), prompt_tokens=sum(len(p.ids) for p in prompts),
                               longest_prompt=max(len(p.ids) for p in prompts), payload=prompts)

    def load(self) -> LoadSnapshot:
        s = self.engine.stats()
        return LoadSnapshot(waiting=s.waiting, running=s.running, running_by_width=s.running_by_width,
                            waiting_by_width=s.waiting_by_width, max_batch=s.max_batch, max_queue=s.max_queue,
                            groups=s.groups, remaining_tokens=tuple(s.remaining_tokens))

    async def submit(self, prompts: PreparedPrompts, widths: tuple[str, ...], body: CompletionRequest,
                     slo: msg.Slo) -> EngineStream:
        params = msg.Sampling(
            max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
            stop=tuple(body.stop_strings), logprobs=body.logprobs,
            prompt_logprobs=body.echo and body.logprobs is not None)
        retry = {"retry-after": str(self.retry_after_s)}
        try:
            # A plain (not streamed) answer needs its first token (the width) and its end only.
            events = self.engine.submit([p.ids for p in prompts.payload], widths, params, slo, stream=body.stream,
                                        width_changes=body.width_changes)
        except EngineStoppedError as exc:
            raise APIError(503, str(exc), type_="service_unavailable", code="shutting_down", headers=retry) from exc
        return EngineStream(events, prompts.payload, self.tokenizer, body.echo)

    async def health(self) -> tuple[bool, dict]:
        if not getattr(self.engine, "alive", True):  # an engine-core process that died (serving.engine.core_client)
            return False, {"error": self.engine.health_error}
        stats = self.engine.stats()
        return True, {"running": stats.running, "waiting": stats.waiting,
                      "compiled": {"ready": stats.compile_ready, "signatures": stats.compile_signatures}}

    def engine_counters(self) -> msg.Load:
        return self.engine.stats()
