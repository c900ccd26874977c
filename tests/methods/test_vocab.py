"""Vocabulary pruning (Flab-Pruner's vocabulary stage): tokenizer rebuild and embedding slicing."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from codeprune.errors import ConfigError
from codeprune.methods.vocab import count_tokens, prune_vocab_, select_vocab
from codeprune.models.checkpoint import save_checkpoint

from ..conftest import make_tiny

CORPUS = ["def f(x):\n    return x\n", "print(1)\n", "x = 1 + 1\n"]
ARBITRARY = ["héllo wörld", "emoji 🚀🐍 and 你好, Привет, مرحبا", "tabs\tand\r\nnewlines ∑ x² — «»",
             "zzzz qqqq never seen", ""]


def pruned(model_type="llama", tie=False, min_count=1):
    lm = make_tiny(model_type, tie_word_embeddings=tie)
    original = copy.deepcopy(lm)
    keep = select_vocab(lm.tokenizer, count_tokens(lm.tokenizer, CORPUS), min_count)
    old_to_new = prune_vocab_(lm, keep)
    return lm, original, keep, old_to_new


def test_any_text_round_trips():
    lm, original, keep, _ = pruned()
    assert len(keep) < len(original.tokenizer)
    for text in ARBITRARY + CORPUS:
        ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert max(ids, default=0) < len(keep)
        assert lm.tokenizer.decode(ids) == text


def test_corpus_gives_the_same_token_strings():
    lm, original, _, old_to_new = pruned()
    for text in CORPUS:
        old = original.tokenizer(text, add_special_tokens=False)["input_ids"]
        new = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert lm.tokenizer.convert_ids_to_tokens(new) == original.tokenizer.convert_ids_to_tokens(old)
        assert new == [old_to_new[i] for i in old]


def test_merges_are_consistent_with_the_vocabulary():
    import json

    lm, *_ = pruned()
    spec = json.loads(lm.tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    assert sorted(vocab.values()) == list(range(len(vocab)))
    for merge in spec["model"]["merges"]:
        a, b = merge if isinstance(merge, list) else merge.split(" ")
        assert a in vocab and b in vocab and a + b in vocab


@pytest.mark.parametrize("model_type, tie", [("llama", True), ("qwen2", False)])
def test_kept_token_logits_equal_the_original(model_type, tie, tmp_path):
    lm, original, keep, old_to_new = pruned(model_type, tie)
    old_ids = original.tokenizer(CORPUS[0], return_tensors="pt")["input_ids"]
    new_ids = torch.tensor([[old_to_new[i] for i in old_ids[0].tolist()]])
    with torch.no_grad():
        expected = original.model(input_ids=old_ids).logits[..., keep]
        # the same rows and hidden states; a narrower lm_head matmul may round differently
        torch.testing.assert_close(lm.model(input_ids=new_ids).logits, expected, rtol=1e-6, atol=1e-6)
    assert lm.model.config.vocab_size == len(keep) == lm.model.lm_head.out_features
    assert (lm.model.lm_head.weight is lm.model.model.embed_tokens.weight) == tie
    assert lm.tokenizer.eos_token_id == old_to_new[original.tokenizer.eos_token_id]
    save_checkpoint(lm, tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tie
    assert tok(CORPUS[1])["input_ids"] == lm.tokenizer(CORPUS[1])["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=new_ids).logits, expected, rtol=1e-6, atol=1e-6)


def test_min_count_and_special_tokens():
    lm = make_tiny("llama")
    counts = count_tokens(lm.tokenizer, CORPUS * 3)
    few = select_vocab(lm.tokenizer, counts, min_count=3)
    many = select_vocab(lm.tokenizer, counts, min_count=1)
    assert set(few) <= set(many)
    eos = lm.tokenizer.eos_token_id
    assert eos in few and counts[eos] == 0  # special tokens stay even unused
    with pytest.raises(ConfigError):
        select_vocab(lm.tokenizer, counts, min_count=0)


def test_max_removed_caps_the_cut_and_keeps_the_most_used_first():
    from collections import Counter

    lm = make_tiny("llama")
    tok = lm.tokenizer
    counts = count_tokens(tok, CORPUS)
    full = select_vocab(tok, counts, 1)
    size = len(tok)
    capped = select_vocab(tok, counts, 1, max_removed=(size - len(full)) // 2)
    assert set(full) < set(capped) and size - len(capped) <= (size - len(full)) // 2
    # with min_count 3 tokens used once or twice go first, but the cap takes them back first
    rare = select_vocab(tok, counts, 3, max_removed=size - len(full))
    assert set(full) <= set(rare)
    assert select_vocab(tok, Counter(), 1, max_removed=0) == list(range(size))


def test_remap_ids_gives_the_same_bytes_with_the_pruned_tokenizer():
    from codeprune.methods.vocab import remap_ids

    lm, original, keep, old_to_new = pruned()
    for text in ARBITRARY + CORPUS:
        old = original.tokenizer(text, add_special_tokens=False)["input_ids"]
        new = remap_ids(torch.tensor(old), original.tokenizer, lm.tokenizer, old_to_new)
        assert len(new) >= len(old) and max(new, default=0) < len(keep)
        assert lm.tokenizer.decode(new) == original.tokenizer.decode(old) == text
