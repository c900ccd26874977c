"""Recipes (recipe.py): parsing, the target split across stages, per-stage records, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import codeprune
from codeprune.cli import main
from codeprune.errors import ConfigError
from codeprune.recipes.spec import builtin_recipes, load_recipe, parse_recipe
from codeprune.reporting.provenance import display_name

from ..conftest import make_tiny

DEEP = dict(num_hidden_layers=6, intermediate_size=128)


@pytest.fixture
def code_dir(stdlib_dir: Path) -> Path:
    return stdlib_dir


def recipe(*stages, target=None):
    return parse_recipe({"name": "t", "target": target, "stages": list(stages)})


def run(lm, code_dir, rec, target=None, **kw):
    kw = {"samples": 4, "seq_len": 32, "eval_windows": 2, "efficiency": False, **kw}
    return codeprune.prune(lm, recipe=rec, target=target, calib=f"python:{code_dir}", **kw)


def test_builtin_recipes_parse():
    assert {"flab", "shortgpt"} <= set(builtin_recipes())
    flab = load_recipe("flab")
    assert [s.kind for s in flab.stages] == ["vocab", "layers", "ffn"]
    assert flab.target == 0.22 and flab.source == "built-in"
    assert flab.stages[2].method == "wanda-sp"


@pytest.mark.parametrize("stages, match", [
    ([{"stage": "nope"}], "unknown stage"),
    ([{"stage": "layers", "share": 1, "bogus": 2}], "unknown option"),
    ([{"stage": "layers", "n": 1, "share": 1}], "exactly one"),
    ([{"stage": "layers", "share": -1}], "share"),
    ([{"stage": "layers", "metric": "cos", "n": 1}], "metric"),
    ([{"stage": "ffn", "share": 1, "method": "wanda"}], "unstructured"),
    ([{"stage": "ffn", "share": 1, "structure": "diagonal"}], "structure"),
    ([{"stage": "flap"}], "exactly one"),
    ([{"stage": "wanda", "sparsity": 1.5}], "sparsity"),
    ([{"stage": "vocab", "min_count": 0}], "min_count"),
    ([{"stage": "vocab"}, {"stage": "vocab"}], "one vocab"),
    ([], "non-empty"),
])
def test_bad_recipes_are_refused(stages, match):
    with pytest.raises(ConfigError, match=match):
        parse_recipe({"stages": stages})


def test_bad_files_and_targets(tmp_path, code_dir):
    with pytest.raises(ConfigError, match="neither a built-in"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [unclosed\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_recipe(bad)
    lm = make_tiny("llama", **DEEP)
    with pytest.raises(ConfigError, match="give --target"):
        run(lm, code_dir, recipe({"stage": "layers", "share": 1}))
    with pytest.raises(ConfigError, match="cannot be split"):
        run(lm, code_dir, recipe({"stage": "layers", "n": 1}), target=0.2)
    with pytest.raises(ConfigError, match="target"):
        run(lm, code_dir, recipe({"stage": "layers", "share": 1}), target=1.2)
    with pytest.raises(ConfigError, match="own methods"):
        codeprune.prune(lm, "wanda", recipe="flab")


def test_target_split_across_layers_and_ffn(code_dir, tmp_path):
    lm = make_tiny("llama", **DEEP)
    dense = sum(p.numel() for p in lm.model.parameters())
    per_layer = sum(p.numel() for p in lm.model.model.layers[0].parameters())
    rec = recipe({"stage": "layers", "metric": "bi", "share": 1}, {"stage": "ffn", "share": 1})
    res = run(lm, code_dir, rec, target=0.4, out=tmp_path / "run")
    r = res.report
    assert r["pruning"] == "recipe" and r["method"] == "recipe:t"
    assert abs(r["ratio_actual_total"] - 0.4) < 0.01
    layers, ffn = r["stages"]
    # the layers stage gets half the goal, in whole layers; ffn takes what is left
    goal = round(0.4 * dense)
    assert layers["budget_params"] == round(goal / 2)
    assert layers["layers_before"] - layers["layers_after"] == len(layers["removed_layers"])
    assert ffn["budget_params"] == goal - layers["removed_params"]
    assert layers["removed_params"] + ffn["removed_params"] == dense - r["params_total"]
    assert layers["removed_params"] % per_layer == 0
    assert len(set(r["ffn_per_layer"])) == 1 and r["ffn_per_layer"][0] < 128
    assert r["num_layers"] == 6 - len(layers["removed_layers"])
    assert r["export"] == "plain" and all(st["ppl"] > 1 for st in r["stages"])
    plain = AutoModelForCausalLM.from_pretrained(res.out)
    assert plain.config.num_hidden_layers == r["num_layers"]
    assert plain.config.intermediate_size == r["ffn_per_layer"][0]
    x = torch.randint(0, plain.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=x).logits, res.model.model(input_ids=x).logits)
    md = (res.out / "report.md").read_text()
    assert "## Stages" in md and "layers 6 ->" in md


def test_vocab_stage_then_layers_with_remapped_windows(code_dir, tmp_path):
    lm = make_tiny("llama", **DEEP)
    old_tok = lm.tokenizer
    lm.model.save_pretrained(tmp_path / "orig")
    old_tok.save_pretrained(tmp_path / "orig")
    rec = recipe({"stage": "vocab", "min_count": 2, "max_files": 3}, {"stage": "layers", "n": 1})
    res = run(lm, code_dir, rec, out=tmp_path / "v", min_count=200)  # the CLI's --min-count
    r = res.report
    vocab, layers = r["stages"]
    assert vocab["vocab_after"] < vocab["vocab_before"] == len(old_tok)
    assert vocab["files"] == 3 and not vocab["capped"] and vocab["options"]["min_count"] == 200
    assert vocab["removed_params"] == (vocab["vocab_before"] - vocab["vocab_after"]) * 64 * 2  # untied
    assert r["vocab_size"] == vocab["vocab_after"] == res.model.model.config.vocab_size
    assert layers["removed_layers"] and r["num_layers"] == 5
    assert "per original token" in r["ppl_protocol"]
    # text still round-trips through the saved tokenizer; the plain reload matches
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(res.out)
    text = "def émoji():  # 🚀\n    return None\n"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    plain = AutoModelForCausalLM.from_pretrained(res.out)
    assert plain.get_input_embeddings().num_embeddings == vocab["vocab_after"]
    # eval with the original's tokenizer reproduces the recipe's comparable perplexity
    calib = f"python:{code_dir}"
    scores = codeprune.evaluate(str(res.out), ppl=[calib], seq_len=32, windows=2, efficiency=False,
                                ppl_tokenizer=str(tmp_path / "orig"))["perplexity"][display_name(calib)]
    assert scores["ppl"] == pytest.approx(r["ppl_pruned"], rel=1e-4)
    assert scores["model_tokens"] > scores["tokens"] and "per its tokens" in scores["protocol"]
    with pytest.raises(ConfigError, match="not a pruned version"):
        codeprune.evaluate(str(tmp_path / "orig"), ppl=[calib], seq_len=32, windows=2, efficiency=False,
                           ppl_tokenizer=str(res.out))


def test_vocab_share_caps_the_vocab_stage(code_dir):
    lm = make_tiny("llama", tie_word_embeddings=True, **DEEP)
    rec = recipe({"stage": "vocab", "min_count": 10_000, "share": 0.05}, {"stage": "ffn", "share": 1})
    r = run(lm, code_dir, rec, target=0.1, eval_ppl=False).report
    vocab = r["stages"][0]
    assert vocab["capped"] and vocab["removed_params"] <= vocab["budget_params"]
    assert vocab["budget_params"] - vocab["removed_params"] < 64  # one tied row of 64
    assert abs(r["ratio_actual_total"] - 0.1) < 0.01


def test_unstructured_stage_reports_sparsity_and_is_not_counted(code_dir):
    lm = make_tiny("llama", **DEEP)
    rec = recipe({"stage": "ffn", "share": 1}, {"stage": "wanda", "sparsity": 0.5})
    r = run(lm, code_dir, rec, target=0.15, eval_ppl=False).report
    ffn, wanda = r["stages"]
    assert wanda["removed_params"] == 0 and wanda["sparsity_actual"] == pytest.approx(0.5, abs=0.01)
    assert r["params_nonzero"] < r["params_total"]
    assert abs(r["ratio_actual_total"] - 0.15) < 0.01


def test_heads_stage(code_dir):
    lm = make_tiny("llama", num_attention_heads=8, num_key_value_heads=2, **DEEP)
    r = run(lm, code_dir, recipe({"stage": "heads", "ratio": 0.1}), eval_ppl=False).report
    assert r["ffn_per_layer"] == [128] * 6 and sum(r["heads_per_layer"]) < 48


def test_cli_recipe_file_and_errors(code_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("codeprune.workflows.common.load_model",
                        lambda model, dtype="float32": make_tiny("llama", **DEEP))
    path = tmp_path / "my.yaml"
    path.write_text("name: mine\nstages:\n  - stage: layers\n    metric: bi-last\n    share: 1\n"
                    "  - stage: ffn\n    share: 1\n")
    out = tmp_path / "cli"
    rc = main(["prune", "--model", "tiny", "--recipe", str(path), "--target", "0.3", "--calib",
               f"python:{code_dir}", "--samples", "4", "--seq-len", "32", "--eval-windows", "2",
               "--out", str(out), "--json"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    assert r["recipe"]["name"] == "mine" and abs(r["ratio_actual_total"] - 0.3) < 0.01
    assert (out / "report.md").is_file()
    path.write_text("stages:\n  - stage: layers\n    share: 1\n    wat: 3\n")
    rc = main(["prune", "--model", "tiny", "--recipe", str(path), "--target", "0.3", "--out",
               str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "unknown option" in err[0]
    assert not (tmp_path / "x").exists()
    rc = main(["prune", "--model", "tiny", "--recipe", "flab", "--ratio", "0.2"])
    assert rc == 2
    rc = main(["prune", "--model", "tiny", "--method", "wanda", "--min-count", "3"])
    assert rc == 2 and "vocab stage" in capsys.readouterr().err
    rc = main(["prune", "--model", "tiny", "--recipe", "shortgpt", "--min-count", "3"])
    assert rc == 2 and "no vocab stage" in capsys.readouterr().err
    rc = main(["prune", "--model", "tiny", "--recipe", "flab", "--min-count", "0"])
    assert rc == 2 and "min_count" in capsys.readouterr().err


@pytest.mark.slow
def test_flab_target_022_on_smollm2(smollm2, code_dir, tmp_path):
    import copy

    lm = copy.deepcopy(smollm2)
    res = codeprune.prune(lm, recipe="flab", target=0.22, calib=f"python:{code_dir}", samples=4, seq_len=64,
                          eval_windows=2, efficiency=False, out=tmp_path / "flab", save_dtype="float32")
    r = res.report
    assert 0.21 <= r["ratio_actual_total"] <= 0.23
    assert [s["stage"] for s in r["stages"]] == ["vocab", "layers", "ffn"]
    assert all(s["removed_params"] > 0 for s in r["stages"])
    assert r["export"] == "plain" and r["ppl_pruned"] < 10 * r["ppl_dense"]
    plain = AutoModelForCausalLM.from_pretrained(res.out)
    assert sum(p.numel() for p in plain.parameters()) == r["params_total"]
    x = torch.randint(0, r["vocab_size"], (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=x).logits, res.model.model(input_ids=x).logits)
        out = plain.generate(x, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 20)
