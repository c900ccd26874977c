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
