"""``POST /v1/chat/completions`` on the one front end, for ``matta serve`` and ``matta route`` alike.

A chat request is a completion request in other clothes: its messages become one prompt through
the model's chat template (:mod:`serving.api.chat_template`), then :meth:`Frontend.create_completion`
serves it, so the width policy and extension, SLO fields and headers, A/B arms, guardrails,
metrics, deadlines and errors are exactly the completion path's. Only the answer is re-rendered:
``chat.completion`` (a message with role and content) or ``chat.completion.chunk`` events (the
role first, then content deltas), with chat-shaped logprobs. ``matta route`` renders the prompt
itself and forwards it as a completion, which both pinned ``matta serve`` backends and vLLM
serving exports take. Torch-free.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, ValidationError, field_validator

from serving.api.chat_template import ChatTemplate, ChatTemplateError
from serving.api.http import COMPLETION_RESPONSES, APIError
from serving.api.protocol import MAX_LOGPROBS, CompletionRequest, JsonFloat, JsonInt, StreamOptions, _json_number, _valid_unicode

# Fields whose meaning differs between the two requests; everything else a CompletionRequest
# knows (matta's extensions included, present and future) passes through as it came.
_CHAT_ONLY = {"messages", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs", "echo", "prompt",
              "tools", "tool_choice", "response_format", "add_generation_prompt", "chat_template_kwargs"}


_Ms = Annotated[float, Field(gt=0), BeforeValidator(_json_number)] | None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message; ``content`` is text or a list of text parts (joined with newlines, as vLLM does)."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    _unicode = field_validator("content", "name")(_valid_unicode)

    def for_template(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        message: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions`` (OpenAI's chat schema). Unknown fields are kept and handed to the
    completion path, which takes the ones it knows (matta's extensions) and ignores the rest."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(description="the checkpoint name (routed) or '<name>:<width>' (pinned)")
    messages: list[ChatMessage] = Field(min_length=1, description="the conversation so far")
    max_tokens: Annotated[int, Field(ge=0), BeforeValidator(_json_number)] | None = Field(
        None, description="deprecated by OpenAI for max_completion_tokens; default: up to the context window")
    max_completion_tokens: Annotated[int, Field(ge=0), BeforeValidator(_json_number)] | None = None
    temperature: JsonFloat = Field(1.0, ge=0.0, le=2.0, description="0 is greedy")
    top_p: JsonFloat = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=-(2**53), le=2**53), BeforeValidator(_json_number)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), BeforeValidator(_json_number)] | None = None
    user: str | None = None
    n: JsonInt = Field(1, json_schema_extra={"enum": [1]})
    presence_penalty: JsonFloat = Field(0.0, json_schema_extra={"enum": [0]})
    frequency_penalty: JsonFloat = Field(0.0, json_schema_extra={"enum": [0]})
    tools: list[Any] | None = Field(None, json_schema_extra={"enum": [None]})
    # matta extensions, as on completions (CompletionRequest's descriptions); extensions added there
    # later reach the completion path as extra fields even before they are declared here
    latency_slo_ms: _Ms = Field(None, description=CompletionRequest.model_fields["latency_slo_ms"].description)
    ttft_slo_ms: _Ms = Field(None, description=CompletionRequest.model_fields["ttft_slo_ms"].description)
    tpot_slo_ms: _Ms = Field(None, description=CompletionRequest.model_fields["tpot_slo_ms"].description)
    width: str | None = Field(None, description=CompletionRequest.model_fields["width"].description)

    _unicode = field_validator("model", "stop", "user", "width")(_valid_unicode)

    def to_completion(self, prompt: str, default_max_tokens: int) -> CompletionRequest:
        """The completion request that serves this chat: the rendered ``prompt``, the same sampling,
        limits and extensions; logprobs as the completion API counts them."""
        if self.tools:
            raise APIError(400, "tools are not supported by this server; send the conversation without them",
                           param="tools", code="unsupported")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, f"top_logprobs={self.top_logprobs} needs logprobs=true", param="top_logprobs")
        fields = self.model_dump(exclude_unset=True, exclude=_CHAT_ONLY)
        fields.update(self.model_extra or {})
        for name in _CHAT_ONLY:
            fields.pop(name, None)
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        fields.update(model=self.model, prompt=prompt,
                      max_tokens=default_max_tokens if max_tokens is None else max_tokens,
                      logprobs=(self.top_logprobs or 0) if self.logprobs else None)
        try:
            return CompletionRequest.model_validate(fields)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise APIError(400, f"{where}: {first.get('msg', 'invalid')}".removeprefix(": "),
                           param=where or None) from None


def _chat_logprobs(completion_logprobs: dict | None) -> dict | None:
    """OpenAI's chat ``logprobs`` ({"content": [{token, logprob, bytes, top_logprobs}]}) from the
    completion API's parallel lists."""
    if completion_logprobs is None:
        return None
    content = []
    for token, logprob, top in zip(completion_logprobs.get("tokens", []), completion_logprobs.get("token_logprobs", []),
                                   completion_logprobs.get("top_logprobs", []), strict=False):
        content.append({"token": token, "logprob": logprob, "bytes": list(token.encode()),
                        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                                         for t, lp in (top or {}).items()]})
    return {"content": content}


def _chat_choice(choice: dict) -> dict:
    return {"index": choice["index"], "message": {"role": "assistant", "content": choice["text"]},
            "logprobs": _chat_logprobs(choice.get("logprobs")), "finish_reason": choice.get("finish_reason")}


def _chunk_choice(choice: dict) -> dict:
    delta = {"content": choice["text"]} if choice["text"] else {}
    return {"index": choice["index"], "delta": delta, "logprobs": _chat_logprobs(choice.get("logprobs")),
            "finish_reason": choice.get("finish_reason")}


def _response_headers(response: Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")}


async def _chat_events(upstream: AsyncIterator, body: ChatCompletionRequest) -> AsyncIterator[str]:
    """The completion path's SSE events as chat chunks: the assistant's role first, then each
    completion chunk's text as a content delta; usage, error events and ``[DONE]`` as they come."""
    role_sent = False
    buffer = ""
    async for piece in upstream:
        buffer += piece if isinstance(piece, str) else piece.decode()
        *events, buffer = buffer.split("\n\n")
        for event in events:
            if not event.startswith("data: "):
                continue
            data = event.removeprefix("data: ")
            if data == "[DONE]":
                yield "data: [DONE]\n\n"
                continue
            payload = json.loads(data)
            if "error" in payload:
                yield f"data: {data}\n\n"
                continue
            head = {"id": payload["id"], "object": "chat.completion.chunk", "created": payload["created"],
                    "model": payload["model"]}
            if not role_sent and payload["choices"]:
                role_sent = True
                yield "data: " + json.dumps({**head, "choices": [
                    {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}]}) + "\n\n"
            chunk = {**head, "choices": [_chunk_choice(c) for c in payload["choices"]]}
            if "usage" in payload:
                chunk["usage"] = payload["usage"]
            yield "data: " + json.dumps(chunk) + "\n\n"


async def create_chat_completion(frontend, template: ChatTemplate | None, body: ChatCompletionRequest,
                                 raw_request: Request) -> Response:
    """Serve one chat request through ``frontend``'s completion path; APIError 400 for a model
    without a chat template or messages its template refuses."""
    if template is None:
        raise APIError(400, f"model {frontend.model_name!r} has no chat template (its tokenizer defines none); "
                            "start the server with --chat-template FILE (or --chat-template chatml), or use "
                            "/v1/completions", param="messages", code="no_chat_template")
    try:
        prompt = template.render([m.for_template() for m in body.messages], add_generation_prompt=True)
    except ChatTemplateError as exc:
        raise APIError(400, str(exc), param="messages", code="chat_template_error") from None
    if not prompt:
        raise APIError(400, "the chat template rendered these messages as an empty prompt", param="messages")
    # Without max_tokens a chat answer may run to the end of the context (the engine stops there).
    completion = body.to_completion(prompt, frontend.backend.max_model_len or 16)
    response = await frontend.create_completion(completion, raw_request)
    if isinstance(response, StreamingResponse):
        return StreamingResponse(_chat_events(response.body_iterator, body), media_type="text/event-stream",
                                 headers=_response_headers(response), background=response.background)
    if response.status_code != 200:
        return response  # e.g. 499: the client left; nothing to re-render
    payload = json.loads(response.body)
    chat = {"id": payload["id"], "object": "chat.completion", "created": payload["created"], "model": payload["model"],
            "choices": [_chat_choice(c) for c in payload["choices"]], "usage": payload.get("usage")}
    return Response(json.dumps(chat), media_type="application/json", headers=_response_headers(response))


def install_chat_route(app: FastAPI, template: ChatTemplate | None) -> None:
    """Add ``POST /v1/chat/completions`` to a front-end app (:func:`serving.api.frontend.build_frontend_app`)."""
    frontend = app.state.frontend
    app.state.chat_template = template

    @app.post("/v1/chat/completions", responses=COMPLETION_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(frontend, template, body, request)

    app.openapi_schema = None  # the schema is built on first use; make sure it includes this route
