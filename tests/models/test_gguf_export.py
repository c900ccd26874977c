"""GGUF export without llama.cpp: the plan (architecture per output kind), the q/k row
permutation, the tokenizer's fields and pre-tokenizer, the file's metadata and tensors as
the gguf package reads them back, bad input, and transformers' own GGUF reader giving the
same logits for the family architectures (tests/evaluation/test_llamacpp.py runs them all
in llama.cpp)."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from codeprune.errors import ConfigError, UnsupportedArchitectureError
from codeprune.methods import make_pruner
from codeprune.methods.structured.prune import prune_structured_
from codeprune.models.gguf_export import (
    _permute_rows,
    export_gguf,
    modelfile_text,
    plan_export,
    pre_tokenizer_name,
    tokenizer_fields,
)
from tests.conftest import make_tiny

GQA = dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=64, intermediate_size=256)


def ids(n=4, length=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 250, (n, length), generator=g)


def structured(model_type: str, structure: str, compensation: bool = True, **kw):
    lm = make_tiny(model_type, **{**GQA, **kw})
    prune_structured_(lm, make_pruner("flap", ratio=0.3, structure=structure,
                                      compensation=compensation), ids(8, 32))
    return lm


@pytest.mark.parametrize("model_type,arch", [("llama", "llama"), ("mistral", "llama"), ("qwen2", "qwen2"),
                                             ("qwen3", "qwen3")])
def test_dense_models_keep_their_family_architecture(model_type, arch):
    plan = plan_export(make_tiny(model_type), "f16")
    assert (plan.arch, plan.per_layer, plan.pre) == (arch, False, "gpt-2")
    assert plan.permute_rope == (arch == "llama")


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_per_layer_and_compensated_results_use_deci(model_type):
    adaptive = plan_export(structured(model_type, "adaptive"), "f32")
    assert adaptive.arch == "deci" and adaptive.per_layer and adaptive.permute_rope
    assert len(set(adaptive.heads)) > 1 or len(set(adaptive.ffn)) > 1
    uniform_bias = plan_export(structured(model_type, "uniform"), "f32")  # o_proj / down_proj biases
    assert uniform_bias.arch == "deci"
    plain = plan_export(structured(model_type, "uniform", compensation=False), "f32")
    assert plain.arch != "deci" and not plain.per_layer


def test_qwen3_per_layer_is_refused_in_one_line():
    lm = structured("qwen3", "adaptive", head_dim=16)
    with pytest.raises(UnsupportedArchitectureError, match="no architecture for qwen3 .*q_norm"):
        plan_export(lm, "f16")


def test_permutation_interleaves_the_two_halves_of_each_head():
    t = torch.arange(2 * 8).float()  # 2 heads of 8 rows
    out = _permute_rows(t, 2)
    assert out.tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    w = torch.randn(16, 5)
    assert torch.equal(_permute_rows(w, 2)[:, 0], _permute_rows(w[:, 0], 2))


def test_bad_type_and_unknown_pre_tokenizer():
    lm = make_tiny("llama")
    with pytest.raises(ConfigError, match="unsupported GGUF type 'q3_k'"):
        plan_export(lm, "q3_k")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(UnsupportedArchitectureError, match="no pre-tokenizer .*Whitespace"):
        pre_tokenizer_name(PreTrainedTokenizerFast(tokenizer_object=tok))
    wordpiece = Tokenizer(models.WordPiece(vocab={"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    with pytest.raises(UnsupportedArchitectureError, match="byte-level BPE"):
        pre_tokenizer_name(PreTrainedTokenizerFast(tokenizer_object=wordpiece))


def test_qwen2_and_llama3_split_rules_are_recognised():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE(vocab={"a": 0}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), "isolated"),
                                                 pre_tokenizers.ByteLevel(use_regex=False)])
    assert pre_tokenizer_name(PreTrainedTokenizerFast(tokenizer_object=tok)) == "qwen2"
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel()])
    assert pre_tokenizer_name(PreTrainedTokenizerFast(tokenizer_object=tok)) == "smollm"


def test_tokenizer_fields_pad_unused_rows_and_mark_special_tokens(tiny_tokenizer):
    n = len(tiny_tokenizer)
    fields = tokenizer_fields(tiny_tokenizer, n + 3)
    assert len(fields["tokens"]) == len(fields["types"]) == n + 3
    eos = tiny_tokenizer.eos_token_id
    assert fields["tokens"][eos] == "<|endoftext|>" and fields["types"][eos] == gguf.TokenType.CONTROL
    assert fields["types"][n:] == [gguf.TokenType.UNUSED] * 3 and fields["tokens"][n] == f"[PAD{n}]"
    assert fields["merges"] and all(len(m.split(" ")) == 2 for m in fields["merges"])
    assert fields["add_bos"] is False and fields["eos"] == eos
    with pytest.raises(ConfigError, match="embedding rows"):
        tokenizer_fields(tiny_tokenizer, n - 1)


def _read(path):
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


def test_per_layer_file_holds_arrays_biases_and_exact_shapes(tmp_path):
    lm = structured("qwen2", "adaptive")
    plan = plan_export(lm, "f32", source_metadata={"general.license": "apache-2.0", "general.name": "src"})
    path = export_gguf(lm, tmp_path / "m.gguf", plan=plan, progress=False)
    meta, tensors = _read(path)
    assert meta["general.architecture"] == "deci" and meta["general.license"] == "apache-2.0"
    assert meta["general.name"] == "m" and meta["general.base_model.0.name"] == "src"
    sizes = [lm.adapter.layer_sizes(layer) for layer in lm.adapter.layers()]
    assert meta["deci.attention.head_count"] == [s["heads"] for s in sizes]
    assert meta["deci.attention.head_count_kv"] == [s["kv_heads"] for s in sizes]
    # FFN widths padded with zero channels to a multiple of 32 (same function; quantizable, fast)
    assert meta["deci.feed_forward_length"] == [-(-s["intermediate"] // 32) * 32 for s in sizes]
    widths = [s["intermediate"] for s in sizes]
    assert plan.padded_channels == sum(meta["deci.feed_forward_length"]) - sum(widths)
    assert meta["tokenizer.ggml.pre"] == "gpt-2" and meta["tokenizer.ggml.model"] == "gpt2"
    layer = lm.adapter.layers()[1]
    q = layer.self_attn.q_proj
    stored = np.asarray(tensors["blk.1.attn_q.weight"].data).reshape(q.out_features, q.in_features)
    expected = _permute_rows(q.weight.detach(), sizes[1]["heads"]).numpy()
    np.testing.assert_array_equal(stored, expected)
    np.testing.assert_array_equal(np.asarray(tensors["blk.1.ffn_down.bias"].data),
                                  layer.mlp.down_proj.bias.detach().numpy())
    width, padded = sizes[1]["intermediate"], meta["deci.feed_forward_length"][1]
    down = np.asarray(tensors["blk.1.ffn_down.weight"].data).reshape(64, padded)
    np.testing.assert_array_equal(down[:, :width], layer.mlp.down_proj.weight.detach().numpy())
    assert not down[:, width:].any()
    gate = np.asarray(tensors["blk.1.ffn_gate.weight"].data).reshape(padded, 64)
    assert not gate[width:].any() and plan_export(lm, "f32", ffn_multiple=1).ffn[1] == width
    assert "blk.1.attn_output.bias" in tensors and "output.weight" in tensors  # tiny models are untied
    assert not list(tmp_path.glob(".*tmp*"))


def test_quantized_export_falls_back_for_rows_that_do_not_block(tmp_path):
    lm = structured("llama", "adaptive", compensation=False)
    plan = plan_export(lm, "q8_0", ffn_multiple=1)  # unpadded: odd widths cannot be quantized
    path = export_gguf(lm, tmp_path / "m.gguf", plan=plan, progress=False)
    _, tensors = _read(path)
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    odd = [f"blk.{i}.ffn_down.weight" for i, f in enumerate(plan.ffn) if f % 32]
    for name in odd:
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F16 and plan.fallbacks[name] == "f16"
    assert set(plan.fallbacks) == set(odd)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_transformers_reads_the_family_export_back_with_the_same_logits(model_type, tmp_path):
    """transformers' GGUF reader un-permutes q/k for llama: a wrong permutation or tensor name
    changes the logits. (Its qwen3 reader ignores attention.key_length, so Qwen3 is checked in
    llama.cpp only: tests/evaluation/test_llamacpp.py.)"""
    from transformers import AutoModelForCausalLM

    lm = make_tiny(model_type)
    path = export_gguf(lm, tmp_path / "m.gguf", plan=plan_export(lm, "f32"), progress=False)
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    x = ids()
    with torch.no_grad():
        got = back.eval()(input_ids=x).logits
        torch.testing.assert_close(got, lm.model(input_ids=x).logits, rtol=1e-4, atol=1e-4)


def test_an_existing_file_is_kept_without_overwrite(tmp_path):
    from codeprune.errors import OutputExistsError

    lm = make_tiny("llama")
    target = tmp_path / "m.gguf"
    target.write_text("old")
    with pytest.raises(OutputExistsError):
        export_gguf(lm, target, plan=plan_export(lm, "f16"), progress=False)
    assert target.read_text() == "old"


def test_modelfile_for_chatml_and_base_models(tiny_tokenizer):
    tiny_tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                                    "<|im_end|>\n{% endfor %}")
    try:
        text = modelfile_text(tiny_tokenizer, "q.gguf")
    finally:
        tiny_tokenizer.chat_template = None
    assert "FROM ./q.gguf" in text and "<|im_start|>{{ .Role }}" in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|endoftext|>"' in text
    base = modelfile_text(tiny_tokenizer, "q.gguf")
    assert 'TEMPLATE """{{ .Prompt }}"""' in base


def test_source_metadata_is_read_from_the_offline_gguf(smollm2):
    from codeprune.models.offline import source_gguf_kv

    kv = source_gguf_kv("smollm2-135m")
    assert kv["tokenizer.ggml.pre"] and kv["tokenizer.n_tokens"] == len(smollm2.tokenizer)
    assert any(k.startswith("general.") for k in kv)
    json.dumps(kv)  # recorded in the cache's source file


def test_rope_scaling_and_sentencepiece_tokenizers_are_refused():
    lm = make_tiny("llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(UnsupportedArchitectureError, match="rope scaling 'linear'"):
        plan_export(lm, "f16")
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    sp = Tokenizer(models.BPE(vocab={"<unk>": 0, "\u2581a": 1}, merges=[], byte_fallback=True))
    with pytest.raises(UnsupportedArchitectureError, match="SentencePiece"):
        pre_tokenizer_name(PreTrainedTokenizerFast(tokenizer_object=sp))
