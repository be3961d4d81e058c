"""The one benchmark client of every serving benchmark: arrivals, requests, metrics in vLLM's terms.

What it sends (any OpenAI-compatible ``/v1/completions`` server: ``matta serve``, ``matta route``,
vLLM):
- open loop: each :class:`Request` at its ``arrival_s``, whatever the server is doing
  (:func:`run_open_loop`), on a schedule from :func:`arrivals` (Poisson, or gamma with vLLM's
  ``burstiness``: the shape of the gamma inter-arrival times, 1 is Poisson, lower is burstier),
  :func:`ramp_arrivals` (Poisson whose rate ramps linearly), or a trace
  (:mod:`benchmarks.traces`);
- closed loop: ``concurrency`` requests in flight at all times (:func:`run_closed_loop`), as
  ``vllm bench serve --max-concurrency C --request-rate inf``.

What it measures per request (:class:`RequestOutput`), as ``vllm bench serve`` does: TTFT (due ->
first streamed chunk with choices), ITL (gaps between such chunks), E2EL (due -> last such chunk),
TPOT = (E2EL - TTFT) / (output tokens - 1), the output tokens the server's usage reports, and the
width served (``x-matta-width``). :func:`summarize` reduces them to vLLM's metric names
(``request_throughput``, ``output_throughput``, ``mean_ttft_ms``, ``median_ttft_ms``,
``p99_ttft_ms`` ...) with p50/p90/p99 and **goodput as vLLM defines it**: a completed request is
good when it meets every configured SLO among ``ttft``, ``tpot``, ``e2el`` (ms; a request with at
most one output token has TPOT 0 for this test), ``request_goodput`` = good requests / duration.
``good_fraction`` (good / requests sent, failures included) is what SLO sweeps compare to a target.

Requests go over raw asyncio streams rather than httpx: on 2 cores httpx's ~2.5 ms of CPU per
request at a hundred or more requests/s starves the server it measures and the schedule slips.

    python -m benchmarks.client --url http://127.0.0.1:8000 --model matta-shakespeare \\
        --request-rate 20 --burstiness 0.5 --num-prompts 400 --goodput ttft:200 tpot:20 --rows runs/x.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from serving.lifecycle import freeze_startup_heap

PERCENTILES = (50, 90, 99)
SLO_METRICS = ("ttft", "tpot", "e2el")
RUNS = Path(__file__).resolve().parent.parent / "runs"
"""Where per-request rows go (ignored by git): ``runs/bench/<name>.jsonl``."""


@dataclass
class Request:
    """One completion to send: token ids (or text), how many tokens, when (open loop), and any
    extra body fields (``latency_slo_ms``, ``ttft_slo_ms``, ``width``, ...)."""

    prompt: list[int] | str
    max_tokens: int
    arrival_s: float = 0.0
    model: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class RequestOutput:
    """What one request measured. Times are seconds from when it was due (open loop) or sent
    (closed loop); ``arrival_s`` is that moment, from the start of the run."""

    arrival_s: float
    status: int = 0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    latency_s: float | None = None
    output_tokens: int | None = None
    prompt_tokens: int | None = None
    width: str | None = None
    widths: str | None = None  # every width served, ``width@token`` steps (``x-matta-widths``, or streamed usage)
    send_lag_s: float = 0.0
    retry_after: float | None = None
    predicted_s: float | None = None
    error: str | None = None

    @property
    def success(self) -> bool:
        return self.status == 200 and self.error is None and self.latency_s is not None

    @property
    def tpot_s(self) -> float:
        """vLLM's TPOT: (E2EL - TTFT) / (output tokens - 1); 0 with at most one output token."""
        n = self.output_tokens or 0
        if n <= 1 or self.ttft_s is None or self.latency_s is None:
            return 0.0
        return (self.latency_s - self.ttft_s) / (n - 1)


# --- arrivals ---------------------------------------------------------------------------------


def arrivals(num_requests: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Arrival times (s) of ``num_requests`` as ``vllm bench serve`` draws them: gamma inter-arrival
    times with shape ``burstiness`` and mean ``1 / request_rate`` (burstiness 1 is Poisson; inf is
    evenly spaced), rescaled so the last arrives at ``num_requests / request_rate``; all at 0 for an
    infinite rate."""
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if request_rate <= 0:
        raise ValueError(f"request_rate must be > 0, got {request_rate}")
    if num_requests <= 0:
        return []
    if math.isinf(request_rate):
        return [0.0] * num_requests
    if math.isinf(burstiness):
        gaps = np.full(num_requests, 1.0 / request_rate)
    else:
        rng = np.random.default_rng(seed)
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num_requests)
    times = np.cumsum(gaps)
    times *= (num_requests / request_rate) / times[-1]
    return times.tolist()


def ramp_arrivals(rate_from: float, rate_to: float, duration_s: float, seed: int = 0) -> list[float]:
    """Poisson arrivals over ``duration_s`` whose rate ramps linearly from ``rate_from`` to
    ``rate_to`` (thinning of a process at the peak rate)."""
    rng = random.Random(seed)
    peak = max(rate_from, rate_to)
    t, out = 0.0, []
    while True:
        t += rng.expovariate(peak)
        if t >= duration_s:
            return out
        if rng.random() < (rate_from + (rate_to - rate_from) * t / duration_s) / peak:
            out.append(t)


def requests_at(times: Iterable[float], prompts: Sequence[list[int] | str], max_tokens: int, model: str,
                extra: dict | None = None, seed: int = 0) -> list[Request]:
    """One request per arrival time, each a prompt drawn (seeded) from ``prompts``."""
    rng = random.Random(seed)
    return [Request(prompts[rng.randrange(len(prompts))], max_tokens, t, model, dict(extra or {})) for t in times]


# --- one request ------------------------------------------------------------------------------


class _Chunked:
    """Incremental HTTP/1.1 chunked-transfer decoder: ``feed`` raw bytes, get payload bytes."""

    def __init__(self) -> None:
        self.buf = b""
        self.left = 0  # payload bytes still to come in the current chunk
        self.need_crlf = False  # the CRLF that ends a chunk's payload
        self.done = False

    def feed(self, data: bytes) -> bytes:
        self.buf += data
        out = bytearray()
        while not self.done:
            if self.need_crlf:
                if len(self.buf) < 2:
                    break
                self.buf, self.need_crlf = self.buf[2:], False
            if self.left == 0:
                line, sep, rest = self.buf.partition(b"\r\n")
                if not sep:
                    break
                self.buf, self.left = rest, int(line.split(b";")[0] or b"0", 16)
                if self.left == 0:
                    self.done = True
                    break
            take = self.buf[: self.left]
            out += take
            self.buf, self.left = self.buf[len(take):], self.left - len(take)
            if self.left:
                break
            self.need_crlf = True
        return bytes(out)


def parse_sse_events(payload: bytes) -> tuple[list[bytes], bytes]:
    """Complete ``data:`` events in ``payload`` and the incomplete rest."""
    *events, rest = payload.split(b"\n\n")
    return [e[6:] for e in events if e.startswith(b"data: ")], rest


async def send(host: str, port: int, body: dict, due: float, start: float, timeout_s: float) -> RequestOutput:
    """POST one completion body (streamed when ``body["stream"]``) on its own connection; times from
    ``due`` (a ``time.perf_counter()`` value)."""
    payload = json.dumps(body).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n").encode()
    out = RequestOutput(arrival_s=due - start, send_lag_s=time.perf_counter() - due)
    stream = bool(body.get("stream"))
    last = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(head + payload)
            raw = b""
            while b"\r\n\r\n" not in raw:
                chunk = await reader.read(65536)
                if not chunk:
                    raise ConnectionError("connection closed before the response head")
                raw += chunk
            header_bytes, _, rest = raw.partition(b"\r\n\r\n")
            lines = header_bytes.decode("latin-1").split("\r\n")
            out.status = int(lines[0].split()[1])
            headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
            out.width = headers.get("x-matta-width")
            out.widths = headers.get("x-matta-widths")
            out.retry_after = _seconds(headers.get("retry-after"))
            if "x-matta-predicted-ms" in headers:
                out.predicted_s = float(headers["x-matta-predicted-ms"]) / 1000
            chunked = _Chunked() if headers.get("transfer-encoding") == "chunked" else None
            content, pending = b"", (chunked.feed(rest) if chunked else rest)
            while True:
                if stream and out.status == 200:
                    events, pending = parse_sse_events(pending)
                    now = time.perf_counter()
                    for event in events:
                        if event == b"[DONE]":
                            continue
                        data = json.loads(event)
                        if "error" in data:
                            out.error = str(data["error"].get("code") or data["error"].get("message"))
                        elif data.get("choices"):  # a chunk with choices is a token event, as vLLM counts
                            if last is None:
                                out.ttft_s = now - due
                            else:
                                out.itl_s.append(now - last)
                            last = now
                        if data.get("usage"):
                            out.output_tokens = data["usage"].get("completion_tokens")
                            out.prompt_tokens = data["usage"].get("prompt_tokens")
                            out.widths = data["usage"].get("widths") or out.widths
                else:
                    content, pending = content + pending, b""
                if chunked is not None and chunked.done:
                    break
                chunk = await reader.read(65536)
                if not chunk:
                    break
                pending += chunked.feed(chunk) if chunked else chunk
            writer.close()
    except (OSError, TimeoutError, ValueError, IndexError) as exc:
        out.error = type(exc).__name__
        return out
    if stream and out.status == 200:
        out.latency_s = None if last is None else last - due
        if last is None and out.error is None:
            out.error = "no chunk with choices"
    else:
        out.latency_s = time.perf_counter() - due
        if out.status == 200:
            usage = json.loads(content).get("usage", {})
            out.output_tokens, out.prompt_tokens = usage.get("completion_tokens"), usage.get("prompt_tokens")
    return out


def _seconds(value: str | None) -> float | None:
    """A header's number of seconds (``Retry-After`` may also be an HTTP date: then None)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _body(request: Request, stream: bool) -> dict:
    body = {"model": request.model, "prompt": request.prompt, "max_tokens": request.max_tokens,
            "temperature": 0, **request.extra}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


def _host_port(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("http://").rstrip("/").partition(":")
    return host, int(port or 80)


async def run_open_loop(url: str, requests: Sequence[Request], timeout_s: float = 300.0,
                        stream: bool = True) -> tuple[list[RequestOutput], float]:
    """Open loop: send each request at its ``arrival_s`` (seconds from now) whatever the earlier
    ones are doing. Returns the outputs in order and the run's duration (s, start to last answer)."""
    host, port = _host_port(url)
    freeze_startup_heap()  # a full collection of the caller's heap (torch, a checkpoint) mid-burst sends requests late
    start = time.perf_counter()
    tasks = []
    for request in sorted(requests, key=lambda r: r.arrival_s):
        due = start + request.arrival_s
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(host, port, _body(request, stream), due, start, timeout_s)))
    outputs = list(await asyncio.gather(*tasks))
    return outputs, time.perf_counter() - start


async def run_closed_loop(url: str, requests: Sequence[Request], concurrency: int, timeout_s: float = 300.0,
                          stream: bool = True, duration_s: float | None = None) -> tuple[list[RequestOutput], float]:
    """Closed loop: ``concurrency`` requests in flight, each client sending its next as soon as its
    last is answered; every request once, or, with ``duration_s``, cycling through them until then."""
    host, port = _host_port(url)
    freeze_startup_heap()  # as run_open_loop: no full collection of the caller's heap mid-run
    start = time.perf_counter()
    outputs: list[RequestOutput] = []
    count = 0

    def next_request() -> Request | None:
        nonlocal count
        if duration_s is None and count >= len(requests):
            return None
        if duration_s is not None and time.perf_counter() - start >= duration_s:
            return None
        count += 1
        return requests[(count - 1) % len(requests)]

    async def client() -> None:
        while (request := next_request()) is not None:
            outputs.append(await send(host, port, _body(request, stream), time.perf_counter(), start, timeout_s))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return sorted(outputs, key=lambda o: o.arrival_s), time.perf_counter() - start


# --- metrics ----------------------------------------------------------------------------------


def parse_goodput(pairs: Sequence[str] | None) -> dict[str, float]:
    """``["ttft:200", "tpot:20"]`` (vLLM's ``--goodput`` syntax, ms) -> ``{"ttft": 200.0, "tpot": 20.0}``."""
    slos = {}
    for pair in pairs or ():
        name, sep, value = pair.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"bad goodput SLO {pair!r}; expected KEY:MS with KEY in {list(SLO_METRICS)}")
        slos[name] = float(value)
    return slos


def is_good(output: RequestOutput, slo_ms: dict[str, float]) -> bool:
    """vLLM's test: a completed request meeting every configured SLO (ttft, tpot, e2el; ms)."""
    if not output.success:
        return False
    values = {"ttft": output.ttft_s if output.ttft_s is not None else output.latency_s, "tpot": output.tpot_s,
              "e2el": output.latency_s}
    return all(values[name] * 1000 <= limit for name, limit in slo_ms.items())


def _stats(name: str, values_s: list[float], percentiles: Sequence[float]) -> dict:
    ms = np.asarray(values_s, dtype=float) * 1000
    out = {f"mean_{name}_ms": float(ms.mean()) if ms.size else None,
           f"median_{name}_ms": float(np.median(ms)) if ms.size else None,
           f"std_{name}_ms": float(ms.std()) if ms.size else None}
    for p in percentiles:
        out[f"p{p:g}_{name}_ms"] = float(np.percentile(ms, p)) if ms.size else None
    return out


def summarize(outputs: Sequence[RequestOutput], duration_s: float, slo_ms: dict[str, float] | None = None,
              percentiles: Sequence[float] = PERCENTILES) -> dict:
    """vLLM's summary of a run (its names, its TPOT and goodput definitions), plus ``failed`` by
    status, ``good_fraction`` (good / sent) and ``width_mix`` (share of completed per width)."""
    done = [o for o in outputs if o.success]
    tokens = [o.output_tokens or 0 for o in done]
    prompt = sum(o.prompt_tokens or 0 for o in done)
    summary = {"duration": duration_s, "num_prompts": len(outputs), "completed": len(done),
               "failed": len(outputs) - len(done), "total_input_tokens": prompt,
               "total_output_tokens": sum(tokens), "request_throughput": len(done) / duration_s,
               "output_throughput": sum(tokens) / duration_s,
               "total_token_throughput": (prompt + sum(tokens)) / duration_s}
    if slo_ms:
        good = sum(is_good(o, slo_ms) for o in outputs)
        summary |= {"goodput_slo_ms": dict(slo_ms), "request_goodput": good / duration_s, "good_requests": good,
                    "good_fraction": good / len(outputs) if outputs else 0.0}
    summary |= _stats("ttft", [o.ttft_s for o in done if o.ttft_s is not None], percentiles)
    summary |= _stats("tpot", [o.tpot_s for o in done if (o.output_tokens or 0) > 1], percentiles)
    summary |= _stats("itl", [x for o in done for x in o.itl_s], percentiles)
    summary |= _stats("e2el", [o.latency_s for o in done], percentiles)
    failures: dict[str, int] = {}
    for o in outputs:
        if not o.success:
            key = str(o.status) if o.status != 200 or o.error is None else o.error
            failures[key] = failures.get(key, 0) + 1
    summary["failures"] = failures
    widths = [o.width for o in done if o.width]
    summary["width_mix"] = {w: widths.count(w) / len(widths) for w in sorted(set(widths))}
    summary["send_lag_p99_ms"] = float(np.percentile([o.send_lag_s for o in outputs], 99)) * 1000 if outputs else None
    return summary


def write_rows(outputs: Sequence[RequestOutput], path: Path) -> Path:
    """Per-request rows as JSON lines (under ``runs/``, which git ignores: they are big)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for o in outputs:
            f.write(json.dumps(asdict(o) | {"tpot_s": o.tpot_s}) + "\n")
    return path


def format_summary(summary: dict, title: str = "") -> str:
    """vLLM's printed table, for the figures a reader compares."""
    lines = [f"{' ' + title + ' ' if title else '':=^56}"]
    for key in ("completed", "failed", "duration", "request_throughput", "request_goodput", "output_throughput"):
        if summary.get(key) is not None:
            lines.append(f"{key:<40} {summary[key]:<12.2f}" if isinstance(summary[key], float)
                         else f"{key:<40} {summary[key]:<12}")
    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", *(f"p{p:g}" for p in PERCENTILES)):
            value = summary.get(f"{stat}_{name}_ms")
            if value is not None:
                lines.append(f"{f'{stat}_{name}_ms':<40} {value:<12.2f}")
    for key in ("width_mix", "failures"):
        if summary.get(key):
            lines.append(f"{key:<40} " + " ".join(f"{k} {v:.0%}" if key == "width_mix" else f"{k}: {v}"
                                                  for k, v in summary[key].items()))
    return "\n".join(lines)


# --- command line -----------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="model id to ask for (e.g. matta-shakespeare or '<name>:<width>')")
    p.add_argument("--checkpoint", type=Path, default=Path("checkpoints/default"),
                   help="its tokenizer makes the token-id prompts")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--request-rate", type=float, default=math.inf, help="open loop, req/s (inf: all at once)")
    load.add_argument("--ramp", type=float, nargs=2, metavar=("FROM", "TO"),
                      help="open loop, Poisson rate ramping FROM -> TO req/s over --duration")
    load.add_argument("--trace", type=Path, help="replay a trace file (azure, burstgpt or mooncake format)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of inter-arrivals (1: Poisson)")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of a --ramp")
    p.add_argument("--max-concurrency", type=int, help="closed loop with this many in flight")
    p.add_argument("--trace-format", choices=("azure", "burstgpt", "mooncake"), help="default: from the file")
    p.add_argument("--time-scale", type=float, default=1.0, help="trace: multiply its timestamps (0.1: 10x faster)")
    p.add_argument("--length-scale", type=float, default=1.0, help="trace: multiply its token counts")
    p.add_argument("--max-prompt-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--goodput", nargs="+", help="SLOs KEY:MS, KEY in ttft, tpot, e2el (vLLM's syntax)")
    p.add_argument("--extra-body", type=json.loads, default={}, help="JSON merged into every request body")
    p.add_argument("--no-stream", action="store_true", help="non-streamed requests (no TTFT, TPOT or ITL)")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", type=Path, help="write per-request rows here (JSON lines; keep them under runs/)")
    p.add_argument("--out", type=Path, help="write the summary JSON here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from benchmarks import traces
    from matta.tokenizer import Tokenizer

    args = parse_args(argv)
    tokenizer = Tokenizer.from_file(args.checkpoint / "tokenizer.json")
    text = traces.text_tokens(tokenizer)
    if args.trace:
        records = traces.scale(traces.load(args.trace, args.trace_format), args.time_scale, args.length_scale,
                               args.max_prompt_tokens, args.max_tokens)
        requests = traces.requests(records, text, args.model, args.extra_body)
    else:
        prompts = [traces.prompt_of_length(text, args.prompt_tokens, i) for i in range(64)]
        if args.ramp:
            times = ramp_arrivals(*args.ramp, args.duration, args.seed)
        else:
            times = arrivals(args.num_prompts, args.request_rate, args.burstiness, args.seed)
        requests = requests_at(times, prompts, args.max_tokens, args.model, args.extra_body, args.seed)
    stream = not args.no_stream
    if args.max_concurrency:
        outputs, duration = asyncio.run(run_closed_loop(args.url, requests, args.max_concurrency, args.timeout, stream))
    else:
        outputs, duration = asyncio.run(run_open_loop(args.url, requests, args.timeout, stream))
    summary = summarize(outputs, duration, parse_goodput(args.goodput))
    print(format_summary(summary, f"{args.model} at {args.url}"))
    if args.rows:
        write_rows(outputs, args.rows)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
