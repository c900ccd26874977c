"""The Python API end to end on a tiny model: prune -> report -> checkpoint -> evaluate."""

import json
from pathlib import Path

import pytest

import codeprune
from codeprune.reporting.provenance import display_name

from ..conftest import make_tiny


@pytest.fixture
def code_dir(stdlib_dir: Path) -> Path:
    return stdlib_dir


@pytest.mark.parametrize("method,pattern", [("wanda", "unstructured"), ("sparsegpt", "2:4"),
                                            ("magnitude", "4:8")])
def test_prune_report_checkpoint_evaluate(tiny_tokenizer, code_dir, tmp_path, method, pattern):
    # llama, not qwen2: AutoTokenizer reloads a qwen2 checkpoint's tokenizer as Qwen2Tokenizer,
    # whose pre-tokenizer is not the tiny test BPE's, so the reloaded windows would differ
    lm = make_tiny("llama", tokenizer=tiny_tokenizer)
    calib = f"python:{code_dir}"
    res = codeprune.prune(lm, method, sparsity=0.5, pattern=pattern, calib=calib, samples=4,
                          seq_len=32, eval_windows=4, out=tmp_path / "run")
    r = res.report
    assert r["method"] == method and r["pattern"] == pattern
    assert r["sparsity_actual"] == pytest.approx(0.5, abs=0.01)
    assert r["params_nonzero"] < r["params_total"]
    assert r["ppl_dense"] > 1 and r["ppl_pruned"] > 1
    assert "32 tokens" in r["ppl_protocol"]
    assert (r["calibration"] is None) == (method == "magnitude")
    assert len(r["per_layer"]) == 14 and all(k.startswith("model.layers.") for k in r["per_layer"])
    assert json.loads((res.out / "report.json").read_text()) == json.loads(json.dumps(r))

    scores = codeprune.evaluate(str(res.out), ppl=[calib], seq_len=32, windows=4)
    assert scores["perplexity"][display_name(calib)]["ppl"] == pytest.approx(r["ppl_pruned"], rel=1e-5)
    assert scores["sparsity"] == pytest.approx(r["sparsity_actual"])


def test_prune_without_output_or_eval(tiny_tokenizer, code_dir):
    lm = make_tiny("llama", tokenizer=tiny_tokenizer)
    res = codeprune.prune(lm, "wanda", calib=f"python:{code_dir}", samples=2, seq_len=16,
                          eval_ppl=False)
    assert res.out is None and res.report["ppl_dense"] is None and res.report["ppl_protocol"] is None


def test_seq_len_beyond_the_model_is_refused(tiny_tokenizer, code_dir):
    lm = make_tiny("llama", tokenizer=tiny_tokenizer)  # max_position_embeddings 256
    with pytest.raises(codeprune.ConfigError, match="max_position_embeddings"):
        codeprune.prune(lm, "wanda", calib=f"python:{code_dir}", samples=2, seq_len=512)


def test_evaluate_with_efficiency(tiny_tokenizer, code_dir, tmp_path, capsys):
    from codeprune.cli import main

    lm = make_tiny("llama", tokenizer=tiny_tokenizer)
    res = codeprune.prune(lm, "magnitude", calib=f"python:{code_dir}", samples=2, seq_len=16,
                          eval_ppl=False, out=tmp_path / "run")
    assert main(["eval", "--model", str(res.out), "--ppl", f"python:{code_dir}", "--seq-len", "16",
                 "--windows", "2"]) == 0
    out = capsys.readouterr().out
    assert "prefill" in out and "decode" in out and "MACs/token" in out
    scores = codeprune.evaluate(str(res.out), ppl=[f"python:{code_dir}"], seq_len=16, windows=2,
                                efficiency=True)
    eff = scores["efficiency"]
    assert eff["disk_bytes"] > 0 and eff["params_nonzero"] < eff["params_total"]
    assert eff["macs_per_token_nonzero"] < eff["macs_per_token"]
