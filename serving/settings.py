"""One settings model per server, the only place their defaults are written.

:class:`ServeSettings` (``matta serve``: an engine over a checkpoint) and :class:`RouteSettings`
(``matta route``: a proxy over one backend per width) share :class:`FrontendSettings`, everything
the one OpenAI front end needs. Every source is read through them: the CLI flags are generated
from the fields (:func:`add_flags`), ``MATTA_<FIELD>`` environment variables fill fields no
flag or file gave (:func:`settings_from`), the route YAML and the Ray Serve app's arguments are
validated by them (strings coerced and checked as pydantic does, errors naming the field).
Torch-free.
"""

from __future__ import annotations

import argparse
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from matta.config import DEFAULT_CHECKPOINT, DTYPE_CHOICES
from matta.configfile import MAX_CONFIG_DEPTH, MAX_CONFIG_NODES

ENV_PREFIX = "MATTA_"
CompileMode = Literal["off", "background", "require"]  # serving/worker/compiled.py: what each mode does


def _flag(name: str, **extra: Any) -> dict:
    """Field metadata: the CLI flag's name when it is not the field's (``--<flag>``), and more."""
    return {"json_schema_extra": {"flag": name, **extra}}


class FrontendSettings(BaseModel):
    """What the OpenAI front end needs, whichever backend it serves from."""

    model_config = ConfigDict(extra="forbid")

    policy: str | None = Field(None, description="width policy for unpinned requests: fixed:<width> or "
                                                 "slo[:key=value,...] (default: fixed:<widest>)")
    slo_ms: float | None = Field(None, gt=0, description="end-to-end latency target (ms) of requests that give none")
    ttft_slo_ms: float | None = Field(None, gt=0, description="time-to-first-token target (ms) of requests that "
                                                              "give none")
    tpot_slo_ms: float | None = Field(None, gt=0, description="time-per-output-token target (ms) of requests that "
                                                              "give none")
    min_width: str | None = Field(None, description="slo policy: never serve unpinned requests below this width")
    shed: bool = Field(False, description="slo policy: answer 429 + Retry-After when no width can meet the SLO "
                                          "(default: best effort)")
    quality_metric: Literal["cloze_acc", "inverse_ppl"] = Field(
        "cloze_acc", description="per-width quality (from training.json) behind matta_effective_quality")
    experiment: Path | None = Field(None, description="A/B experiment config (YAML): arms are width policies")
    ab_db: Path | None = Field(None, description="SQLite log of exposures and outcomes "
                                                 "(default: runs/ab/<experiment>.<host>.<pid>.sqlite)")
    admin_key: str | None = Field(None, description="Bearer key for /admin/* (experiment reload); unset disables "
                                                    "the admin API", **_flag("admin-key", secret=True))
    api_key: str | None = Field(None, description="require `Authorization: Bearer KEY` on every route but /health "
                                                  "(prefer $MATTA_API_KEY: flags show in `ps`)",
                                **_flag("api-key", secret=True))
    retry_after_s: int = Field(1, ge=1, description="Retry-After (s) of 429/503 answers that have no better estimate")
    max_retry_after_s: int = Field(60, ge=1, description="the longest Retry-After any answer gives")
    shutdown_timeout_s: float = Field(30.0, gt=0, description="on SIGTERM, how long in-flight requests may take to "
                                                              "finish")
    request_timeout_s: float | None = Field(300.0, gt=0, description="cancel a completion running longer (504); "
                                                                     "0 disables")
    max_concurrency: int | None = Field(1024, gt=0, description="more requests in the server at once get 503 + "
                                                                "Retry-After (/health and /metrics excepted); 0 disables")
    max_body_bytes: int = Field(1 << 20, gt=0, description="larger request bodies get 413")
    header_timeout_s: float = Field(10.0, gt=0, description="close a connection whose request head takes longer "
                                                            "(idle or slowloris clients)")
    body_timeout_s: float = Field(30.0, gt=0, description="answer 408 when a request body takes longer than this "
                                                          "after its head")
    max_header_bytes: int = Field(64 * 1024, gt=0, description="a request head (request line and headers) over "
                                                               "this gets 431 and the connection is closed")
    max_response_entries: int = Field(1 << 19, gt=0, description="non-streaming requests that could produce more "
                                      "tokens than this, each logprobs alternative counted as one (prompts x (echoed "
                                      "prompt + max_tokens) x (2 + logprobs)), get 400; stream them instead")
    max_feedback_abs: float = Field(1e12, gt=0, allow_inf_nan=False, description="/v1/feedback values must be "
                                    "within +-this, unless the experiment config gives the metric its own range")
    chat_template: str | None = Field(None, description="jinja chat template file for /v1/chat/completions (or "
                                      "'chatml', the shipped ChatML template); replaces the model's own, which "
                                      "models without one need")
    max_config_depth: int = Field(MAX_CONFIG_DEPTH, gt=0, description="experiment reloads nested deeper get 400")
    max_config_nodes: int = Field(MAX_CONFIG_NODES, gt=0, description="experiment reloads with more values, "
                                  "YAML aliases expanded, get 400")

    @field_validator("request_timeout_s", "max_concurrency", mode="before")
    @classmethod
    def _zero_disables(cls, value: Any) -> Any:
        return None if value in (0, "0", 0.0) else value


class ServeSettings(FrontendSettings):
    """``matta serve``: one checkpoint, every width, the in-process engine."""

    checkpoint: Path = Field(DEFAULT_CHECKPOINT, description="checkpoint directory", **_flag("checkpoint",
                                                                                               positional=True))
    engine: Literal["process", "inproc"] = Field(
        "process", description="where the engine runs: its own process (scheduler, model and sampler away from "
                               "the HTTP side's GIL) or a thread of the server process")
    max_batch: int = Field(32, ge=1, description="sequences decoded together")
    max_queue: int = Field(256, ge=1, description="sequences waiting before 429")
    # The default reads MATTA_COMPILE even when the settings are built in code (not only through
    # settings_from): the test suite runs eager unless a test asks for compiled steps.
    compile: CompileMode = Field(
        default_factory=lambda: os.environ.get(ENV_PREFIX + "COMPILE") or "background",
        description="compiled decode steps (torch.compile): off; background (serve eager at once, swap compiled "
                    "steps in as a worker process finishes them); require (compile before serving)")
    on_core_death: Literal["restart", "exit"] = Field(
        "restart", description="when the engine-core process dies (engine=process): fail what is in flight (503), "
                               "then start a new core with back-off, /health 503 until it is ready (restart), or "
                               "drain and exit with status 3 for a supervisor to restart the server (exit)")
    compile_cache: Path | None = Field(None, description="directory of compiled decode steps, reused across "
                                                         "restarts (default: ~/.cache/matta/compile)")
    device: str | None = Field(None, description="cpu, cuda, cuda:1 (default: CUDA when present)")
    dtype: Literal[DTYPE_CHOICES] = Field(
        "float32", description="weights and KV cache: float32, bfloat16 (norms, softmax and logits in float32), "
                               "or auto (bfloat16 where the CPU or GPU computes it natively)")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (default: all cores but one, left to "
                                                        "the HTTP loop)")
    profile: Path | None = Field(None, description="latency profile from `matta profile` (default: measured at "
                                                   "start-up when a policy needs one)")
    calibrate: Literal["on", "off"] = Field(
        "on", description="with a latency profile, run every batch-size bucket once before the first request (about "
                         "a second) so the first burst is priced on this process's measured steps; off: buckets are "
                         "learnt from traffic, an unseen one borrowing another's correction")
    # Off by default: measured on the shipped checkpoint, changes did not raise SLO attainment, cost
    # 1-2% of the in-SLO answers' quality, and the answers a burst admitted by narrowing came late
    # (docs/width_changes.md).
    width_changes: Literal["on", "off"] = Field(
        "off", description="running sequences may change width mid-generation (narrow under a burst, widen when it "
                          "passes; a pinned request or one with width_changes false never does)")
    # Chunked prefill's default, measured by benchmarks/chunked_prefill.py (docs/serving.md#chunked-prefill).
    max_num_batched_tokens: int = Field(
        128, ge=0, description="chunked prefill: tokens one engine iteration may run, a decode step's rows (one each) "
                              "first, then chunks of prompts; a longer prompt spans iterations instead of stalling "
                              "every running answer for its whole prefill. 0: unchunked, each prompt in one forward "
                              "(otherwise at least max_batch)")

    @model_validator(mode="after")
    def _token_budget_holds_a_batch(self) -> ServeSettings:
        if 0 < self.max_num_batched_tokens < self.max_batch:
            # Every decoding row takes a token first: a smaller budget could leave prompts none.
            raise ValueError(f"max_num_batched_tokens must be 0 (unchunked) or at least max_batch "
                             f"({self.max_batch}), got {self.max_num_batched_tokens}")
        return self


class BackendSpec(BaseModel):
    """One backend of ``matta route``: an OpenAI-compatible server serving one width."""

    model_config = ConfigDict(extra="forbid")

    width: str = Field(min_length=1)
    url: str = Field(description="base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8001")
    model: str = Field(description="the model id to send to this backend")

    @field_validator("url")
    @classmethod
    def _http(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"backend url must start with http:// or https://, got {url!r}")
        return url.rstrip("/")


class RouteSettings(FrontendSettings):
    """``matta route CONFIG.yaml``: the same front end over one backend per width (narrowest first)."""

    model: str = Field(min_length=1, description="the model id clients ask for; '<model>:<width>' pins a width")
    checkpoint: Path | None = Field(None, description="per-width quality from this checkpoint's training.json")
    quality: dict[str, float] | None = Field(None, description="explicit per-width quality (overrides checkpoint)")
    max_in_flight: int = Field(1024, gt=0, description="requests in flight through the proxy before 429")
    max_model_len: int | None = Field(None, gt=0, description="the backends' context window (tokens): clamps "
                                      "max_tokens in the latency predictions (default: unknown, no clamp)")
    backends: list[BackendSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _widths(self) -> RouteSettings:
        widths = [b.width for b in self.backends]
        if len(set(widths)) != len(widths):
            raise ValueError(f"backends: each width once, got {widths}")
        if self.min_width is not None and self.min_width not in widths:
            raise ValueError(f"min_width {self.min_width!r} is not a backend width {widths}")
        return self

    @property
    def widths(self) -> list[str]:
        return [b.width for b in self.backends]


Settings = TypeVar("Settings", bound=BaseModel)


def settings_from(model: type[Settings], *sources: Mapping[str, Any], source: str = "settings",
                  environ: Mapping[str, str] | None = None) -> Settings:
    """Validate ``model`` from ``sources`` (later ones win) over ``MATTA_<FIELD>`` environment variables.

    Precedence: defaults < environment < sources in order (e.g. a YAML file, then CLI flags).
    Raises ValueError naming the field and the source on any invalid value.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name in model.model_fields:
        env = environ.get(ENV_PREFIX + name.upper())
        if env is not None and _is_scalar(model.model_fields[name].annotation):
            values[name] = env
    for given in sources:
        values.update(given)
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise ValueError(describe_errors(exc, source)) from None


def describe_errors(exc: ValidationError, source: str) -> str:
    """One line per problem, naming the field: ``source: field.path: message``."""
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        lines.append(f"{source}: {where}: {error['msg']}")
    return "\n".join(lines)


def _is_scalar(annotation: Any) -> bool:
    return _scalar_type(annotation) is not None


def _scalar_type(annotation: Any) -> type | None:
    """The one scalar type of a field (``float | None`` -> float), or None for lists, dicts and models."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return _scalar_type(args[0]) if len(args) == 1 else None
    if typing.get_origin(annotation) is Literal:
        return str
    if annotation in (str, int, float, bool, Path):
        return annotation
    return None


def flag_name(name: str, field) -> str:
    extra = field.json_schema_extra or {}
    return extra.get("flag") or name.removesuffix("_s").replace("_", "-")


def add_flags(parser: argparse.ArgumentParser, model: type[BaseModel], skip: frozenset[str] = frozenset()) -> None:
    """One flag per scalar field of ``model`` (``--max-batch``), with its type, choices, help and
    default as the field says. Flags the user does not give stay out of the namespace
    (``argparse.SUPPRESS``), so :func:`flag_values` passes only what was given and the model's
    default, the environment or a config file decide the rest."""
    for name, field in model.model_fields.items():
        scalar = _scalar_type(field.annotation)
        if name in skip or scalar is None:
            continue
        extra = field.json_schema_extra or {}
        default = field.get_default(call_default_factory=True)
        shown = "" if extra.get("secret") or default is None else f" (default: {default})"
        options: dict[str, Any] = {"help": (field.description or "") + shown, "default": argparse.SUPPRESS}
        if typing.get_origin(_non_none(field.annotation)) is Literal:
            options["choices"] = list(typing.get_args(_non_none(field.annotation)))
        if scalar is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = scalar
            unit = {"_s": "SECONDS", "_ms": "MS", "_bytes": "BYTES"}
            metavar = next((m for suffix, m in unit.items() if name.endswith(suffix)), None)
            if metavar:
                options["metavar"] = metavar
        if extra.get("positional"):
            parser.add_argument(name, nargs="?", **{**options, "metavar": name.upper()})
        else:
            parser.add_argument(f"--{flag_name(name, field)}", dest=name, **options)


def _non_none(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def flag_values(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The fields of ``model`` that were given on the command line."""
    # An omitted optional positional comes back as the SUPPRESS marker itself (through its type).
    return {name: value for name, value in vars(args).items()
            if name in model.model_fields and str(value) != argparse.SUPPRESS}
