"""Load scenarios for `matta serve`, `matta route` and the Ray app: `locust -f benchmarks/locustfile.py`.

User classes (pick with `locust ... ClassName`, default: all, by weight):
  ABUser      plays a stream of end users, MATTA_REQUESTS_PER_UNIT (5) requests each, each with a
              stable unit id (the OpenAI `user` field, never reused for anyone else); after each completion
              it posts `/v1/feedback` metric `success` (0/1) with a probability that depends on the
              width it was served: MATTA_SUCCESS_BASE x quality(width) / quality(widest), quality =
              the checkpoint's per-width cloze accuracy (training.json). So an experiment
              `fixed:s` vs `fixed:ta` has a real, known effect to find.
  SloUser     mixed latency classes: tight (MATTA_TIGHT_SLO_MS) and loose (MATTA_LOOSE_SLO_MS) targets
              through the `x-matta-slo-ms` header, for the latency-aware router.
  PinnedUser  asks for one pinned width per request (`<model>:<width>`), round robin.
  ChatUser    `/v1/chat/completions`: a short conversation (system, user, assistant, user), every
              other request streamed; needs a model with a chat template (or `--chat-template`).

Environment: MATTA_MODEL (default matta-shakespeare), MATTA_CHECKPOINT (default checkpoints/default,
for the widths and their quality), MATTA_MAX_TOKENS (32), MATTA_SUCCESS_BASE (0.5).
"""

from __future__ import annotations

import json
import os
import random
import uuid
from pathlib import Path

from locust import HttpUser, between, task

from router.quality import width_quality

MODEL = os.environ.get("MATTA_MODEL", "matta-shakespeare")
CHECKPOINT = Path(os.environ.get("MATTA_CHECKPOINT", "checkpoints/default"))
MAX_TOKENS = int(os.environ.get("MATTA_MAX_TOKENS", "32"))
SUCCESS_BASE = float(os.environ.get("MATTA_SUCCESS_BASE", "0.5"))
REQUESTS_PER_UNIT = int(os.environ.get("MATTA_REQUESTS_PER_UNIT", "5"))
PROMPTS = ["ROMEO.\n", "To be, or not to be", "KING HENRY.\nNow, lords,", "What light through yonder", "O, speak again"]


def _width_quality() -> dict[str, float]:
    """Per-width quality (cloze accuracy) from the checkpoint's training.json, widths in order."""
    config = json.loads((CHECKPOINT / "config.json").read_text())
    training = json.loads((CHECKPOINT / "training.json").read_text())
    return width_quality(training, list(config["widths"]))


QUALITY = _width_quality()
WIDTHS = list(QUALITY)


def success_probability(width: str) -> float:
    return SUCCESS_BASE * QUALITY[width] / max(QUALITY.values())


class ABUser(HttpUser):
    weight = 3
    wait_time = between(0.05, 0.2)

    def on_start(self) -> None:
        self.unit, self.left = None, 0

    @task
    def complete_and_rate(self) -> None:
        if self.left == 0:  # the next end user arrives
            self.unit, self.left = f"user-{uuid.uuid4().hex[:12]}", REQUESTS_PER_UNIT
        self.left -= 1
        body = {"model": MODEL, "prompt": random.choice(PROMPTS), "max_tokens": MAX_TOKENS, "user": self.unit}
        with self.client.post("/v1/completions", json=body, name="/v1/completions [ab]",
                              catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"status {r.status_code}")
                return
            width = r.headers.get("x-matta-width")
            request_id = r.headers.get("x-request-id") or r.json().get("id")
        value = 1.0 if random.random() < success_probability(width) else 0.0
        self.client.post("/v1/feedback", json={"request_id": request_id, "metric": "success", "value": value},
                         name="/v1/feedback")


class SloUser(HttpUser):
    weight = 1
    wait_time = between(0.05, 0.2)
    tight_ms = float(os.environ.get("MATTA_TIGHT_SLO_MS", "300"))
    loose_ms = float(os.environ.get("MATTA_LOOSE_SLO_MS", "3000"))

    @task(3)
    def tight(self) -> None:
        self._request(self.tight_ms, "tight")

    @task(1)
    def loose(self) -> None:
        self._request(self.loose_ms, "loose")

    def _request(self, slo_ms: float, name: str) -> None:
        body = {"model": MODEL, "prompt": random.choice(PROMPTS), "max_tokens": MAX_TOKENS}
        self.client.post("/v1/completions", json=body, headers={"x-matta-slo-ms": str(slo_ms)},
                         name=f"/v1/completions [slo {name}]")


class PinnedUser(HttpUser):
    weight = 1
    wait_time = between(0.05, 0.2)

    def on_start(self) -> None:
        self.turn = random.randrange(len(WIDTHS))

    @task
    def pinned(self) -> None:
        width = WIDTHS[self.turn % len(WIDTHS)]
        self.turn += 1
        body = {"model": f"{MODEL}:{width}", "prompt": random.choice(PROMPTS), "max_tokens": MAX_TOKENS}
        self.client.post("/v1/completions", json=body, name=f"/v1/completions [pinned {width}]")


CONVERSATIONS = [[{"role": "system", "content": "You speak as a character of Shakespeare's."},
                  {"role": "user", "content": prompt},
                  {"role": "assistant", "content": "Speak, and I shall answer."},
                  {"role": "user", "content": "Say on."}] for prompt in PROMPTS]


class ChatUser(HttpUser):
    weight = 1
    wait_time = between(0.05, 0.2)

    def on_start(self) -> None:
        self.turn = 0

    @task
    def chat(self) -> None:
        self.turn += 1
        stream = self.turn % 2 == 0
        body = {"model": MODEL, "messages": random.choice(CONVERSATIONS), "max_tokens": MAX_TOKENS, "stream": stream}
        name = f"/v1/chat/completions [chat{' stream' if stream else ''}]"
        with self.client.post("/v1/chat/completions", json=body, name=name, stream=stream,
                              catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
            elif stream and 'data: {"error"' in response.text:
                response.failure(f"error event: {response.text[-300:]}")
            elif stream and not response.text.rstrip().endswith("data: [DONE]"):
                response.failure("the stream did not end with [DONE]")
