"""What the benchmarks and the tests share: real servers on port 0, load clients, prompts, metric parsing.

- :class:`Server`: ``matta serve`` as a subprocess (its own process, as users run it); :class:`Route`:
  ``matta route CONFIG`` the same way;
  :class:`ServerThread`: any front-end app under uvicorn in a background thread; :class:`VLLMServer`:
  vLLM's CPU build serving an export (its own virtualenv, :data:`VLLM_VENV`); :data:`ENGINES`: the
  engine variants of ``matta serve`` as flags;
- load: :func:`load_test` (headless locust and its report); every serving benchmark's own load
  (open and closed loop, arrivals, vLLM's metrics and goodput) is :mod:`benchmarks.client`, trace
  replay :mod:`benchmarks.traces`;
- :func:`make_prompts` (prompt windows whose greedy continuation has no early end-of-text),
  :func:`gpt2_small_shape` (a random elastic model of GPT-2 small's shape),
  :func:`model_decode_step` (bare decode-step timing), :func:`interleaved` (timing in rotating
  order), :func:`roofline_ms` with :func:`step_flops`, :func:`step_bytes` and :func:`machine_peaks`,
  :func:`metric` (Prometheus text).

Benchmarks run from the repo root as modules (``python -m benchmarks.slo_router``); tests import
this module the same way. Nothing here is installed with the package.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import torch
import uvicorn

from deploy.vllm.launch import vllm_command, vllm_env
from matta.checkpoint import Checkpoint
from matta.config import ModelConfig
from matta.kv_cache import StaticKVCache
from matta.llama import NestedLlama
from matta.model import NestedGPT
from serving.api.server import uvicorn_config

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent


# Public-domain English (Shakespeare): the default checkpoint is trained on Shakespeare, so these
# prompts are in distribution and its greedy continuations rarely end early.
TEXT = """\
To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and
arrows of outrageous fortune, or to take arms against a sea of troubles, and by opposing end them. To
die, to sleep; no more; and by a sleep to say we end the heart-ache and the thousand natural shocks that
flesh is heir to: 'tis a consummation devoutly to be wish'd. To die, to sleep; to sleep, perchance to
dream: ay, there's the rub; for in that sleep of death what dreams may come when we have shuffled off
this mortal coil, must give us pause: there's the respect that makes calamity of so long life; for who
would bear the whips and scorns of time, the oppressor's wrong, the proud man's contumely, the pangs of
despised love, the law's delay, the insolence of office and the spurns that patient merit of the
unworthy takes, when he himself might his quietus make with a bare bodkin?
Tomorrow, and tomorrow, and tomorrow, creeps in this petty pace from day to day, to the last syllable of
recorded time; and all our yesterdays have lighted fools the way to dusty death. Out, out, brief candle!
Life's but a walking shadow, a poor player that struts and frets his hour upon the stage and then is
heard no more. It is a tale told by an idiot, full of sound and fury, signifying nothing.
Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him. The evil that
men do lives after them; the good is oft interred with their bones; so let it be with Caesar. The noble
Brutus hath told you Caesar was ambitious: if it were so, it was a grievous fault, and grievously hath
Caesar answer'd it. Here, under leave of Brutus and the rest, for Brutus is an honourable man; so are
they all, all honourable men, come I to speak in Caesar's funeral. He was my friend, faithful and just
to me: but Brutus says he was ambitious; and Brutus is an honourable man.
All the world's a stage, and all the men and women merely players: they have their exits and their
entrances; and one man in his time plays many parts, his acts being seven ages. At first the infant,
mewling and puking in the nurse's arms. And then the whining school-boy, with his satchel and shining
morning face, creeping like snail unwillingly to school. And then the lover, sighing like furnace, with
a woeful ballad made to his mistress' eyebrow. Then a soldier, full of strange oaths and bearded like
the pard, jealous in honour, sudden and quick in quarrel, seeking the bubble reputation even in the
cannon's mouth. And then the justice, in fair round belly with good capon lined, with eyes severe and
beard of formal cut, full of wise saws and modern instances; and so he plays his part.
The quality of mercy is not strain'd, it droppeth as the gentle rain from heaven upon the place beneath:
it is twice blest; it blesseth him that gives and him that takes: 'tis mightiest in the mightiest: it
becomes the throned monarch better than his crown; his sceptre shows the force of temporal power, the
attribute to awe and majesty, wherein doth sit the dread and fear of kings; but mercy is above this
sceptred sway; it is enthroned in the hearts of kings, it is an attribute to God himself.
Shall I compare thee to a summer's day? Thou art more lovely and more temperate: rough winds do shake the
darling buds of May, and summer's lease hath all too short a date: sometime too hot the eye of heaven
shines, and often is his gold complexion dimm'd; and every fair from fair sometime declines, by chance or
nature's changing course untrimm'd; but thy eternal summer shall not fade.
Once more unto the breach, dear friends, once more; or close the wall up with our English dead. In peace
there's nothing so becomes a man as modest stillness and humility: but when the blast of war blows in our
ears, then imitate the action of the tiger; stiffen the sinews, summon up the blood, disguise fair nature
with hard-favour'd rage. This day is called the feast of Crispian: he that outlives this day, and comes
safe home, will stand a tip-toe when the day is named, and rouse him at the name of Crispian. We few, we
happy few, we band of brothers; for he to-day that sheds his blood with me shall be my brother.
Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds that
lour'd upon our house in the deep bosom of the ocean buried. Now are our brows bound with victorious
wreaths; our bruised arms hung up for monuments; our stern alarums changed to merry meetings, our
dreadful marches to delightful measures.
But, soft! what light through yonder window breaks? It is the east, and Juliet is the sun. Arise, fair
sun, and kill the envious moon, who is already sick and pale with grief, that thou her maid art far more
fair than she. O Romeo, Romeo! wherefore art thou Romeo? Deny thy father and refuse thy name; or, if thou
wilt not, be but sworn my love, and I'll no longer be a Capulet. What's in a name? that which we call a
rose by any other name would smell as sweet.
"""


@torch.inference_mode()
def greedy_batch(model, prompts: list[list[int]], width: str, max_tokens: int) -> list[list[int]]:
    """Greedy continuations of equal-length prompts, batched, ``max_tokens`` each (end-of-text not special)."""
    ids = torch.tensor(prompts, dtype=torch.long)
    out = model(ids, width=width, use_cache=True)
    generated = []
    for step in range(max_tokens):
        next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        generated.append(next_ids)
        if step + 1 < max_tokens:
            out = model(next_ids, width=width, past_key_values=out.past_key_values, use_cache=True)
    return torch.cat(generated, dim=1).tolist()


def make_prompts(ckpt: Checkpoint, widths: list[str], prompt_tokens: int, max_tokens: int,
                 candidates: int = 96) -> tuple[list[list[int]], dict]:
    """Windows of ``TEXT`` whose greedy continuation has no end-of-text at any benchmarked width."""
    config = ckpt.config
    tokens = ckpt.tokenizer.encode(" ".join(TEXT.split()))
    if len(tokens) < prompt_tokens:
        raise SystemExit(f"the built-in text is only {len(tokens)} tokens; use --prompt-tokens <= {len(tokens)}")
    count = min(candidates, len(tokens) - prompt_tokens + 1)
    stride = max(1, (len(tokens) - prompt_tokens) // max(1, count - 1))
    windows = [tokens[s:s + prompt_tokens] for s in range(0, len(tokens) - prompt_tokens + 1, stride)][:count]
    eos = config.eos_token_id
    early = set()
    for width in widths:
        for i, row in enumerate(greedy_batch(ckpt.model, windows, width, max_tokens)):
            if eos in row:
                early.add(i)
    kept = [w for i, w in enumerate(windows) if i not in early]
    info = {"source": "windows of the built-in English (Shakespeare) text, checkpoint tokenizer, sent as token ids",
            "text_tokens": len(tokens), "candidates": len(windows), "stride": stride,
            "dropped_for_early_eos": len(early), "kept": len(kept)}
    if len(kept) < 4:  # almost everything ends early: keep them all, counts in the JSON say so
        kept, info["fallback"] = windows, "too few windows without end-of-text; using all, lengths vary"
    return kept, info


class Server:
    """``matta serve CKPT --port 0`` as a subprocess; the bound port is read from its stdout."""

    def __init__(self, checkpoint: Path, threads: int, max_batch: int, log_path: Path,
                 extra_args: tuple[str, ...] = (), compile: str = "off") -> None:
        """``compile``: the server's ``--compile`` (eager by default, so figures compare like with like)."""
        self.cmd = [sys.executable, "-m", "cli", "serve", str(checkpoint), "--port", "0", "--threads",
                    str(threads), "--max-batch", str(max_batch), "--log-level", "warning", "--compile", compile,
                    *extra_args]
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.exit_code: int | None = None

    def start(self, timeout_s: float = 120.0) -> str:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self._log = open(self.log_path, "w")  # closed in stop()
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=self._log, text=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            if "listening on " in line:
                self.url = line.split("listening on ", 1)[1].strip()
                break
        if not self.url:
            self.stop()
            raise RuntimeError(f"matta {self.cmd[3]} did not start; log:\n{self.log_path.read_text()[-3000:]}")
        import httpx

        while time.monotonic() < deadline:  # the socket listens before the app is up; wait for /health
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self.url
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"matta {self.cmd[3]} never became healthy")

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds used so far by the server process (``api``: HTTP, tokenization, policy) and by
        its child processes (``engine_core``: the engine-core process; 0 with ``--engine inproc``)."""
        children = sum(cpu_seconds(pid) for pid in descendants(self.proc.pid))
        return {"api": cpu_seconds(self.proc.pid), "engine_core": children}

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (graceful drain), then kill if it does not exit; returns the exit code."""
        if self.proc is not None:
            self.exit_code = terminate(self.proc, timeout_s)
            self._log.close()
        return self.exit_code


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (0 once it is gone), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def descendants(pid: int) -> list[int]:
    """The live processes below ``pid`` (children, their children, ...), from /proc."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            child, rest = stat.read_text().split(" ", 1)
            parents.setdefault(int(rest.rsplit(")", 1)[1].split()[1]), []).append(int(child))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


class Route(Server):
    """``matta route CONFIG --port 0`` as a subprocess (the proxy over one backend per width); start and
    stop as :class:`Server`."""

    def __init__(self, config: Path, log_path: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.cmd = [sys.executable, "-m", "cli", "route", str(config), "--port", "0", "--log-level", "warning",
                    *extra_args]
        self.log_path = log_path
        self.proc = None
        self.url = ""
        self.exit_code = None


# vLLM's CPU build lives in its own virtualenv (deploy/vllm/setup_venv.sh).
VLLM_VENV = Path(os.environ.get("VLLM_VENV", REPO / ".venv-vllm"))
VLLM_START_TIMEOUT_S = 300  # 30-50 s on 2 busy cores: imports, engine and worker processes, model load


class VLLMServer:
    """vLLM's OpenAI server for one export, as a subprocess in its own process group."""

    def __init__(self, model_dir: Path, served_model_name: str, log_path: Path, threads: int = 1,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = vllm_command(model_dir, served_model_name, self.port, venv=VLLM_VENV, extra_args=extra_args)
        self.threads = threads
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.start_s = 0.0

    def start(self) -> str:
        started = time.monotonic()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=vllm_env(threads=self.threads), stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = started + VLLM_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    self.start_s = time.monotonic() - started
                    return self.url
            except httpx.TransportError:
                pass
            time.sleep(1)
        raise RuntimeError(f"vLLM not healthy after {VLLM_START_TIMEOUT_S} s; log:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (vLLM shuts its engine and worker down), then SIGKILL the group if anything is left."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def terminate(proc: subprocess.Popen, timeout_s: float = 30.0) -> int:
    """SIGTERM a process (servers drain on it), SIGKILL it if it has not exited within ``timeout_s``;
    its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@torch.inference_mode()
def gpt2_small_shape(vocab_size: int, eos_token_id: int) -> NestedGPT:
    """A random-weight elastic model of GPT-2 small's shape, with four nested FFN widths."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=vocab_size, n_ctx=1024, d_model=768, n_layer=12, n_head=12,
                         widths={"s": 384, "m": 768, "l": 1536, "ta": 3072}, eos_token_id=eos_token_id,
                         name="gpt2-small-shape")
    return NestedGPT(config).eval()


def smollm_135m_shape(vocab_size: int, eos_token_id: int) -> NestedLlama:
    """A random-weight nested Llama of SmolLM-135M's shape (d_model 576, 30 layers, 9 query heads of 64
    sharing 3 key/value heads, SwiGLU FFN 1536 with widths 192 / 384 / 768 / 1536, tied embeddings)."""
    torch.manual_seed(0)
    config = ModelConfig(family="llama", vocab_size=vocab_size, n_ctx=2048, d_model=576, n_layer=30, n_head=9,
                         n_kv_head=3, widths={"s": 192, "m": 384, "l": 768, "ta": 1536}, eos_token_id=eos_token_id,
                         name="smollm-135m-shape")
    return NestedLlama(config).eval()


SHAPE_BUILDERS = {"gpt2-small": gpt2_small_shape, "smollm-135m": smollm_135m_shape}
"""Random-weight model shapes the benchmarks measure beside the shipped checkpoint, by label."""


def interleaved(runs: dict, repeats: int, inner: int = 1) -> dict:
    """Seconds per call of each callable in ``runs`` (one warm-up call each, then ``repeats`` rounds
    of ``inner`` calls), timed in rotating order so that drift hits all alike: ``{key: [seconds]}``."""
    keys = list(runs)
    times: dict = {k: [] for k in keys}
    for k in keys:
        runs[k]()
    for r in range(repeats):
        for k in keys[r % len(keys):] + keys[: r % len(keys)]:
            started = time.perf_counter()
            for _ in range(inner):
                runs[k]()
            times[k].append((time.perf_counter() - started) / inner)
    return times


def model_decode_step(model, widths: list[str], batch: int, context: int, repeats: int, inner: int = 10,
                      steps: dict | None = None) -> dict:
    """Bare decode step (batch x 1 against a ``context``-long cache) per width, ms, interleaved.

    ``steps`` maps a variant name to how a step runs (a :class:`serving.worker.compiled.DecodeSteps`, or
    any callable taking ``(ids, mask, cache, plans)``); default ``{"eager": DecodeSteps(model)}``.
    Every (variant, width) pair is timed in rotating order, so drift hits all alike. Returns
    ``{variant: {width: timing}}``. The cache is a :class:`StaticKVCache`, as in the engine,
    rewound before every step so all steps see the same context.
    """
    from serving.worker.compiled import DecodeSteps

    steps = steps or {"eager": DecodeSteps(model)}
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    device = model.wte.weight.device
    with torch.inference_mode():
        ctx = torch.randint(0, vocab, (batch, context), generator=gen).to(device)
        step = torch.randint(0, vocab, (batch, 1), generator=gen).to(device)
        mask = torch.ones(batch, context + 1, dtype=torch.long, device=device)
        pasts = {w: StaticKVCache.from_list(model(ctx, width=w, use_cache=True).past_key_values, context + 1)
                 for w in widths}
    plans = {w: model.config.resolve_width(w) for w in widths}

    def runner(variant: str, w: str) -> Callable[[], None]:
        @torch.inference_mode()
        def run() -> None:
            pasts[w].rewind(context)
            steps[variant](step, mask, pasts[w], plans[w])
        return run

    times = interleaved({(v, w): runner(v, w) for v in steps for w in widths}, repeats * 3, inner)
    return {v: {w: {"step_ms": [t * 1e3 for t in times[v, w]], "median_step_ms": statistics.median(times[v, w]) * 1e3,
                    "tokens_per_s": batch / statistics.median(times[v, w])} for w in widths} for v in steps}


# Where `matta serve` runs its engine, as CLI flags: the engine core in its own process (the
# default) or its loop on a thread of the server process.
ENGINES = {"process": ("--engine", "process"), "inproc": ("--engine", "inproc")}


def run_locust(host: str, users: int, spawn_rate: float, seconds: int, user_classes: list[str], prefix: Path,
               env: dict | None = None) -> None:
    """locust --headless with CSV output at ``prefix``; raises if locust fails to run."""
    cmd = [sys.executable, "-m", "locust", "-f", str(BENCHMARKS / "locustfile.py"), *user_classes, "--headless",
           "-u", str(users), "-r", str(spawn_rate), "-t", f"{seconds}s", "-H", host, "--csv", str(prefix),
           "--csv-full-history", "--only-summary", "--stop-timeout", "10", "--loglevel", "WARNING"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=seconds + 120)
    # locust exits 1 when any request failed; that is a result, not a crash. Other codes are crashes.
    if done.returncode not in (0, 1) or not Path(f"{prefix}_stats.csv").exists():
        raise RuntimeError(f"locust failed ({done.returncode}):\n{done.stderr[-3000:]}")


def _float(value: str) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def read_stats(prefix: Path) -> dict:
    """Per-endpoint totals and the aggregated time series from locust's CSV files."""
    endpoints = {}
    with open(f"{prefix}_stats.csv") as f:
        for row in csv.DictReader(f):
            endpoints[f"{row['Type']} {row['Name']}".strip()] = {
                "requests": int(row["Request Count"]), "failures": int(row["Failure Count"]),
                "median_ms": _float(row["Median Response Time"]), "p95_ms": _float(row["95%"]),
                "p99_ms": _float(row["99%"]), "requests_per_s": _float(row["Requests/s"]),
                "failures_per_s": _float(row["Failures/s"])}
    history = []
    with open(f"{prefix}_stats_history.csv") as f:
        for row in csv.DictReader(f):
            if row["Name"] != "Aggregated":
                continue
            history.append({"t": int(row["Timestamp"]), "users": int(row["User Count"]),
                            "requests_per_s": _float(row["Requests/s"]), "failures_per_s": _float(row["Failures/s"]),
                            "p50_ms": _float(row["50%"]), "p95_ms": _float(row["95%"]), "p99_ms": _float(row["99%"])})
    if history:
        t0 = history[0]["t"]
        for h in history:
            h["t"] -= t0
    return {"endpoints": endpoints, "history": history}


def plot(report: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = report["history"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), gridspec_kw={"width_ratios": [1, 1, 1.3]})
    t = [h["t"] for h in history]
    axes[0].plot(t, [h["requests_per_s"] or 0 for h in history], label="requests/s")
    axes[0].plot(t, [h["failures_per_s"] or 0 for h in history], label="failures/s", color="tab:red")
    axes[0].set(xlabel="seconds", title="throughput")
    axes[0].legend()
    for key in ("p50_ms", "p95_ms", "p99_ms"):
        axes[1].plot(t, [h[key] for h in history], label=key.removesuffix("_ms"))
    axes[1].set(xlabel="seconds", ylabel="ms", title="latency (all endpoints)")
    axes[1].legend()
    axes[2].axis("off")
    rows = [[name.replace("POST ", "").replace("GET ", ""), e["requests"], e["failures"], e["median_ms"], e["p99_ms"],
             f"{e['requests_per_s']:.1f}"] for name, e in report["endpoints"].items()]
    table = axes[2].table(cellText=rows, colLabels=["endpoint", "reqs", "fails", "p50 ms", "p99 ms", "req/s"],
                          loc="center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1, 1.4)
    fig.suptitle(title)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def load_test(host: str, users: int, spawn_rate: float, seconds: int, user_classes: list[str], out: Path,
              env: dict | None = None) -> dict:
    """Run locust, write ``out``.json and ``out``.png, return the report."""
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "locust"
        run_locust(host, users, spawn_rate, seconds, user_classes, prefix, env)
        report = read_stats(prefix)
    report["settings"] = {"host": host, "users": users, "spawn_rate": spawn_rate, "seconds": seconds,
                          "user_classes": user_classes}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, out.with_suffix(".png"), f"locust {' '.join(user_classes) or 'all users'}: {users} users, {host}")
    return report


class ServerThread:
    """uvicorn serving ``app`` on a free port in a background thread, for a ``with`` block."""

    def __init__(self, app) -> None:
        self.app = app
        config = (uvicorn_config(app, log_level="warning") if hasattr(app.state, "settings")
                  else uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.server = uvicorn.Server(config)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(20)
        self.sock.close()


MAX_RESULT_BYTES = 100_000
"""The most any file under ``benchmarks/results/`` may hold: summaries and plots only (per-request
rows go under ``runs/``, which git ignores)."""


def save_png(fig, path: Path, dpi: int = 100) -> Path:
    """Save a matplotlib figure as a PNG of at most :data:`MAX_RESULT_BYTES`: a colour palette
    (plots have few colours; the file shrinks 3-5x), then a lower dpi and fewer colours only as
    far as needed. Raises if even the smallest version is too big (plot less)."""
    import io

    from PIL import Image

    for scale, colors in ((1.0, 256), (0.8, 256), (0.8, 64), (0.65, 64), (0.5, 32)):
        raw = io.BytesIO()
        fig.savefig(raw, format="png", dpi=dpi * scale)
        raw.seek(0)
        out = io.BytesIO()
        Image.open(raw).convert("RGB").quantize(colors=colors).save(out, format="PNG", optimize=True)
        if out.tell() <= MAX_RESULT_BYTES:
            Path(path).write_bytes(out.getvalue())
            return Path(path)
    raise ValueError(f"{path}: {out.tell()} bytes even at dpi {dpi * scale:g} and {colors} colours; "
                     f"the limit is {MAX_RESULT_BYTES}")


def metric(text: str, name: str, **labels) -> float:
    """Sum of a metric's samples in Prometheus text whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def free_port() -> int:
    """A TCP port free now on 127.0.0.1 (for servers that cannot take port 0, like Ray Serve's proxy)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the machine's limits (roofline) ----------------------------------------------------------


BYTES_PER_PARAM = 4  # fp32, what the engine serves on CPU


def step_flops(config, width: str, batch: int, context: int) -> int:
    """FLOPs of one decode step: ``batch`` tokens, each attending ``context`` cached keys."""
    return batch * config.flops_per_token(width, context=context)


def roofline_ms(flops: int, nbytes: int, peaks: dict) -> float:
    """A step's time if it ran at the machine's sgemm peak or its read bandwidth, whichever binds."""
    return max(flops / (peaks["sgemm_gflops"] * 1e9), nbytes / (peaks["read_gb_per_s"] * 1e9)) * 1e3


def step_bytes(config, width: str, batch: int, context: int) -> dict:
    """Bytes one decode step must read: the width's matmul weights, and the KV cache (of the key/value
    heads: grouped-query attention caches fewer)."""
    d, kv_dim = config.d_model, config.kv_heads * config.head_dim
    ffn = sum((3 if config.is_llama else 2) * d * m for m in config.resolve_width(width))  # SwiGLU: gate, up, down
    weights = config.n_layer * (2 * d * d + 2 * d * kv_dim) + ffn + d * config.vocab_size
    kv = config.n_layer * 2 * batch * context * kv_dim
    return {"weights": weights * BYTES_PER_PARAM, "kv_cache": kv * BYTES_PER_PARAM}


@torch.inference_mode()
def machine_peaks(repeats: int = 5) -> dict:
    """Attainable sgemm GFLOP/s (1024^3) and streaming-read GB/s (sum of 256 MB) on this machine."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    x = torch.randn(64 * 1024 * 1024)
    torch.mm(a, b), x.sum()
    gemm, read = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        gemm.append(2 * 1024**3 / (time.perf_counter() - t0) / 1e9)
        t0 = time.perf_counter()
        x.sum()
        read.append(x.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return {"sgemm_gflops": statistics.median(gemm), "read_gb_per_s": statistics.median(read)}
