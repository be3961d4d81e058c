"""Child processes that die with their parent, in every phase of their life.

The engine core (``python -m serving.engine.core_process``) and the background compile worker
(``python -m serving.worker.compile_worker``) are children that must never outlive the process that started them: an
orphaned core compiling at start-up held its cores for 13+ minutes after ``matta serve`` was
killed, because the only check (the parent pid changing) ran in the serve loop.

Two mechanisms, both process-wide and independent of what the child is doing:

- on Linux, the parent-death signal (``prctl(PR_SET_PDEATHSIG, SIGKILL)``): the kernel kills the
  child when its parent dies. :func:`spawn_options` sets it between fork and exec, so it holds
  from the child's first import on; :func:`die_with_parent` sets it again (a child started some
  other way) and checks the parent did not die before it was set.
- a watchdog thread that polls the parent pid (everywhere, Linux included: it needs no kernel
  feature, and the GIL is released often enough in torch's compile and load paths to run it).

The kernel delivers the parent-death signal when the *thread* that forked the child exits, so
children are started from threads that live as long as the child: the main thread, a reader
thread that waits for the child, or Ray Serve's user-code loop thread.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

PARENT_ENV = "MATTA_PARENT_PID"  # the pid the child must die with (set by spawn_options)
WATCHDOG_POLL_S = 0.5
PR_SET_PDEATHSIG = 1

_libc = None
if sys.platform.startswith("linux"):
    try:
        # Looked up now, not in the forked child, which must not load libraries (see _set_death_signal).
        _libc = ctypes.CDLL(None, use_errno=True)
        _prctl = _libc.prctl
    except (OSError, AttributeError):
        _libc = None


def _set_death_signal() -> bool:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux; False elsewhere)."""
    if _libc is None:
        return False
    return _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0


def spawn_options(env: dict[str, str] | None = None, nice: int = 0) -> dict[str, Any]:
    """``subprocess.Popen`` keyword arguments for a child that dies with this process: its
    environment names this pid (:data:`PARENT_ENV`), and the parent-death signal is set before the
    child's program starts (``preexec_fn``, which runs in the forked child: it only calls prctl,
    nice and getppid)."""
    parent = os.getpid()

    def preexec() -> None:
        _set_death_signal()
        if nice:
            os.nice(nice)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(1)

    return {"env": {**(os.environ if env is None else env), PARENT_ENV: str(parent)}, "preexec_fn": preexec}


def die_with_parent() -> None:
    """Make this process exit when the process that started it dies, whatever it is doing: the
    parent-death signal (Linux) and a watchdog thread. Call first in a child's entry point. The
    parent is :data:`PARENT_ENV` when the spawner set it (exits at once if that one is already
    gone), else the current parent."""
    expected = os.environ.get(PARENT_ENV)
    parent = int(expected) if expected and expected.isdigit() else os.getppid()
    _set_death_signal()
    if os.getppid() != parent:
        log.error("the parent process %d is gone; exiting", parent)
        os._exit(1)
    threading.Thread(target=_watch, args=(parent,), name="matta-parent-watchdog", daemon=True).start()


def _watch(parent: int) -> None:
    while True:
        time.sleep(WATCHDOG_POLL_S)
        if os.getppid() != parent:
            # os._exit, not sys.exit: the main thread may be deep in a compile or a load, and
            # nothing a child holds needs a clean shutdown (the API process owns what is durable).
            log.error("the parent process %d is gone; exiting", parent)
            os._exit(1)


def freeze_startup_heap() -> None:
    """Collect once, then move every object start-up made (imports, the model's modules, the
    tokenizer) out of the garbage collector's reach, as a process turns from starting to serving.

    Why: a full (generation-2) collection walks every tracked object; over a heap holding torch and
    a checkpoint it took 131 ms, in a load client in the middle of a 48-request burst (every request
    sent that late). The same pause in the API process or the engine core is a late token. What
    start-up made lives as long as the process, so nothing is lost by never scanning it again."""
    gc.collect()
    gc.freeze()
