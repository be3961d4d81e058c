"""The corpus: deterministic document split, no leakage, a well-formed cloze set."""

import json

import numpy as np

from matta.tokenizer import END_OF_TEXT
from training.data import N_TEST_DOCS, N_VAL_DOCS, TokenData, build_cloze, split_documents


def test_split_is_deterministic_disjoint_and_by_document():
    names = [f"play_{i}" for i in range(42)]
    a, b = split_documents(names), split_documents(list(reversed(names)))
    assert a == b
    assert len(a["test"]) == N_TEST_DOCS and len(a["val"]) == N_VAL_DOCS and len(a["train"]) == 42 - 8
    assert not set(a["train"]) & set(a["val"]) and not set(a["train"]) & set(a["test"]) and not set(a["val"]) & set(a["test"])


def test_prepared_corpus_has_42_plays_and_loads_without_pickle(corpus_dir):
    data = TokenData(corpus_dir)
    docs = data.meta["documents"]
    assert sum(len(v) for v in docs.values()) == 42
    assert data.meta["source"]["sha256"] == "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
    tokenizer = data.tokenizer()
    assert tokenizer.token_bytes(tokenizer.eos_id) == END_OF_TEXT
    for split in ("train", "val", "test"):
        tokens = data.tokens(split)
        assert tokens.dtype == np.uint16 and tokens.max() < tokenizer.vocab_size
        assert (tokens == tokenizer.eos_id).sum() == len(docs[split])  # one end-of-text per document
    assert data.meta["tokens"]["train"] > 1_000_000


def test_cloze_items_are_whole_words_from_held_out_plays_only(corpus_dir):
    data = TokenData(corpus_dir)
    held_out = set(data.meta["documents"]["val"]) | set(data.meta["documents"]["test"])
    for split in ("val", "test"):
        items = data.cloze(split)
        assert len(items) >= 500
        assert {i.doc for i in items} <= set(data.meta["documents"][split]) <= held_out
        for item in items[:200]:
            word = item.target.strip()
            assert word.isalpha() and len(word) >= 4
            assert item.target in (word, " " + word)
            assert len(item.context) > 100


def test_build_cloze_skips_speaker_tags_and_contractions():
    text = "x" * 700 + "\nHam.\nWhat a piece of work is man, how noble in reason:\nI'll o'erthrow the tyrant.\n"
    items = build_cloze({"doc": text}, n_items=10, seed=0)
    targets = {i.target.strip() for i in items}
    assert "reason" in targets
    assert "Ham" not in targets and "erthrow" not in targets
    reason = next(i for i in items if i.target.strip() == "reason")
    assert reason.context.endswith("noble in") and reason.target == " reason"
    json.dumps(reason.__dict__)
