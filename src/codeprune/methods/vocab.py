"""Vocabulary pruning (Flab-Pruner's vocabulary stage): keep the tokens a code corpus uses.

    counts = count_tokens(lm.tokenizer, corpus_texts)
    keep = select_vocab(lm.tokenizer, counts, min_count=1)
    old_to_new = prune_vocab_(lm, keep)

Which tokens stay (``select_vocab``): every token used at least ``min_count``
times on the corpus, every special and added token, the byte-level base
alphabet (so any text still encodes), and the merge closure: the two parts of
every kept token's BPE merge, recursively, so every kept token can still be
produced. The rebuilt BPE keeps a merge only if its two parts and its result
survive, in the original order of ranks.

Guarantees (tests/methods/test_vocab.py):
- any text encodes and decodes back to itself (the base alphabet stays);
- on the corpus, the pruned tokenizer produces the same token strings as the
  original: every merge the original applied to a corpus word produced a kept
  token and so survives, and the surviving merges keep their relative ranks;
- the logits of the kept tokens equal the original's (embedding and lm_head
  rows are sliced, never changed); tied embeddings stay tied.

Only byte-level BPE fast tokenizers (GPT-2 / Llama-3 / Qwen / SmolLM style) are
supported; anything else is refused with a ConfigError. The ``vocab`` stage of a
recipe (recipes/runner.py, docs/recipes.md) calls these; ``remap_ids`` / ``id_map`` let the
pruned model be scored on windows cut by the original tokenizer.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from collections.abc import Iterable

import torch
from torch import nn

from codeprune.errors import ConfigError


def _spec(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError("vocabulary pruning needs a fast (tokenizers) tokenizer")
    spec = json.loads(backend.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    byte_level = pre.get("type") == "ByteLevel" or any(
        p.get("type") == "ByteLevel" for p in pre.get("pretokenizers", []) or [])
    if model.get("type") != "BPE" or not byte_level:
        raise ConfigError("vocabulary pruning supports byte-level BPE tokenizers only "
                          f"(this one: {model.get('type')}, pre-tokenizer {pre.get('type')})")
    return spec


def _merge_pairs(merges: list) -> list[tuple[str, str]]:
    return [tuple(m) if isinstance(m, (list, tuple)) else tuple(m.split(" ", 1)) for m in merges]


def count_tokens(tokenizer, texts: Iterable[str]) -> Counter:
    """How often each token id appears when ``texts`` are encoded (no special tokens added)."""
    counts: Counter = Counter()
    for text in texts:
        counts.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    return counts


def select_vocab(tokenizer, counts: Counter, min_count: int = 1, *,
                 max_removed: int | None = None) -> list[int]:
    """The sorted ids to keep (see the module docstring).

    ``max_removed`` caps how many ids may go (a recipe's budget for this stage):
    when the rule above would remove more, the removed tokens are taken back most
    used first, then by BPE rank (lower id = earlier merge = more frequent in the
    tokenizer's own training data), each with its merge closure."""
    from tokenizers import pre_tokenizers

    if min_count < 1:
        raise ConfigError(f"min count must be >= 1, got {min_count}")
    spec = _spec(tokenizer)
    vocab: dict[str, int] = spec["model"]["vocab"]
    producer = {a + b: (a, b) for a, b in _merge_pairs(spec["model"]["merges"])}
    added = {t["id"] for t in spec.get("added_tokens", [])}
    keep: set[str] = set()
    ids: set[int] = set(added)  # the kept ids, kept in step with ``keep``

    def add(tokens) -> None:  # with the merge closure: a kept token's parts must be producible too
        stack = [t for t in tokens if t not in keep]
        keep.update(stack)
        ids.update(vocab[t] for t in stack)
        while stack:
            for part in producer.get(stack.pop()) or ():
                if part not in keep and part in vocab:
                    keep.add(part)
                    ids.add(vocab[part])
                    stack.append(part)

    add(tok for tok, i in vocab.items() if counts.get(i, 0) >= min_count)
    add(c for c in pre_tokenizers.ByteLevel.alphabet() if c in vocab)
    size = len(set(vocab.values()) | added)
    if max_removed is not None and size - len(ids) > max_removed:
        back = sorted((i, tok) for tok, i in vocab.items() if tok not in keep)
        back.sort(key=lambda item: -counts.get(item[0], 0))  # stable: ties stay in id order
        for _, tok in back:
            if size - len(ids) <= max_removed:
                break
            add([tok])
    return sorted(ids)


def id_map(old_tokenizer, new_tokenizer) -> dict[int, int]:
    """old id -> new id by token string, for a tokenizer and its pruned version (a pruned
    vocabulary is a subset of the original: anything else is refused)."""
    old_vocab, new_vocab = old_tokenizer.get_vocab(), new_tokenizer.get_vocab()
    foreign = [t for t in new_vocab if t not in old_vocab]
    if foreign:
        raise ConfigError(f"the model's tokenizer is not a pruned version of the reference tokenizer "
                          f"({len(foreign)} tokens it has are unknown to the reference, e.g. {foreign[0]!r})")
    return {i: new_vocab[t] for t, i in old_vocab.items() if t in new_vocab}


def make_remap(old_tokenizer, new_tokenizer, old_to_new: dict[int, int]):
    """``remap(ids) -> ids``: ``remap_ids`` bound to two tokenizers, with one split cache."""
    cache: dict[int, list[int]] = {}

    def remap(ids) -> list[int]:
        return remap_ids(ids, old_tokenizer, new_tokenizer, old_to_new, cache)

    return remap


def remap_ids(ids, old_tokenizer, new_tokenizer, old_to_new: dict[int, int],
              cache: dict[int, list[int]] | None = None) -> list[int]:
    """Token ids of the original tokenizer -> ids of the pruned one for the *same bytes*: a
    kept token maps to its new id, a removed one to the pruned BPE's split of its string
    (so windows cut by the original tokenizer can be scored by the pruned model)."""
    cache = {} if cache is None else cache
    model = new_tokenizer.backend_tokenizer.model
    out: list[int] = []
    for i in (ids.tolist() if hasattr(ids, "tolist") else ids):
        new = old_to_new.get(i)
        if new is not None:
            out.append(new)
            continue
        if i not in cache:
            token = old_tokenizer.convert_ids_to_tokens(i)
            cache[i] = [t.id for t in model.tokenize(token)]
        out.extend(cache[i])
    return out


def rebuild_tokenizer(tokenizer, keep: list[int]):
    """A copy of ``tokenizer`` whose vocabulary is ``keep`` (old ids), renumbered 0..K-1 in the
    original order, with consistent merges, added tokens and post-processor ids."""
    from tokenizers import Tokenizer

    spec = _spec(tokenizer)
    old_to_new = {old: new for new, old in enumerate(keep)}
    model = spec["model"]
    kept_tokens = {tok: old_to_new[i] for tok, i in model["vocab"].items() if i in old_to_new}
    model["vocab"] = kept_tokens
    as_lists = bool(model["merges"]) and isinstance(model["merges"][0], (list, tuple))
    merges = [(a, b) for a, b in _merge_pairs(model["merges"])
              if a in kept_tokens and b in kept_tokens and a + b in kept_tokens]
    model["merges"] = [list(m) for m in merges] if as_lists else [f"{a} {b}" for a, b in merges]
    for added in spec.get("added_tokens", []):
        added["id"] = old_to_new[added["id"]]
    content_id = {**kept_tokens, **{t["content"]: t["id"] for t in spec.get("added_tokens", [])}}
    _renumber_post_processor(spec.get("post_processor"), content_id)
    new = copy.deepcopy(tokenizer)
    new._tokenizer = Tokenizer.from_str(json.dumps(spec))
    return new, old_to_new


def _renumber_post_processor(node, content_id: dict[str, int]) -> None:
    """Special-token ids inside a (Template) post-processor follow their tokens."""
    if isinstance(node, dict):
        if isinstance(node.get("ids"), list) and isinstance(node.get("tokens"), list):
            node["ids"] = [content_id[t] for t in node["tokens"]]
        for key, value in node.items():
            if key == "pair" or key == "single":
                continue
            _renumber_post_processor(value, content_id)
    elif isinstance(node, list):
        for item in node:
            _renumber_post_processor(item, content_id)


@torch.no_grad()
def prune_vocab_(lm, keep: list[int]) -> dict[int, int]:
    """Keep only the token ids ``keep`` in ``lm`` (embeddings, lm_head, tokenizer, config and
    generation config ids); returns the old -> new id map."""
    model, config = lm.model, lm.model.config
    keep = sorted(set(keep))
    if not keep or keep[-1] >= lm.adapter.embed_tokens().num_embeddings:
        raise ConfigError("token ids to keep are out of the embedding's range")
    tokenizer, old_to_new = rebuild_tokenizer(lm.tokenizer, keep)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        for holder in (config, getattr(model, "generation_config", None)):
            value = getattr(holder, key, None) if holder is not None else None
            if value is None:
                continue
            values = value if isinstance(value, list) else [value]
            if any(v not in old_to_new for v in values):
                raise ConfigError(f"{key} {value} is not among the kept tokens")
            mapped = [old_to_new[v] for v in values]
            setattr(holder, key, mapped if isinstance(value, list) else mapped[0])
    idx = torch.tensor(keep, dtype=torch.long)
    emb = lm.adapter.embed_tokens()
    head = lm.adapter.lm_head()
    tied = head.weight is emb.weight
    new_emb = nn.Embedding(len(keep), emb.embedding_dim, padding_idx=None,
                           device=emb.weight.device, dtype=emb.weight.dtype)
    new_emb.weight.copy_(emb.weight.index_select(0, idx.to(emb.weight.device)))
    model.set_input_embeddings(new_emb)
    if tied:
        head.weight = new_emb.weight
    else:
        head.weight = nn.Parameter(head.weight.index_select(0, idx.to(head.weight.device)))
        if head.bias is not None:
            head.bias = nn.Parameter(head.bias.index_select(0, idx.to(head.bias.device)))
    head.out_features = len(keep)
    config.vocab_size = len(keep)
    lm.tokenizer = tokenizer
    return old_to_new
