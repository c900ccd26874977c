"""Token windows for calibration and held-out evaluation.

The held-out split is by document and depends only on each document's id (a
hash), never on the seed, so calibration windows and evaluation windows never
share a document, whatever the seed, sample count or sequence length.

    >>> corpus = read_source("python-stdlib")
    >>> calib = calibration_windows(tokenizer, corpus, samples=64, seq_len=512, seed=0)
    >>> calib.input_ids.shape          # (64, 512)
    >>> held = heldout_windows(tokenizer, corpus, seq_len=512, max_windows=32)

Tokenisation is streamed in bounded pieces: a fast tokenizer holds a few hundred
bytes per input byte while it works (about 7 GB for one 30 MB line), so no call
sees more than _TOKENIZE_CHARS (64 Ki) characters: small documents go in batches up to
that size, a longer one (documents are capped at 1 MiB, data/sources.py) in pieces,
and the stream stops as soon as it holds the tokens needed. Pieces are cut where
the byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2 rules) split anyway, so the ids
are those of one call on the whole document; a SentencePiece tokenizer (Llama 2,
Mistral) may add a word-start marker at the cuts of documents over 64 Ki characters.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field

import torch

from codeprune.data.sources import Corpus, Document, describe_reading
from codeprune.errors import ConfigError, CorpusError

HELDOUT_FRACTION = 0.1
_TOKENIZE_BATCH = 64  # documents per tokenizer call at most
_TOKENIZE_CHARS = 1 << 16  # characters per tokenizer call at most (one piece of a longer document)


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
    n_held = min(max(n_held, 1), len(keyed) - 1) if len(keyed) >= 2 else 0  # one: calibration
    return keyed[n_held:], keyed[:n_held]


def _separator(tokenizer) -> int:
    for tid in (tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id):
        if tid is not None:
            return int(tid)
    return 0


# Cuts that split no pre-token of the byte-level BPE tokenizers (the GPT-2, Llama 3 and Qwen2
# rules), so the pieces' ids are the whole text's: after "x\n" before a non-space character, or
# inside white space before the " word" that ends it (the space that goes with the word).
_CLEAN_CUT = re.compile(r"(?<=\S\n)(?=\S)|(?<=\s)(?= [^\W\d_])")


def _pieces(text: str, size: int | None = None) -> list[str]:
    """``text`` in pieces of at most ``size`` (_TOKENIZE_CHARS) characters, cut in the final half
    of each: at the last clean line start (_CLEAN_CUT), else after the last newline, else
    anywhere."""
    size = size or _TOKENIZE_CHARS
    pieces, start = [], 0
    while len(text) - start > size:
        low, high = start + size // 2, start + size
        clean = [m.start() for m in _CLEAN_CUT.finditer(text, low, high)]
        newline = text.rfind("\n", low, high)
        end = clean[-1] if clean else newline + 1 if newline >= 0 else high
        pieces.append(text[start:end])
        start = end
    return pieces + [text[start:]]


def _doc_tokens(tokenizer, docs: list[Document]):
    """Each document's token ids, in order, from tokenizer calls of at most _TOKENIZE_BATCH
    documents and _TOKENIZE_CHARS characters (a longer document alone, in ``_pieces``)."""
    batch, chars = [], 0
    for doc in docs:
        if batch and (len(batch) == _TOKENIZE_BATCH or chars + len(doc.text) > _TOKENIZE_CHARS):
            yield from tokenizer(batch, add_special_tokens=False)["input_ids"]
            batch, chars = [], 0
        if len(doc.text) <= _TOKENIZE_CHARS:
            batch.append(doc.text)
            chars += len(doc.text)
            continue
        ids = []
        for piece in _pieces(doc.text):
            ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
        yield ids
    if batch:
        yield from tokenizer(batch, add_special_tokens=False)["input_ids"]


@dataclass
class _Stream:
    """Token ids of documents in order (EOS between them), and how they were gathered."""

    ids: list[int]
    used: int = 0  # documents that gave tokens
    cut: int = 0  # documents longer than the per-document slice


def _token_stream(tokenizer, docs: list[Document], need: float, per_doc: int,
                  rng: random.Random | None) -> _Stream:
    """Token ids of ``docs`` in order, EOS between documents, until ``need`` tokens.

    Each document gives at most ``per_doc`` tokens - a slice at a random offset
    when ``rng`` is given, its start otherwise - so that one long file cannot
    fill every window."""
    sep, out = _separator(tokenizer), _Stream([])
    for doc_ids in _doc_tokens(tokenizer, docs):
        offset = rng.randrange(len(doc_ids) - per_doc + 1) if rng and len(doc_ids) > per_doc else 0
        out.ids.extend(doc_ids[offset:offset + per_doc])
        out.ids.append(sep)
        out.used += 1
        out.cut += len(doc_ids) > per_doc
        if len(out.ids) >= need:
            break
    return out


def _shortfall(corpus: Corpus, split: str, docs: list[Document], stream: _Stream, per_doc: int) -> str:
    """What a split gave and why, for a 'not enough tokens' error: 'calibration split of
    'x.txt': 1 document (1 held out), 65 tokens (each document gives at most 64 tokens and a
    separator: 1 was longer; 1 document of up to 30.0 MB truncated to 1 MiB)'."""
    n_all = len(corpus.documents)
    other = "held out" if split == "calibration" else "for calibration"
    why = [f"each document gives at most {per_doc} tokens and a separator: {stream.cut} "
           f"{'was' if stream.cut == 1 else 'were'} longer"] if stream.cut else []
    why.append(describe_reading(_in_split(corpus, docs)))
    return (f"the {split} split of '{corpus.spec}': {_plural(len(docs), 'document')} "
            f"({n_all - len(docs)} {other}), {_plural(len(stream.ids), 'token')} ({'; '.join(why)})")


def _in_split(corpus: Corpus, docs: list[Document]) -> Corpus:
    """``corpus``'s reading record, truncations limited to the documents of one split."""
    ids = {d.id for d in docs}
    return Corpus(corpus.spec, [], dict(corpus.skipped),
                  {k: v for k, v in corpus.truncated.items() if k in ids}, corpus.empty)


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'s' * (n != 1)}"


def check_window_sizes(samples: int, seq_len: int) -> None:
    if samples < 1:
        raise ConfigError(f"the number of windows must be >= 1, got {samples}")
    if seq_len < 2:
        raise ConfigError(f"seq_len must be >= 2, got {seq_len}")


def calibration_windows(tokenizer, corpus: Corpus, *, samples: int, seq_len: int, seed: int = 0,
                        heldout_fraction: float = HELDOUT_FRACTION,
                        per_doc: int | None = None) -> TokenWindows:
    """``samples`` windows of ``seq_len`` tokens from the calibration split.

    The seed shuffles the calibration documents and picks, in each, a slice of
    at most ``per_doc`` (default ``seq_len``) tokens; the slices are concatenated
    (EOS between documents) and cut into consecutive windows. Recovery on code
    (workflows/recover.py) draws its training windows here, with a larger ``per_doc``."""
    check_window_sizes(samples, seq_len)
    docs, _ = split_documents(corpus, heldout_fraction)
    docs = sorted(docs, key=lambda d: d.id)
    rng = random.Random(seed)
    rng.shuffle(docs)
    need, per_doc = samples * seq_len, per_doc or seq_len
    stream = _token_stream(tokenizer, docs, need, per_doc, rng)
    if len(stream.ids) < need:
        raise CorpusError(f"{_shortfall(corpus, 'calibration', docs, stream, per_doc)} -- need "
                          f"samples x seq_len = {samples} x {seq_len} = {need:,}: lower --samples or "
                          "--seq-len, or give a larger corpus")
    windows = torch.tensor(stream.ids[:need], dtype=torch.long).view(samples, seq_len)
    return TokenWindows(windows, corpus.spec, "calibration", stream.used, seed, dict(corpus.skipped))


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
    stream = _token_stream(tokenizer, docs, need, seq_len, random.Random(HELDOUT_OFFSET_SEED))
    n = len(stream.ids) // seq_len
    n = n if max_windows is None else min(max_windows, n)
    if n < 1:
        raise CorpusError(f"{_shortfall(corpus, 'held-out', docs, stream, seq_len)} -- less than one "
                          f"window of {seq_len}: use a larger corpus or a smaller --seq-len")
    windows = torch.tensor(stream.ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return TokenWindows(windows, corpus.spec, "heldout", stream.used, None, dict(corpus.skipped))
