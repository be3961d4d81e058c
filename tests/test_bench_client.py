"""The benchmark client's definitions (vLLM's TPOT and goodput), its arrivals and wire parsing, the
trace loaders on the shipped sample files, the max-rate bisection and the vLLM-client wrapper's
arguments. All fast: a fake streaming server on port 0, no model."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import statistics

import pytest

from benchmarks import traces
from benchmarks.client import (
    Request,
    RequestOutput,
    _Chunked,
    arrivals,
    is_good,
    parse_goodput,
    parse_sse_events,
    ramp_arrivals,
    run_closed_loop,
    run_open_loop,
    summarize,
    write_rows,
)
from benchmarks.max_rate import max_rate_within
from benchmarks.vs_vllm import VLLM_CLIENT_SCRIPT, vllm_client_args, vllm_client_command


def out(ttft, latency, tokens, status=200, **kw) -> RequestOutput:
    return RequestOutput(arrival_s=0.0, status=status, ttft_s=ttft, latency_s=latency, output_tokens=tokens, **kw)


# --- metric definitions -----------------------------------------------------------------------


def test_tpot_is_vllms_definition():
    assert out(0.1, 1.0, 10).tpot_s == pytest.approx(0.1)  # (1.0 - 0.1) / (10 - 1)
    assert out(0.2, 0.5, 4).tpot_s == pytest.approx(0.1)  # (0.5 - 0.2) / 3
    assert out(0.1, 0.1, 1).tpot_s == 0.0  # one token: no time per output token
    assert out(None, None, 0, status=0).tpot_s == 0.0


def test_goodput_counts_requests_meeting_every_slo():
    outputs = [
        out(0.05, 0.50, 10),  # good: TTFT 50 ms, TPOT 50 ms
        out(0.15, 0.60, 10),  # TTFT 150 ms > 100
        out(0.05, 1.00, 10),  # TPOT 105.6 ms > 60
        out(None, None, None, status=429),  # refused: never good
        out(0.09, 0.09, 1),  # one token: TPOT 0, TTFT 90 ms: good
    ]
    slo = {"ttft": 100.0, "tpot": 60.0}
    assert [is_good(o, slo) for o in outputs] == [True, False, False, False, True]
    s = summarize(outputs, duration_s=4.0, slo_ms=slo)
    assert s["good_requests"] == 2
    assert s["request_goodput"] == pytest.approx(2 / 4.0)
    assert s["good_fraction"] == pytest.approx(2 / 5)
    assert s["completed"] == 4 and s["failed"] == 1 and s["failures"] == {"429": 1}
    # e2el alone: 0.5, 0.6, 0.09 are within 600 ms; 1.0 is not
    assert summarize(outputs, 4.0, {"e2el": 600.0})["good_requests"] == 3


def test_summary_uses_vllms_names_and_percentiles():
    outputs = [out(t / 1000, t / 1000 + 0.9, 10, width=w, itl_s=[0.1] * 9)
               for t, w in zip((10, 20, 30, 40), ("s", "s", "s", "ta"), strict=True)]
    s = summarize(outputs, duration_s=2.0)
    assert s["request_throughput"] == pytest.approx(2.0)
    assert s["output_throughput"] == pytest.approx(20.0)
    assert s["mean_ttft_ms"] == pytest.approx(25.0)
    assert s["median_ttft_ms"] == pytest.approx(25.0)
    assert s["p50_ttft_ms"] == pytest.approx(25.0)
    assert s["p90_ttft_ms"] == pytest.approx(37.0)  # linear interpolation, as numpy (and vLLM)
    assert s["p99_ttft_ms"] == pytest.approx(39.7)
    assert s["median_tpot_ms"] == pytest.approx(100.0)
    assert s["mean_itl_ms"] == pytest.approx(100.0)
    assert s["width_mix"] == {"s": 0.75, "ta": 0.25}
    assert "request_goodput" not in s  # no SLO configured, no goodput


def test_tpot_stats_skip_single_token_answers():
    s = summarize([out(0.1, 1.0, 10), out(0.1, 0.1, 1)], duration_s=1.0)
    assert s["mean_tpot_ms"] == pytest.approx(100.0)


def test_parse_goodput():
    assert parse_goodput(["ttft:200", "tpot:20.5"]) == {"ttft": 200.0, "tpot": 20.5}
    assert parse_goodput(None) == {}
    with pytest.raises(ValueError, match="bad goodput SLO 'latency:3'"):
        parse_goodput(["latency:3"])


def test_rows_are_json_lines_with_tpot(tmp_path):
    path = write_rows([out(0.1, 1.0, 10), out(None, None, None, status=503)], tmp_path / "runs" / "x.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["status"] for r in rows] == [200, 503]
    assert rows[0]["tpot_s"] == pytest.approx(0.1)


# --- arrivals ---------------------------------------------------------------------------------


def test_arrivals_span_count_over_rate_like_vllm():
    times = arrivals(200, 10.0, seed=1)
    assert len(times) == 200 and times == sorted(times)
    assert times[-1] == pytest.approx(20.0)
    assert arrivals(5, math.inf) == [0.0] * 5
    assert arrivals(4, 2.0, burstiness=math.inf) == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert arrivals(50, 3.0, seed=7) == arrivals(50, 3.0, seed=7)


def test_burstiness_is_the_gamma_shape():
    """Lower burstiness, burstier: the squared CV of the gaps is 1 / burstiness."""
    for burstiness in (0.25, 1.0, 4.0):
        times = arrivals(20000, 100.0, burstiness, seed=3)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        cv2 = statistics.pvariance(gaps) / statistics.mean(gaps) ** 2
        assert cv2 == pytest.approx(1 / burstiness, rel=0.1)
    with pytest.raises(ValueError, match="burstiness"):
        arrivals(10, 1.0, burstiness=0)


def test_ramp_arrivals_rate_ramps():
    times = ramp_arrivals(1.0, 50.0, 40.0, seed=0)
    first, last = sum(t < 10 for t in times), sum(t >= 30 for t in times)
    assert last > 3 * first  # mean rate ~7 in the first quarter, ~44 in the last
    assert all(0 <= t < 40 for t in times)


# --- wire -------------------------------------------------------------------------------------


def test_chunked_decoder_across_arbitrary_splits():
    payload = b"data: {\"a\": 1}\n\ndata: [DONE]\n\n"
    wire = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (payload[:7], payload[7:])) + b"0\r\n\r\n"
    for size in (1, 2, 3, 5, len(wire)):
        decoder, got = _Chunked(), b""
        for i in range(0, len(wire), size):
            got += decoder.feed(wire[i:i + size])
        assert got == payload and decoder.done
    events, rest = parse_sse_events(payload + b"data: {\"b\"")
    assert events == [b'{"a": 1}', b"[DONE]"] and rest == b'data: {"b"'


class FakeStreamingServer:
    """A raw HTTP/1.1 server on port 0 streaming ``tokens`` SSE chunks ``gap_s`` apart, chunked,
    then usage and [DONE]; or a 429 for a body whose prompt is "refuse"."""

    def __init__(self, tokens: int, gap_s: float) -> None:
        self.tokens, self.gap_s, self.bodies = tokens, gap_s, []
        self.in_flight = self.max_in_flight = 0

    async def handle(self, reader, writer) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self.answer(reader, writer)
        finally:
            self.in_flight -= 1

    async def answer(self, reader, writer) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        body = json.loads(await reader.readexactly(length))
        self.bodies.append(body)
        if body["prompt"] == "refuse":
            writer.write(b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 2\r\ncontent-length: 2\r\n\r\n{}")
        elif not body.get("stream"):
            await asyncio.sleep(self.gap_s)
            content = json.dumps({"usage": {"completion_tokens": self.tokens, "prompt_tokens": 3}}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nx-matta-width: s\r\ncontent-length: %d\r\n\r\n%s" % (len(content), content))
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nx-matta-width: ta\r\ntransfer-encoding: chunked\r\n\r\n")

            def chunk(data: dict | str) -> bytes:
                event = b"data: " + (data.encode() if isinstance(data, str) else json.dumps(data).encode()) + b"\n\n"
                return b"%x\r\n%s\r\n" % (len(event), event)

            for i in range(self.tokens):
                await asyncio.sleep(self.gap_s)
                writer.write(chunk({"choices": [{"index": 0, "text": f" t{i}"}]}))
                await writer.drain()
            writer.write(chunk({"choices": [], "usage": {"completion_tokens": self.tokens, "prompt_tokens": 3}}))
            writer.write(chunk("[DONE]") + b"0\r\n\r\n")
        await writer.drain()
        writer.close()


async def with_fake(fake, run):
    server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    try:
        return await run(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    finally:
        server.close()


def test_streamed_request_measures_ttft_itl_tpot():
    fake = FakeStreamingServer(tokens=5, gap_s=0.03)
    requests = [Request([1, 2, 3], 5, 0.0, "m"), Request("refuse", 5, 0.01, "m")]
    outputs, duration = asyncio.run(with_fake(fake, lambda url: run_open_loop(url, requests)))
    good, refused = outputs
    assert good.success and good.status == 200 and good.width == "ta" and good.output_tokens == 5
    assert 0.03 <= good.ttft_s < 0.2
    assert len(good.itl_s) == 4 and all(0.02 <= x < 0.2 for x in good.itl_s)
    assert good.latency_s == pytest.approx(good.ttft_s + sum(good.itl_s))
    assert good.tpot_s == pytest.approx(sum(good.itl_s) / 4)
    assert not refused.success and refused.status == 429 and refused.retry_after == 2.0
    assert fake.bodies[0]["stream"] and fake.bodies[0]["stream_options"] == {"include_usage": True}
    assert fake.bodies[0]["temperature"] == 0 and fake.bodies[0]["max_tokens"] == 5
    assert duration >= good.latency_s


def test_closed_loop_keeps_concurrency_and_sends_every_request_once():
    fake = FakeStreamingServer(tokens=2, gap_s=0.05)
    requests = [Request([i], 2, 0.0, "m", {"ignore_eos": True}) for i in range(6)]
    outputs, duration = asyncio.run(with_fake(fake, lambda url: run_closed_loop(url, requests, 3, stream=False)))
    assert fake.max_in_flight == 3
    assert 2 * 0.05 <= duration < 6 * 0.05  # two rounds of three, not six one after another
    assert len(outputs) == 6 and all(o.success and o.width == "s" and o.output_tokens == 2 for o in outputs)
    assert sorted(b["prompt"][0] for b in fake.bodies) == list(range(6))
    assert all(b["ignore_eos"] and "stream" not in b for b in fake.bodies)


def test_unreachable_server_is_a_failed_request():
    outputs, _ = asyncio.run(run_open_loop("http://127.0.0.1:9", [Request([1], 1)], timeout_s=2))
    assert not outputs[0].success and outputs[0].error


# --- traces -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "fmt", "count"), [
    ("azure_llm_inference_sample.csv", "azure", 40),
    ("burstgpt_sample.csv", "burstgpt", 37),  # 3 rows with 0 response tokens (failed requests) skipped
    ("mooncake_sample.jsonl", "mooncake", 40),
])
def test_trace_samples_load(name, fmt, count):
    path = traces.SAMPLES / name
    assert traces.detect_format(path) == fmt
    records = traces.load(path)
    assert len(records) == count
    assert records[0].arrival_s == 0.0
    assert [r.arrival_s for r in records] == sorted(r.arrival_s for r in records)
    assert all(r.prompt_tokens > 0 and r.output_tokens > 0 for r in records)


def test_trace_fields_and_units(tmp_path):
    azure = tmp_path / "a.csv"
    azure.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:47.5000000,300,20\n"
                     "2023-11-16 18:15:46.0000000,100,10\n")
    assert traces.load(azure) == [traces.TraceRecord(0.0, 100, 10), traces.TraceRecord(1.5, 300, 20)]
    burst = tmp_path / "b.csv"
    burst.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                     "10,ChatGPT,50,5,55,Conversation log\n12,GPT-4,60,0,60,API log\n13,GPT-4,70,7,77,API log\n")
    assert traces.load(burst) == [traces.TraceRecord(0.0, 50, 5), traces.TraceRecord(3.0, 70, 7)]
    moon = tmp_path / "m.jsonl"
    moon.write_text('{"timestamp": 1000, "input_length": 8, "output_length": 2, "hash_ids": [1]}\n'
                    '{"timestamp": 3500, "input_length": 9, "output_length": 3, "hash_ids": [1, 2]}\n')
    assert traces.load(moon) == [traces.TraceRecord(0.0, 8, 2), traces.TraceRecord(2.5, 9, 3)]
    with pytest.raises(ValueError, match="unknown trace format"):
        (tmp_path / "x.csv").write_text("a,b\n1,2\n")
        traces.load(tmp_path / "x.csv")


def test_trace_scaling_and_requests():
    records = [traces.TraceRecord(0.0, 1000, 3), traces.TraceRecord(10.0, 10, 500), traces.TraceRecord(30.0, 40, 40)]
    scaled = traces.scale(records, time_scale=0.1, length_scale=0.5, max_prompt_tokens=64, max_output_tokens=32,
                          duration_s=2.5)
    assert scaled == [traces.TraceRecord(0.0, 64, 2), traces.TraceRecord(1.0, 5, 32)]  # the third is past 2.5 s
    requests = traces.requests(scaled, list(range(100)), "m", {"width": "s"})
    assert [len(r.prompt) for r in requests] == [64, 5]
    assert [r.max_tokens for r in requests] == [2, 32] and [r.arrival_s for r in requests] == [0.0, 1.0]
    assert requests[1].prompt == [97, 98, 99, 0, 1]  # windows wrap around the text
    with pytest.raises(ValueError, match="scales must be > 0"):
        traces.scale(records, time_scale=0)


# --- max rate bisection -----------------------------------------------------------------------


def recording(threshold: float):
    seen = []

    def probe(rate: float) -> bool:
        seen.append(rate)
        return rate <= threshold
    return probe, seen


@pytest.mark.parametrize("start", [1.0, 8.0, 100.0])
def test_bisection_brackets_the_threshold(start):
    probe, seen = recording(13.7)
    lo, hi = max_rate_within(probe, start, rel_tol=0.05, max_probes=30)
    assert lo <= 13.7 < hi and hi - lo <= 0.05 * lo
    assert lo in seen and hi in seen
    assert len(seen) < 20


def test_bisection_limits():
    probe, seen = recording(-1)  # never passes
    assert max_rate_within(probe, 4.0, min_rate=0.5) == (0.0, 0.5)
    assert seen == [4.0, 2.0, 1.0, 0.5]
    probe, _ = recording(math.inf)  # always passes
    assert max_rate_within(probe, 4.0, max_rate=40) == (32.0, math.inf)
    probe, seen = recording(13.7)
    max_rate_within(probe, 1.0, rel_tol=1e-9, max_probes=6)
    assert len(seen) == 6
    with pytest.raises(ValueError):
        max_rate_within(probe, 0.0)


# --- vLLM's client wrapper --------------------------------------------------------------------


def test_vllm_client_arguments(tmp_path):
    args = vllm_client_args("http://127.0.0.1:5", "ckpt:s", tmp_path / "tok", tmp_path / "p.jsonl", 64, 8, 32,
                            tmp_path / "r" / "out.json")
    opts = dict(zip(args[::2], args[1::2], strict=False))
    assert opts["--backend"] == "openai" and opts["--endpoint"] == "/v1/completions"
    assert opts["--base-url"] == "http://127.0.0.1:5" and opts["--model"] == opts["--served-model-name"] == "ckpt:s"
    assert args[args.index("--max-concurrency") + 1] == "8" and args[args.index("--num-prompts") + 1] == "64"
    assert args[args.index("--request-rate") + 1] == "inf" and args[args.index("--temperature") + 1] == "0"
    assert args[args.index("--custom-output-len") + 1] == "32" and args[args.index("--dataset-name") + 1] == "custom"
    assert args[args.index("--result-dir") + 1] == str(tmp_path / "r")
    assert args[args.index("--result-filename") + 1] == "out.json"
    assert {"--ignore-eos", "--save-result", "--skip-chat-template"} <= set(args)
    command = vllm_client_command(tmp_path / "venv", args)
    assert command[:3] == [str(tmp_path / "venv" / "bin" / "python"), "-c", VLLM_CLIENT_SCRIPT]
    assert command[3:] == args
    assert "from vllm.benchmarks.serve import add_cli_args, main" in VLLM_CLIENT_SCRIPT


def test_save_png_stays_under_the_results_limit(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from benchmarks.harness import MAX_RESULT_BYTES, save_png

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    rng = np.random.default_rng(0)
    for ax in axes.flat:  # noisy scatter: the kind of plot that makes big PNGs
        ax.scatter(rng.random(1000), rng.random(1000), s=3, c=rng.random(1000), cmap="viridis")
    fig.savefig(tmp_path / "plain.png", dpi=120)
    assert (tmp_path / "plain.png").stat().st_size > MAX_RESULT_BYTES  # what the limit is for
    path = save_png(fig, tmp_path / "big.png", dpi=120)
    plt.close(fig)
    assert 0 < path.stat().st_size <= MAX_RESULT_BYTES
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_client_command_replays_a_trace(tmp_path):
    """``python -m benchmarks.client --trace``: the sample Azure trace, 100x faster and 1/100 the
    length, against a fake server: every request sent, its max_tokens the scaled output length."""
    import threading

    from benchmarks.client import main

    fake = FakeStreamingServer(tokens=2, gap_s=0.001)
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(asyncio.start_server(fake.handle, "127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        trace = traces.SAMPLES / "azure_llm_inference_sample.csv"
        assert main(["--url", url, "--model", "m", "--trace", str(trace), "--time-scale", "0.01",
                     "--length-scale", "0.01", "--goodput", "e2el:5000", "--out", str(tmp_path / "s.json"),
                     "--rows", str(tmp_path / "rows.jsonl")]) == 0
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
    expected = traces.scale(traces.load(trace), 0.01, 0.01, 128, 32)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["num_prompts"] == summary["completed"] == len(expected) == 40
    assert summary["good_requests"] == 40 and summary["width_mix"] == {"ta": 1.0}
    assert sorted(b["max_tokens"] for b in fake.bodies) == sorted(r.output_tokens for r in expected)
    assert sorted(len(b["prompt"]) for b in fake.bodies) == sorted(r.prompt_tokens for r in expected)
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 40
