"""The compile cache on disk: where compiled decode steps live and the one file format matta loads them from.

A compiled step is trusted like matta's own code (it is compiled code plus torch's serialized,
pickle-based compile state), so the cache directory is owner-only and refused when anyone else
could write it, and each artifact is one file: a header line (format, torch version, payload
length, sha256) then torch's bytes, written through a temporary file, fsync and rename, and
checked whole before torch reads a byte of it. What is wrong with an artifact is a
:class:`CacheFault` whose ``kind`` labels ``matta_compile_cache_faults_total``; the step it held
runs eager. Keys: torch's version and the architecture (family, shape, attention and position
settings) name a directory; the step signature, device type and torch thread count a file in it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from matta.config import ModelConfig


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/matta/compile`` (``~/.cache/matta/compile``)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "matta" / "compile"


def cache_dir_for(config: ModelConfig, root: Path) -> Path:
    """Where one architecture's compiled steps live: keyed by torch's version and the model's family
    and shape (a compiled step takes the weights as inputs, so every checkpoint of that architecture
    shares them; a GPT-2 and a Llama of the same dimensions must not: each one's guards refuse the
    other's steps, and it would never run compiled)."""
    shape = json.dumps({"family": config.family, "n_layer": config.n_layer, "d_model": config.d_model,
                        "n_head": config.n_head, "n_kv_head": config.n_kv_head, "ffn_dim": config.ffn_dim,
                        "vocab_size": config.vocab_size, "n_ctx": config.n_ctx,
                        "layer_norm_eps": config.layer_norm_eps, "rope_theta": config.rope_theta,
                        "rope_scaling": config.rope_scaling, "qkv_bias": config.qkv_bias,
                        "tie_embeddings": config.tie_embeddings}, sort_keys=True, default=str)
    return root / f"torch-{torch.__version__}" / hashlib.sha256(shape.encode()).hexdigest()[:16]


def artifact_path(cache_dir: Path, signature: tuple, device: torch.device, dtype: torch.dtype) -> Path:
    """The file one signature's compiled step is saved to in an architecture's ``cache_dir``: per
    device type, weight dtype and torch thread count too (inductor generates code for the dtype and
    the thread count, and the compiled step's guards refuse another), and per torch version (also in
    the file's header)."""
    key = hashlib.sha256(repr((signature, device.type, str(dtype), torch.get_num_threads(), torch.__version__,
                               ARTIFACT_FORMAT)).encode()).hexdigest()[:16]
    return cache_dir / f"step-{key}.bin"


ARTIFACT_MAGIC = b"matta-compiled-step\n"
ARTIFACT_FORMAT = 3  # 3: caches of row slots with per-row lengths (and spare slots when traced)
MAX_HEADER_BYTES = 4096


class CacheFault(ValueError):
    """A compile-cache artifact that must not be loaded, or could not be written; ``kind`` is the
    metric's label: empty, truncated, garbage, version, checksum, unreadable, write."""

    def __init__(self, kind: str, path: Path, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.kind, self.message = kind, message


def write_artifact(path: Path, payload: bytes) -> None:
    """Save ``payload`` (torch's serialized step) under its header, atomically: a temporary file in
    the same directory, flushed to disk, renamed over ``path``. Raises :class:`CacheFault` ("write")
    when the disk refuses it (ENOSPC, EIO...), leaving no partial file behind."""
    header = json.dumps({"format": ARTIFACT_FORMAT, "torch": torch.__version__, "bytes": len(payload),
                         "sha256": hashlib.sha256(payload).hexdigest()}).encode() + b"\n"
    temporary = temporary_path(path)
    try:
        with open(temporary, "wb") as f:
            f.write(ARTIFACT_MAGIC + header)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise CacheFault("write", path, f"could not write the compiled step: {exc}") from exc


def temporary_path(path: Path) -> Path:
    """Where :func:`write_artifact` writes ``path`` before renaming it (per process: two servers
    compiling into one cache never write one file)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def read_artifact(path: Path) -> bytes:
    """The payload of an artifact written by :func:`write_artifact`, after checking its header
    (format, torch version, length) and checksum; raises :class:`CacheFault` naming what is wrong.
    Nothing of a file that fails here reaches torch's deserializer."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CacheFault("unreadable", path, f"unreadable: {exc}") from exc
    if not data:
        raise CacheFault("empty", path, "empty (zero bytes)")
    if not data.startswith(ARTIFACT_MAGIC):
        if ARTIFACT_MAGIC.startswith(data):
            raise CacheFault("truncated", path, f"truncated in its header ({len(data)} bytes)")
        raise CacheFault("garbage", path, "not a matta compiled-step artifact")
    end = data.find(b"\n", len(ARTIFACT_MAGIC), len(ARTIFACT_MAGIC) + MAX_HEADER_BYTES)
    if end < 0:
        kind = "truncated" if len(data) < len(ARTIFACT_MAGIC) + MAX_HEADER_BYTES else "garbage"
        raise CacheFault(kind, path, f"no complete header ({len(data)} bytes)")
    try:
        header = json.loads(data[len(ARTIFACT_MAGIC):end])
        expected, digest = int(header["bytes"]), str(header["sha256"])
    except (ValueError, KeyError, TypeError):
        raise CacheFault("garbage", path, "unreadable header") from None
    if header.get("format") != ARTIFACT_FORMAT or header.get("torch") != torch.__version__:
        raise CacheFault("version", path, f"written by torch {header.get('torch')!r} (format {header.get('format')!r}); "
                                          f"this is torch {torch.__version__}")
    payload = data[end + 1:]
    if len(payload) != expected:
        raise CacheFault("truncated", path, f"{len(payload)} payload bytes, its header says {expected}")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CacheFault("checksum", path, "sha256 mismatch (corrupt)")
    return payload


def check_private(directory: Path) -> None:
    """Create ``directory`` owner-only, and refuse one anyone else could write: a compile cache holds
    compiled code and torch's serialized compile state, trusted like matta's own code."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = directory.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise PermissionError(f"{directory}: a compile cache must be owned by this user and writable by no one "
                              f"else (mode {oct(st.st_mode & 0o777)}); fix it or pass another --compile-cache")


def artifact_fault(path: Path) -> CacheFault | None:
    """What is wrong with the artifact at ``path`` (None: it is absent, or whole and of this torch)."""
    if not path.exists():
        return None
    try:
        read_artifact(path)
    except CacheFault as fault:
        return fault
    return None
