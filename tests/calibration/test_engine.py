"""The sequential engine: captured inputs, statistics, propagation through pruned layers."""

import pytest
import torch

from codeprune.calibration.engine import calibrate_layers, capture_layer_inputs
from codeprune.calibration.stats import ChannelStats

from ..conftest import make_tiny

# Families that mix sliding-window and full-attention layers: each layer gets its own mask.
MIXED = {
    "qwen2-sliding-first": ("qwen2", dict(use_sliding_window=True, sliding_window=4,
                                          layer_types=["sliding_attention", "full_attention"])),
    "qwen3-full-first": ("qwen3", dict(use_sliding_window=True, sliding_window=4, num_hidden_layers=3,
                                       layer_types=["full_attention", "sliding_attention",
                                                    "full_attention"])),
}


def _full_forward_inputs(lm, ids):
    """Every decoder Linear's inputs from one hooked full-model forward."""
    seen, handles = {}, []
    for i, layer in enumerate(lm.adapter.layers()):
        for name, lin in lm.adapter.linears(layer).items():
            def hook(mod, args, key=(i, name)):
                seen.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]).double())
            handles.append(lin.register_forward_pre_hook(hook))
    with torch.no_grad():
        lm.model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


def _assert_engine_statistics_equal_full_forward(lm, random_ids):
    expected = _full_forward_inputs(lm, random_ids)
    got = {}

    def on_layer(i, layer, linears, stats):
        assert list(linears) == list(lm.adapter.sublayer_names)
        got.update({(i, n): s for n, s in stats.items()})

    calibrate_layers(lm, random_ids, make_stats=lambda n, lin: ChannelStats(moments=True),
                     on_layer=on_layer, batch_size=4)  # 6 windows: batches of 4 and 2
    assert set(got) == set(expected)
    for key, X in expected.items():
        s = got[key]
        assert s.count == X.shape[0]
        torch.testing.assert_close(s.sumsq, (X**2).sum(0), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(s.mean, X.mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(s.var, X.var(0, unbiased=False), rtol=1e-3, atol=1e-5)


def test_engine_statistics_equal_full_forward(tiny_any, random_ids):
    _assert_engine_statistics_equal_full_forward(tiny_any, random_ids)


@pytest.mark.parametrize("case", sorted(MIXED))
def test_each_layer_gets_its_own_mask(case, tiny_tokenizer, random_ids):
    """With sliding-window and full layers mixed, every layer runs with the keyword arguments
    the model gives it (layer 0's mask would be wrong for the others)."""
    model_type, overrides = MIXED[case]
    lm = make_tiny(model_type, tokenizer=tiny_tokenizer, **overrides)
    inputs = capture_layer_inputs(lm, random_ids[:2], device=torch.device("cpu"), batch_size=2)
    masks = [kw["attention_mask"] for kw in inputs[0].layer_kwargs]
    types = lm.config.layer_types
    for i, j in [(i, j) for i in range(len(types)) for j in range(len(types))]:
        same = masks[i] is masks[j] or (masks[i] is not None and masks[j] is not None
                                         and torch.equal(masks[i], masks[j]))
        assert same == (types[i] == types[j]), (types, i, j)
    _assert_engine_statistics_equal_full_forward(lm, random_ids)
    assert list(lm.adapter.layers()) == [m for m in lm.model.model.layers]  # the layers are back


def test_offloaded_forward_of_mixed_layers_equals_the_model(tiny_tokenizer, random_ids):
    from codeprune.calibration.engine import forward_layers

    lm = make_tiny("qwen2", tokenizer=tiny_tokenizer, **MIXED["qwen2-sliding-first"][1])
    with torch.no_grad():
        expected = lm.model(input_ids=random_ids).logits
    outs = forward_layers(lm, random_ids, offload=True, batch_size=4)
    torch.testing.assert_close(lm.adapter.logits(torch.cat(outs)), expected, rtol=1e-5, atol=1e-5)


def test_input_groups_share_statistics(tiny_llama, random_ids):
    seen = {}
    calibrate_layers(tiny_llama, random_ids, make_stats=lambda n, lin: ChannelStats(),
                     on_layer=lambda i, layer, lin, stats: seen.update({i: stats}))
    stats = seen[0]
    assert stats["q_proj"] is stats["k_proj"] is stats["v_proj"]
    assert stats["gate_proj"] is stats["up_proj"]
    assert stats["o_proj"] is not stats["down_proj"]


def test_next_layer_is_calibrated_on_pruned_outputs(tiny_llama, random_ids):
    """Zeroing layer 0's output projections must change what layer 1 sees."""
    lm = tiny_llama
    dense = {}
    calibrate_layers(lm, random_ids, make_stats=lambda n, lin: ChannelStats(),
                     on_layer=lambda i, layer, lin, stats: dense.update({i: stats["q_proj"].sumsq}))

    pruned = {}

    def on_layer(i, layer, linears, stats):
        pruned[i] = stats["q_proj"].sumsq
        if i == 0:
            linears["o_proj"].weight.data.zero_()
            linears["down_proj"].weight.data.zero_()

    calibrate_layers(lm, random_ids, make_stats=lambda n, lin: ChannelStats(), on_layer=on_layer)
    torch.testing.assert_close(pruned[0], dense[0])
    # layer 1 now sees the embeddings alone (the residual stream without layer 0's updates)
    emb = lm.adapter.embed_tokens()(random_ids).reshape(-1, lm.adapter.hidden_size)
    normed = lm.adapter.layers()[1].input_layernorm(emb).double()
    torch.testing.assert_close(pruned[1], (normed**2).sum(0), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(pruned[1], dense[1])


def test_capture_respects_seq_len(tiny_llama):
    ids = torch.randint(0, 250, (5, 11))
    inputs = capture_layer_inputs(tiny_llama, ids, device=torch.device("cpu"), batch_size=2)
    assert [tuple(i.hidden.shape) for i in inputs] == [(2, 11, 64), (2, 11, 64), (1, 11, 64)]


def test_offload_gives_the_same_result(tiny_llama, random_ids, tiny_tokenizer):
    from codeprune.methods import make_pruner
    from codeprune.methods.unstructured.base import prune_model_

    other = make_tiny("llama", tokenizer=tiny_tokenizer)  # same seed: same weights
    prune_model_(tiny_llama, make_pruner("wanda"), random_ids, offload=False)
    prune_model_(other, make_pruner("wanda"), random_ids, offload=True)
    pairs = zip(tiny_llama.model.state_dict().items(), other.model.state_dict().values(), strict=True)
    for (name, a), b in pairs:
        assert torch.equal(a, b), name


def test_offloaded_perplexity_equals_plain(tiny_llama, random_ids):
    from codeprune.data.calibration import TokenWindows
    from codeprune.evaluation.perplexity import perplexity

    windows = TokenWindows(random_ids, "test", "heldout", 1)
    plain = perplexity(tiny_llama, windows, batch_size=4)
    layered = perplexity(tiny_llama, windows, batch_size=4, offload_device="cpu")
    assert layered["tokens"] == plain["tokens"] == 6 * 23
    assert layered["ppl"] == pytest.approx(plain["ppl"], rel=1e-5)
    # and both equal the model's own loss
    with torch.no_grad():
        loss = tiny_llama.model(input_ids=random_ids, labels=random_ids).loss
    assert plain["nll"] == pytest.approx(loss.item(), rel=1e-5)
