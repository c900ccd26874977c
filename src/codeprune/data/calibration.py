"""Token windows for calibration and held-out evaluation.

The held-out split is by document and depends only on each document's id (a
hash), never on the seed, so calibration windows and evaluation windows never
share a document, whatever the seed, sample count or sequence length.

    >>> corpus = read_source("python-stdlib")
    >>> calib = calibration_windows(tokenizer, corpus, samples=64, seq_len=512, seed=0)
    >>> calib.input_ids.shape          # (64, 512)
    >>> held = heldout_windows(tokenizer, corpus, seq_len=512, max_windows=32)
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

import torch

from codeprune.data.sources import Corpus, Document
from codeprune.errors import ConfigError, CorpusError

HELDOUT_FRACTION = 0.1
_TOKENIZE_BATCH = 64


@dataclass
class TokenWindows:
    """N windows of L token ids cut from one source."""

    input_ids: torch.Tensor  # (N, L) int64
    source: str
    split: str  # "calibration" or "heldout"
    n_documents: int  # documents the windows were cut from
    seed: int | None = None
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def describe(self) -> dict:
        return {"source": self.source, "split": self.split, "samples": self.samples,
                "seq_len": self.seq_len, "seed": self.seed, "documents": self.n_documents,
                "skipped_files": self.skipped}


HELDOUT_OFFSET_SEED = 20240501  # fixed: held-out windows never depend on --seed


def unit_hash(doc_id: str) -> float:
    """A stable number in [0, 1) from an id: decides held-out splits, never the seed."""
    return int(hashlib.sha1(doc_id.encode()).hexdigest()[:12], 16) / float(1 << 48)


def split_documents(corpus: Corpus, heldout_fraction: float = HELDOUT_FRACTION):
    """(calibration docs, held-out docs): a document is held out when the hash of its id
    falls under ``heldout_fraction``. Both sides get at least one document when possible."""
    keyed = sorted(corpus.documents, key=lambda d: unit_hash(d.id))
    n_held = sum(unit_hash(d.id) < heldout_fraction for d in keyed)
    if len(keyed) >= 2:
        n_held = min(max(n_held, 1), len(keyed) - 1)
    return keyed[n_held:], keyed[:n_held]


def _separator(tokenizer) -> int:
    for tid in (tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id):
        if tid is not None:
            return int(tid)
    return 0


def _token_stream(tokenizer, docs: list[Document], need: float, per_doc: int,
                  rng: random.Random | None) -> tuple[list[int], int]:
    """Token ids of ``docs`` in order, EOS between documents, until ``need`` tokens.

    Each document gives at most ``per_doc`` tokens - a slice at a random offset
    when ``rng`` is given, its start otherwise - so that one long file cannot
    fill every window."""
    sep, ids, used = _separator(tokenizer), [], 0
    for start in range(0, len(docs), _TOKENIZE_BATCH):
        batch = [d.text for d in docs[start:start + _TOKENIZE_BATCH]]
        for doc_ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            offset = rng.randrange(len(doc_ids) - per_doc + 1) if rng and len(doc_ids) > per_doc else 0
            ids.extend(doc_ids[offset:offset + per_doc])
            ids.append(sep)
            used += 1
            if len(ids) >= need:
                return ids, used
    return ids, used


def check_window_sizes(samples: int, seq_len: int) -> None:
    if samples < 1:
        raise ConfigError(f"the number of windows must be >= 1, got {samples}")
    if seq_len < 2:
        raise ConfigError(f"seq_len must be >= 2, got {seq_len}")


def calibration_windows(tokenizer, corpus: Corpus, *, samples: int, seq_len: int, seed: int = 0,
                        heldout_fraction: float = HELDOUT_FRACTION) -> TokenWindows:
    """``samples`` windows of ``seq_len`` tokens from the calibration split.

    The seed shuffles the calibration documents and picks, in each, a slice of
    at most ``seq_len`` tokens; the slices are concatenated (EOS between
    documents) and cut into consecutive windows."""
    check_window_sizes(samples, seq_len)
    docs, _ = split_documents(corpus, heldout_fraction)
    docs = sorted(docs, key=lambda d: d.id)
    rng = random.Random(seed)
    rng.shuffle(docs)
    need = samples * seq_len
    ids, used = _token_stream(tokenizer, docs, need, seq_len, rng)
    if len(ids) < need:
        raise CorpusError(
            f"data source '{corpus.spec}' has {len(ids)} calibration tokens, fewer than "
            f"samples x seq_len = {need}: lower --samples or --seq-len"
        )
    windows = torch.tensor(ids[:need], dtype=torch.long).view(samples, seq_len)
    return TokenWindows(windows, corpus.spec, "calibration", used, seed, dict(corpus.skipped))


def heldout_windows(tokenizer, corpus: Corpus, *, seq_len: int, max_windows: int | None = 32,
                    heldout_fraction: float = HELDOUT_FRACTION) -> TokenWindows:
    """Non-overlapping windows of the held-out split (always the same windows: no user seed).

    Held-out documents in id order each give a slice of at most ``seq_len`` tokens
    at a pseudo-random offset drawn from a fixed seed (HELDOUT_OFFSET_SEED), EOS
    between documents; the stream is cut into windows of ``seq_len``.
    Returns every full window when ``max_windows`` is None."""
    check_window_sizes(1, seq_len)
    if max_windows is not None and max_windows < 1:
        raise ConfigError(f"the number of held-out windows must be >= 1, got {max_windows}")
    _, docs = split_documents(corpus, heldout_fraction)
    docs = sorted(docs, key=lambda d: d.id)
    need = max_windows * seq_len if max_windows else float("inf")
    # a fixed offset per file, not its start: source files open with licence headers,
    # which would make every language look like English boilerplate
    ids, used = _token_stream(tokenizer, docs, need, seq_len, random.Random(HELDOUT_OFFSET_SEED))
    n = len(ids) // seq_len if max_windows is None else min(max_windows, len(ids) // seq_len)
    if n < 1:
        raise CorpusError(
            f"the held-out split of '{corpus.spec}' has {len(ids)} tokens, less than one "
            f"window of {seq_len}: use a larger corpus or a smaller --seq-len"
        )
    windows = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return TokenWindows(windows, corpus.spec, "heldout", used, None, dict(corpus.skipped))
