"""Layer removal (Flab-Pruner's layer stage): greedy scores against brute force, surgery, export."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM

import codeprune
from codeprune.errors import ConfigError
from codeprune.methods import make_pruner
from codeprune.methods.depth import block_influence, choose_layers, remove_layers_
from codeprune.methods.structured.prune import prune_structured_
from codeprune.models.checkpoint import save_checkpoint

from ..conftest import make_tiny


def ids(n=4, length=16, seed=0):
    return torch.randint(0, 250, (n, length), generator=torch.Generator().manual_seed(seed))


def by_hand(lm, drop: int):
    """A copy of ``lm`` with layer ``drop`` deleted the plain way."""
    other = copy.deepcopy(lm)
    layers = list(other.model.model.layers)
    del layers[drop]
    other.model.model.layers = nn.ModuleList(layers)
    for new, layer in enumerate(layers):
        layer.self_attn.layer_idx = new
    other.model.config.num_hidden_layers = len(layers)
    if getattr(other.model.config, "layer_types", None):
        other.model.config.layer_types = other.model.config.layer_types[:len(layers)]
    return other


@torch.no_grad()
def kl(p_model, q_model, x):
    logp = F.log_softmax(p_model(input_ids=x).logits, -1)
    logq = F.log_softmax(q_model(input_ids=x).logits, -1)
    return float((logp.exp() * (logp - logq)).sum(-1).mean())


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_kl_picks_the_layer_whose_removal_changes_the_output_least(model_type):
    lm = make_tiny(model_type, num_hidden_layers=5)
    x = ids()
    brute = [kl(lm.model, by_hand(lm, i).model, x) for i in range(5)]
    first = choose_layers(lm, x, 1, metric="kl")
    assert first == [min(range(5), key=lambda i: brute[i])]
    assert lm.adapter.num_layers == 5  # scoring leaves the model whole


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_cached_prefix_kl_equals_brute_force_for_every_candidate(model_type):
    from codeprune.methods.depth import _reference, _removal_kl

    lm = make_tiny(model_type, num_hidden_layers=5)
    x = ids(n=5)
    ref = _reference(lm, x, batch_size=2)
    originals = lm.adapter.layers()
    keep = [0, 1, 3, 4]  # after a first removal: positions and original indices differ
    scores = _removal_kl(lm, keep, originals, ref, x, batch_size=2)
    lm.adapter.set_layers(originals)
    for cand in keep:
        other = by_hand(lm, 2)
        layers = list(other.model.model.layers)
        del layers[keep.index(cand)]
        other.model.model.layers = nn.ModuleList(layers)
        assert scores[cand] == pytest.approx(kl(lm.model, other.model, x), rel=1e-4, abs=1e-7)


def test_removing_by_hand_and_by_the_method_give_the_same_model():
    lm = make_tiny("qwen2", num_hidden_layers=5)
    x = ids()
    drop = choose_layers(lm, x, 1, metric="bi")
    hand = by_hand(lm, drop[0])
    assert remove_layers_(lm, drop) == [i for i in range(5) if i != drop[0]]
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=x).logits, hand.model(input_ids=x).logits)


def test_block_influence_by_hand():
    lm = make_tiny("llama", num_hidden_layers=3)
    x = ids()
    with torch.no_grad():
        hidden = lm.model(input_ids=x, output_hidden_states=True).hidden_states  # embeddings, then layers
    bi = block_influence(lm, x)
    for i in range(2):  # the last entry of hidden_states is after the final norm
        cos = F.cosine_similarity(hidden[i], hidden[i + 1], dim=-1)
        assert bi[i] == pytest.approx(float((1 - cos).mean()), rel=1e-5)
    last = block_influence(lm, x, last_token=True)
    cos = F.cosine_similarity(hidden[0][:, -1], hidden[1][:, -1], dim=-1)
    assert last[0] == pytest.approx(float((1 - cos).mean()), rel=1e-5)


def test_greedy_rescoring_and_bi_last():
    lm = make_tiny("llama", num_hidden_layers=6)
    x = ids()
    for metric in ("kl", "bi", "bi-last"):
        chosen = choose_layers(lm, x, 3, metric=metric)
        assert len(set(chosen)) == 3 and set(chosen) <= set(range(6))
    first_bi = block_influence(lm, x)
    assert choose_layers(lm, x, 1, metric="bi") == [min(range(6), key=lambda i: first_bi[i])]


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral", "qwen3"])
def test_config_layer_idx_generate_and_plain_reload(model_type, tmp_path):
    lm = make_tiny(model_type, num_hidden_layers=5)
    x = ids()
    remove_layers_(lm, [1, 3])
    config = lm.model.config
    assert config.num_hidden_layers == 3 == lm.adapter.num_layers
    assert [layer.self_attn.layer_idx for layer in lm.adapter.layers()] == [0, 1, 2]
    if getattr(config, "layer_types", None) is not None:
        assert len(config.layer_types) == 3
    prompt = x[:1, :6]
    cached = lm.model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
    plain = lm.model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)
    save_checkpoint(lm, tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert again.config.num_hidden_layers == 3
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, lm.model(input_ids=x).logits)


def test_per_layer_checkpoints_keep_their_sizes(tmp_path):
    lm = make_tiny("qwen2", num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=4)
    x = ids()
    prune_structured_(lm, make_pruner("taylor", ratio=0.3, structure="adaptive", scope="0:1"), x)
    widths = [lm.adapter.linears(layer)["up_proj"].out_features for layer in lm.adapter.layers()]
    remove_layers_(lm, [2])
    save_checkpoint(lm, tmp_path / "m")
    again = codeprune.load(str(tmp_path / "m"))
    assert [again.adapter.linears(layer)["up_proj"].out_features for layer in again.adapter.layers()] \
        == widths[:2] + widths[3:]
    with torch.no_grad():
        torch.testing.assert_close(again.model(input_ids=x).logits, lm.model(input_ids=x).logits)


def test_bad_requests():
    lm = make_tiny("llama", num_hidden_layers=3)
    with pytest.raises(ConfigError):
        choose_layers(lm, ids(), 3)
    with pytest.raises(ConfigError):
        choose_layers(lm, ids(), 1, metric="cosine")
    with pytest.raises(ConfigError):
        remove_layers_(lm, [0, 1, 2])
    with pytest.raises(ConfigError):
        remove_layers_(lm, [7])
