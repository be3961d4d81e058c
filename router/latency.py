"""Latency model of the serving engine: what a decode step and a prefill cost at each width.

A profile (``matta profile``) measures step times on the machine that will serve and fits, per
width, two small linear models (least squares on relative error):

    decode_step_s(batch B, context L) = base + per_row * B + per_row_token * B * L
    prefill_s(tokens T, context C)    = base + per_token * T + per_token_context * T * C

``C`` is the context a prefill chunk attends to beyond its own tokens (0 for a whole prompt): a
chunk of a long prompt reads the keys of every earlier chunk (measured on the shipped checkpoint,
a 64-token chunk after 192 cached tokens costs 1.25-1.55x a fresh 64-token prefill).

Online, the engine reports every step it runs; :class:`LatencyModel` keeps an exponentially weighted
correction factor for prefills per width and for decode steps per *path* (eager or compiled: the
step that actually runs, sampling and output processing included), batch-size bucket (1, 2-3, 4-7,
..., 32+: a compiled step gains more over eager at batch 1 than at batch 16, so a factor learned on
solo steps priced a burst's batch too fast and every answer admitted on it was late) and *width
class* (the one width of the step's rows, or "mixed": compiled, a Student step ran at 0.38-0.51 of
the eager profile and a TA or mixed step at 0.86-1.18, so one factor per bucket priced whichever ran
less recently up to 2x wrong; `benchmarks/step_corrections.py`), so a slower or busier machine, and
a compiled step swapped in, are tracked without re-profiling. The engine measures every bucket and
class it can reach before serving (:meth:`serving.engine.core.EngineCore.calibrate`); one not
measured yet borrows: a compiled one eager's factor for that batch and class (a compiled step is not
slower: a step compiled after start-up starts from it), an eager one the largest factor eager
measured for that class at any batch, else for any class. Pure Python and JSON: policies and tests
use it without torch.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROFILE_FORMAT = "matta-latency-profile/1"
CORRECTION_BOUNDS = (0.1, 20.0)  # a correction outside this means the profile is for another machine
STEP_PATHS = ("eager", "compiled")  # how the engine may run a decode step (serving/worker/compiled.py)
# Weight of a decode step slower than its path's factor: a machine that slows down (another process
# took a core) is followed within a few steps, or every promise made meanwhile is broken.
STEP_RISE = 0.2
BATCH_BUCKETS = 6  # decode-step corrections per batch size bucket: 1, 2-3, 4-7, 8-15, 16-31, 32+
MIXED = "mixed"  # the width class of a step over rows of several widths


def batch_bucket(batch: int) -> int:
    """The correction bucket of a decode step over ``batch`` rows: floor(log2(batch)), capped."""
    return min(BATCH_BUCKETS - 1, max(0, int(batch).bit_length() - 1))


def width_class(groups: Mapping[str, tuple[int, int]]) -> str:
    """The correction class of a decode step over ``groups`` {width: (rows, context)}: its rows'
    one width, or :data:`MIXED`."""
    present = [w for w, (rows, _) in groups.items() if rows > 0]
    return present[0] if len(present) == 1 else MIXED


@dataclass(frozen=True)
class WidthCost:
    """Fitted step-time coefficients of one width, in seconds."""

    decode_base: float
    decode_per_row: float
    decode_per_row_token: float
    prefill_base: float
    prefill_per_token: float
    prefill_per_token_context: float = 0.0  # profiles written before chunked prefill: none measured

    def decode_s(self, batch: int, context: int) -> float:
        return max(0.0, self.decode_base + self.decode_per_row * batch + self.decode_per_row_token * batch * context)

    def prefill_s(self, tokens: int, context: int = 0) -> float:
        """Seconds to prefill ``tokens`` tokens attending to ``context`` cached ones beyond their own."""
        return max(0.0, self.prefill_base + self.prefill_per_token * tokens
                   + self.prefill_per_token_context * tokens * context)


@dataclass
class _Ewma:
    value: float = 1.0
    samples: int = 0

    def update(self, ratio: float, alpha: float, rise: float = 0.0) -> None:
        """Move towards ``ratio``; a ratio above the value moves it by at least ``rise`` (quick to
        follow a slowdown that deadlines depend on, slow to trust a speed-up)."""
        if not math.isfinite(ratio) or ratio <= 0:
            return
        lo, hi = CORRECTION_BOUNDS
        # One observation moves the factor at most 2x either way: a single outlier (the first step
        # after start-up, a page fault) must not set it, while a sustained change is followed
        # geometrically.
        ratio = min(hi, max(lo, self.value / 2, min(ratio, 2 * self.value)))
        # The first observations move the factor more (alpha_eff >= 1/n), so a wrong profile is
        # corrected within a few steps instead of a few hundred.
        a = max(alpha, 1.0 / (self.samples + 1), rise if ratio > self.value else 0.0)
        self.value = (1 - a) * self.value + a * ratio
        self.samples += 1


@dataclass
class LatencyModel:
    """Per-width step-time model plus online corrections (thread-safe: the engine thread writes,
    request handlers read)."""

    costs: dict[str, WidthCost]
    alpha: float = 0.05
    meta: dict = field(default_factory=dict)
    # A step over rows of several widths, measured by the profile over the sum-of-parts prediction
    # below: the nested FFN's blocks cost per-block slicing and launches that no one-width step has.
    mixed_factor: float = 1.0

    def __post_init__(self) -> None:
        if not self.costs:
            raise ValueError("a latency model needs at least one width")
        if MIXED in self.costs:
            raise ValueError(f"a width may not be named {MIXED!r}: it names the steps over several widths")
        self._lock = threading.Lock()
        self._prefill = {w: _Ewma() for w in self.costs}
        self._classes = [*self.costs, MIXED]
        self._step = {(path, b, c): _Ewma() for path in STEP_PATHS for b in range(BATCH_BUCKETS) for c in self._classes}

    def check_widths(self, widths: list[str], source: object) -> None:
        """ValueError naming the ``widths`` (a checkpoint's served widths) this profile has no costs for."""
        missing = [w for w in widths if w not in self.costs]
        if missing:
            raise ValueError(f"{source}: the profile has no costs for width(s) {missing} of this checkpoint")

    # --- predictions -----------------------------------------------------------------------

    def decode_step_s(self, width: str, batch: int, context: int) -> float:
        """Profiled seconds of one eager decode step of ``batch`` rows of ``width`` at ``context`` tokens."""
        return self.costs[width].decode_s(batch, context)

    def prefill_s(self, width: str, tokens: int, context: int = 0) -> float:
        """Predicted seconds to prefill ``tokens`` prompt tokens (padded batch size) at ``width``; a
        chunk of a longer prompt attends to ``context`` tokens cached by the chunks before it."""
        return self.costs[width].prefill_s(tokens, context) * self._prefill[width].value

    def profiled_step_s(self, groups: Mapping[str, tuple[int, int]]) -> float:
        """The profile's seconds of one eager decode forward over rows of several widths, ``groups``
        {width: (rows, context)}: the engine decodes every width in one forward, so the fixed cost of
        a forward (dispatch, attention set-up, the LM head's launch) is paid once, the widest present
        width's, and each width adds its per-row costs for its rows."""
        present = {w: bc for w, bc in groups.items() if bc[0] > 0}
        if not present:
            return 0.0
        fixed = max(self.costs[w].decode_base for w in present)
        rows = sum(self.costs[w].decode_s(b, c) - self.costs[w].decode_base for w, (b, c) in present.items())
        return max(0.0, fixed + rows) * (self.mixed_factor if len(present) > 1 else 1.0)

    def step_s(self, groups: Mapping[str, tuple[int, int]], path: str = "eager") -> float:
        """Predicted seconds of one decode step over ``groups`` run on ``path`` ("eager" or
        "compiled"): the profile, times what steps of that path, batch size and width class
        measured online (see the module doc for one not measured yet)."""
        return self.profiled_step_s(groups) * self.step_factor(path, sum(b for b, _ in groups.values()),
                                                               width_class(groups))

    def step_factor(self, path: str, batch: int | None = None, cls: str | None = None) -> float:
        """Measured over profiled step time on ``path`` for steps of ``batch`` rows of width class
        ``cls`` (sampling and output processing included); without ``batch``, the largest factor
        measured on ``path`` for ``cls`` (without ``cls``: for any class)."""
        if batch is None:
            classes = self._classes if cls is None else [cls]
            seen = [e.value for c in classes for b in range(BATCH_BUCKETS) if (e := self._step[path, b, c]).samples]
            if seen:
                return max(seen)
            if path != "eager":
                return self.step_factor("eager", cls=cls)
            return self.step_factor("eager") if cls is not None else 1.0
        ewma = self._step[path, batch_bucket(batch), MIXED if cls is None else cls]
        if ewma.samples:
            return ewma.value
        return self.step_factor("eager", batch, cls) if path != "eager" else self.step_factor("eager", cls=cls)

    # --- online correction ---------------------------------------------------------------------

    def observe_prefill(self, width: str, tokens: int, seconds: float, context: int = 0) -> None:
        """A prefill (or a chunk of one, after ``context`` cached tokens) of ``tokens`` at ``width``
        took ``seconds``."""
        raw = self.costs[width].prefill_s(tokens, context)
        with self._lock:
            self._prefill[width].update(seconds / raw if raw > 0 else float("nan"), self.alpha)

    def observe_step(self, groups: Mapping[str, tuple[int, int]], path: str, seconds: float) -> None:
        """A decode step over ``groups`` ran on ``path`` and took ``seconds`` (forward, sampling and
        output processing: everything a token costs besides its prefill)."""
        raw = self.profiled_step_s(groups)
        batch, cls = sum(b for b, _ in groups.values()), width_class(groups)
        with self._lock:
            ewma = self._step[path, batch_bucket(batch), cls]
            if not ewma.samples:
                ewma.value = self.step_factor(path, batch, cls)  # start from what it borrowed
            ewma.update(seconds / raw if raw > 0 else float("nan"), self.alpha, rise=STEP_RISE)

    def set_corrections(self, corrections: dict[str, float]) -> None:
        """Take correction factors measured elsewhere (the engine-core process), as :meth:`corrections`
        names them; a step factor named without a width class ("step:eager:b4") sets every class."""
        with self._lock:
            for key, value in corrections.items():
                kind, _, name = key.partition(":")
                path, _, rest = name.partition(":b")
                bucket, _, cls = rest.partition(":")
                if kind == "step" and bucket.isdigit() and path in STEP_PATHS and cls in ("", *self._classes):
                    b = batch_bucket(int(bucket))  # "b4": the bucket of batches from 4
                    ewmas = [self._step[path, b, c] for c in ([cls] if cls else self._classes)]
                elif kind == "prefill" and name in self._prefill:
                    ewmas = [self._prefill[name]]
                else:
                    continue  # a summary ("step:eager") or another process's name
                for ewma in ewmas:
                    ewma.value = value
                    ewma.samples = max(1, ewma.samples)

    def corrections(self) -> dict[str, float]:
        """Current correction factors, for metrics and logs: per path ("step:compiled", the largest
        over batch sizes and classes) and per measured batch bucket and width class
        ("step:compiled:b4:s": batches of 4-7 rows all at ``s``; ":mixed": of several widths)."""
        out = {f"step:{path}": self.step_factor(path) for path in STEP_PATHS}
        out.update({f"step:{path}:b{1 << b}:{c}": e.value for (path, b, c), e in self._step.items() if e.samples})
        out.update({f"prefill:{w}": e.value for w, e in self._prefill.items()})
        return out

    # --- persistence ----------------------------------------------------------------------------

    def to_json(self) -> dict:
        return {"format": PROFILE_FORMAT, "meta": self.meta, "alpha": self.alpha, "mixed_factor": self.mixed_factor,
                "widths": {w: asdict(c) for w, c in self.costs.items()}}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def from_json(cls, data: dict, source: str = "profile") -> LatencyModel:
        if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
            raise ValueError(f"{source}: not a matta latency profile (expected format {PROFILE_FORMAT!r})")
        try:
            costs = {w: WidthCost(**{k: float(v) for k, v in c.items()}) for w, c in data["widths"].items()}
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{source}: malformed width costs ({exc})") from exc
        mixed = data.get("mixed_factor", 1.0)  # profiles written before it was measured: none
        if not isinstance(mixed, int | float) or not 0 < mixed < 100:
            raise ValueError(f"{source}: mixed_factor must be a positive number, got {mixed!r}")
        return cls(costs, alpha=float(data.get("alpha", 0.05)), meta=dict(data.get("meta", {})),
                   mixed_factor=float(mixed))

    @classmethod
    def load(cls, path: str | Path) -> LatencyModel:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ValueError(f"{path}: no such latency profile") from exc
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: invalid JSON ({exc})") from exc
        return cls.from_json(data, str(path))
