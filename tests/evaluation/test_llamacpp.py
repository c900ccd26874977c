"""Every kind of codeprune result exported to GGUF and run in llama.cpp for real: the
logits of a few prompts equal transformers' within float tolerance (f32 export), greedy
generation gives the same tokens, a vocabulary-pruned tokenizer splits text as the pruned
transformers tokenizer does, and the CLI refuses bad input in one line. llama-cpp-python is
installed by `make install`: these tests never skip."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from codeprune.evaluation.llamacpp import LlamaCpp
from codeprune.methods import make_pruner
from codeprune.methods.depth import remove_layers_
from codeprune.methods.structured.prune import prune_structured_
from codeprune.methods.vocab import count_tokens, prune_vocab_, select_vocab
from codeprune.models.checkpoint import save_checkpoint
from codeprune.models.gguf_export import export_gguf, plan_export
from tests.conftest import make_tiny

GQA = dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=64, intermediate_size=256)
PROMPTS = ["def add(a, b):\n    return a + b\n", "import os\nclass A:\n    pass\n\nprint(os.sep)"]
TEXTS = ["def f(x):\n    return x  # 🚀🐍\n", "你好, Привет, مرحبا", "a\r\nb\r\n\r\n",
         "x    =\t\t1\n\n\n    ", "   leading and trailing   ", "<|endoftext|>after"]


def ids(n=8, length=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 250, (n, length), generator=g)


def _unstructured(lm):
    with torch.no_grad():
        for layer in lm.adapter.layers():
            for lin in lm.adapter.linears(layer).values():
                w = lin.weight
                w[w.abs() < w.abs().median()] = 0  # 50% zeros: dense tensors in GGUF
    return lm


def _structured(model_type, structure, compensation):
    lm = make_tiny(model_type, **GQA, **({"head_dim": 8} if model_type == "qwen3" else {}))
    pruner = make_pruner("flap", ratio=0.3, structure=structure, compensation=compensation)
    prune_structured_(lm, pruner, ids())
    return lm


def _layers(model_type):
    lm = make_tiny(model_type, num_hidden_layers=3)
    remove_layers_(lm, [1])
    return lm


def _vocab(model_type):
    lm = make_tiny(model_type)
    keep = select_vocab(lm.tokenizer, count_tokens(lm.tokenizer, PROMPTS))
    prune_vocab_(lm, keep)
    return lm


KINDS = {
    "dense": lambda t: make_tiny(t),
    "unstructured": lambda t: _unstructured(make_tiny(t)),
    "uniform": lambda t: _structured(t, "uniform", False),
    "adaptive-compensated": lambda t: _structured(t, "adaptive", True),
    "layers": _layers,
    "vocab": _vocab,
}
CASES = [(t, k) for t in ["llama", "qwen2", "mistral", "qwen3"] for k in KINDS
         if not (t == "qwen3" and k == "adaptive-compensated")]  # refused: test_gguf_export.py


def _hf_logits(lm, tokens):
    with torch.no_grad():
        return lm.model(input_ids=torch.tensor([tokens])).logits[0].numpy()


@pytest.mark.parametrize("model_type,kind", CASES)
def test_llama_cpp_gives_transformers_logits_and_greedy_tokens(model_type, kind, tmp_path):
    lm = KINDS[kind](model_type)
    plan = plan_export(lm, "f32")
    path = export_gguf(lm, tmp_path / "m.gguf", plan=plan, progress=False)
    with LlamaCpp(path, n_ctx=128, threads=1) as rt:
        assert rt.n_vocab == lm.adapter.vocab_size
        for text in PROMPTS:
            tokens = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
            ref, got = _hf_logits(lm, tokens), rt.logits(tokens)
            np.testing.assert_allclose(got, ref, rtol=1e-3, atol=2e-3 * max(1.0, np.abs(ref).max()))
        tokens = lm.tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            want = lm.model.generate(torch.tensor([tokens]), max_new_tokens=8, do_sample=False,
                                     pad_token_id=lm.tokenizer.eos_token_id)[0, len(tokens):].tolist()
        assert rt.greedy(tokens, 8) == want


def _bpe_tokenizer(rule: str):
    """A byte-level BPE tokenizer trained on code and text with one of the split rules the export
    recognises (Qwen2's regex, Llama 3's, SmolLM's digits + GPT-2)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    tok = Tokenizer(models.BPE())
    if rule == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        split = pre_tokenizers.Split(Regex(GGUF_PRE_TOKENIZER_SPLITS[rule]), behavior="isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                     use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((TEXTS + PROMPTS + ["x = 12345 + 678\n", "The quick brown fox's tail\n"]) * 30,
                            trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.mark.parametrize("rule", ["qwen2", "llama-bpe", "smollm"])
def test_each_recognised_split_rule_tokenizes_alike_in_llama_cpp(rule, tmp_path):
    tokenizer = _bpe_tokenizer(rule)
    lm = make_tiny("llama", tokenizer=tokenizer)
    plan = plan_export(lm, "f16")
    assert plan.pre == rule
    path = export_gguf(lm, tmp_path / "m.gguf", plan=plan, progress=False)
    extra = ["it's 2024-12-07 at 10:30", "  x=1234567890  ", "I'LL SEE you'd", "a\n\n\tb  \r\n c"]
    with LlamaCpp(path, n_ctx=64, threads=1) as rt:
        for text in TEXTS + PROMPTS + extra:
            assert rt.tokenize(text) == tokenizer(text, add_special_tokens=False)["input_ids"], text


@pytest.mark.parametrize("pruned", [False, True])
def test_llama_cpp_tokenizes_like_transformers(pruned, tmp_path):
    lm = _vocab("qwen2") if pruned else make_tiny("qwen2")
    path = export_gguf(lm, tmp_path / "m.gguf", plan=plan_export(lm, "f16"), progress=False)
    with LlamaCpp(path, n_ctx=64, threads=1) as rt:
        for text in TEXTS + PROMPTS:
            assert rt.tokenize(text) == lm.tokenizer(text, add_special_tokens=False)["input_ids"], text


def test_quantized_exports_stay_close(tmp_path):
    lm = make_tiny("llama", hidden_size=128, intermediate_size=256)
    tokens = lm.tokenizer(PROMPTS[1], add_special_tokens=False)["input_ids"]
    ref = _hf_logits(lm, tokens)
    errors = {}
    for qtype in ("f16", "q8_0", "q4_0"):
        path = export_gguf(lm, tmp_path / f"{qtype}.gguf", plan=plan_export(lm, qtype), progress=False)
        with LlamaCpp(path, n_ctx=64, threads=1) as rt:
            errors[qtype] = float(np.abs(rt.logits(tokens) - ref).mean())
    assert errors["f16"] < errors["q8_0"] < errors["q4_0"], errors
    assert errors["q8_0"] < 0.02 * float(np.abs(ref).mean()), errors


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "codeprune", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_export_cli_refuses_bad_input_in_one_line(tmp_path):
    not_a_run = tmp_path / "notes"
    not_a_run.mkdir()
    (not_a_run / "a.txt").write_text("x")
    cases = [
        (["export", str(not_a_run), "--gguf", str(tmp_path / "a.gguf")], "cannot read the config"),
        (["export", str(not_a_run), "--gguf", str(tmp_path / "a.gguf"), "--type", "q3_k"],
         "unsupported GGUF type"),
        (["export", str(not_a_run), "--gguf", str(tmp_path / "a.bin")], "must name a .gguf file"),
    ]
    lm = _structured("qwen3", "adaptive", True)
    save_checkpoint(lm, tmp_path / "q3")
    cases.append((["export", str(tmp_path / "q3"), "--gguf", str(tmp_path / "q3.gguf")],
                  "no architecture for qwen3"))
    for args, message in cases:
        r = _cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], r.stderr
    leftovers = [p.name for p in tmp_path.iterdir()
                 if p.suffix in (".gguf", ".Modelfile") or p.name.startswith(".")]
    assert leftovers == []


def test_export_then_eval_in_llama_cpp_through_the_cli(tmp_path):
    lm = _structured("llama", "adaptive", True)
    save_checkpoint(lm, tmp_path / "run")
    gguf = tmp_path / "run.q8_0.gguf"
    r = _cli("export", str(tmp_path / "run"), "--gguf", str(gguf), "--type", "q8_0", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["architecture"] == "deci" and summary["type"] == "q8_0" and gguf.is_file()
    assert summary["padded_channels"] > 0 and summary["fallbacks"] == {}  # odd widths padded: all q8_0
    modelfile = (tmp_path / "run.q8_0.Modelfile").read_text()
    assert "FROM ./run.q8_0.gguf" in modelfile
    corpus = tmp_path / "code"
    corpus.mkdir()
    for i in range(40):
        text = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(40))
        (corpus / f"m{i}.py").write_text(text)
    r = _cli("eval", "--model", str(gguf), "--runtime", "llama.cpp", "--ppl", f"python:{corpus}",
             "--seq-len", "64", "--windows", "4", "--threads", "1", "--json", "--out", str(tmp_path / "ev"))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["runtime"] == "llama.cpp" and report["llama_cpp"]["architecture"] == "deci"
    assert report["llama_cpp"]["speed"]["decode_tok_s"] > 0
    (score,) = report["perplexity"].values()
    assert np.isfinite(score["ppl"]) and score["windows"] == 4
    assert "llama.cpp" in (tmp_path / "ev" / "report.md").read_text()
    r = _cli("eval", "--model", str(tmp_path / "run"), "--runtime", "llama.cpp")
    assert r.returncode == 2 and "runs a .gguf file" in r.stderr


def test_llama_cpp_perplexity_matches_transformers_on_the_same_windows(tmp_path):
    from codeprune.data.calibration import TokenWindows
    from codeprune.evaluation.perplexity import perplexity

    lm = _structured("qwen2", "adaptive", True)
    windows = TokenWindows(ids(4, 48, seed=3), source="random", split="heldout", n_documents=4)
    path = export_gguf(lm, tmp_path / "m.gguf", plan=plan_export(lm, "f32"), progress=False)
    with LlamaCpp(copy.copy(path), n_ctx=64, threads=1) as rt:
        got = rt.perplexity(windows)
    want = perplexity(lm, windows)
    assert got["tokens"] == want["tokens"] and got["ppl"] == pytest.approx(want["ppl"], rel=1e-4)


def test_prune_with_gguf_exports_beside_the_checkpoint(tmp_path):
    lm = make_tiny("llama")
    save_checkpoint(lm, tmp_path / "tiny")
    code = tmp_path / "code"
    code.mkdir()
    for i in range(6):
        (code / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 40)
    base = ["prune", "--model", str(tmp_path / "tiny"), "--method", "magnitude-sp", "--ratio", "0.3",
            "--structure", "uniform", "--calib", f"python:{code}", "--samples", "4", "--seq-len", "32",
            "--no-eval"]
    for extra, message in ((["--out", str(tmp_path / "bad"), "--gguf", "q3_k"], "unsupported GGUF type"),
                           (["--gguf", "f16"], "give --out too")):
        r = _cli(*base, *extra)
        assert r.returncode == 2 and message in r.stderr.strip().splitlines()[-1], r.stderr
    assert not (tmp_path / "bad").exists()
    r = _cli(*base, "--out", str(tmp_path / "runs" / "m"), "--gguf", "q8_0")
    assert r.returncode == 0, r.stderr
    assert "GGUF:" in r.stdout and (tmp_path / "runs" / "m" / "config.json").is_file()
    gguf_path = tmp_path / "runs" / "m.q8_0.gguf"
    assert (tmp_path / "runs" / "m.q8_0.Modelfile").is_file()
    with LlamaCpp(gguf_path, n_ctx=64, threads=1) as rt:
        assert rt.metadata()["general.architecture"] == "llama" and rt.metadata()["general.name"] == "m.q8_0"


def test_vocab_pruned_gguf_scored_per_original_token_in_llama_cpp(tmp_path):
    """--ppl-tokenizer ORIGINAL: windows cut by the original tokenizer grow when remapped (a removed
    token becomes several): the context is sized for the longest, and the figure is per original
    token, as the transformers path reports it."""
    from codeprune.api import evaluate
    from codeprune.errors import ConfigError

    original = make_tiny("llama")
    save_checkpoint(original, tmp_path / "orig")
    lm = _vocab("llama")
    path = export_gguf(lm, tmp_path / "v.gguf", plan=plan_export(lm, "f32"), progress=False)
    code = tmp_path / "code"
    code.mkdir()
    for i in range(30):
        (code / f"m{i}.py").write_text(f"print('zz qq {i}')\nclass K{i}:\n    y = 'unseen words here'\n" * 30)
    res = evaluate(str(path), ppl=[f"python:{code}"], runtime="llama.cpp", seq_len=64, windows=4,
                   ppl_tokenizer=str(tmp_path / "orig"), efficiency=False)
    (score,) = res["perplexity"].values()
    assert score["per"] == "original token" and score["model_tokens"] > score["tokens"]
    assert np.isfinite(score["ppl"])
    for kwargs, message in (({"offload": True}, "--offload"), ({"threads": 0}, "--threads")):
        with pytest.raises(ConfigError, match=message):
            evaluate(str(path), runtime="llama.cpp", **kwargs)
    with pytest.raises(ConfigError, match="--threads"):
        evaluate(str(tmp_path / "orig"), threads=2)
