"""Masks storage and Jaccard, the language sweep, compare and report (tiny models; smollm2 in slow)."""

import json
from pathlib import Path

import pytest
import torch

import codeprune
from codeprune.cli import main
from codeprune.data.sources import python_stdlib_dir
from codeprune.errors import ConfigError, CorruptModelError, OutputExistsError
from codeprune.reporting.analysis import compare_runs, report_runs
from codeprune.reporting.masks import jaccard, jaccard_distance, load_masks, save_masks
from codeprune.reporting.schema import PruneReport
from codeprune.reporting.writer import write_report
from codeprune.workflows.sweep import parse_languages

from ..conftest import make_tiny


def test_masks_round_trip_bit_packed(tmp_path):
    g = torch.Generator().manual_seed(0)
    masks = {"0.q_proj": torch.rand(7, 13, generator=g) < 0.5,
             "1.down_proj": torch.rand(3, 5, generator=g) < 0.3}
    save_masks(tmp_path / "m.safetensors", masks)
    back = load_masks(tmp_path / "m.safetensors")
    assert back.keys() == masks.keys()
    assert all(torch.equal(back[k], masks[k]) and back[k].dtype == torch.bool for k in masks)
    big = {"0.q_proj": torch.rand(256, 512, generator=g) < 0.5}
    save_masks(tmp_path / "big.safetensors", big)
    assert (tmp_path / "big.safetensors").stat().st_size < 256 * 512 / 8 + 1024  # 1 bit a weight


def test_corrupt_mask_file(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CorruptModelError):
        load_masks(tmp_path / "bad.safetensors")


def test_jaccard_on_hand_masks():
    a = torch.tensor([True, True, False, False])
    b = torch.tensor([True, False, True, False])
    assert jaccard_distance(a, a) == 0.0
    assert jaccard_distance(a, ~a) == 1.0  # disjoint
    assert jaccard_distance(a, b) == pytest.approx(1 - 1 / 3)
    # pooled figures sum intersections and unions before dividing
    A = {"0.q_proj": a.view(2, 2), "0.down_proj": torch.ones(2, 4, dtype=torch.bool),
         "1.q_proj": a.view(2, 2), "1.down_proj": torch.ones(2, 4, dtype=torch.bool)}
    B = {"0.q_proj": b.view(2, 2), "0.down_proj": torch.ones(2, 4, dtype=torch.bool),
         "1.q_proj": a.view(2, 2), "1.down_proj": torch.zeros(2, 4, dtype=torch.bool)}
    d = jaccard(A, B)
    assert d["per_sublayer"]["0"] == {"q_proj": pytest.approx(2 / 3), "down_proj": 0.0}
    assert d["per_sublayer"]["1"] == {"q_proj": 0.0, "down_proj": 1.0}
    assert d["per_type"]["q_proj"] == pytest.approx(1 - (1 + 2) / (3 + 2))
    assert d["per_type"]["down_proj"] == pytest.approx(1 - 8 / 16)
    assert list(d["per_type"]) == ["q_proj", "down_proj"]  # execution order
    assert d["per_layer"] == [pytest.approx(1 - 9 / 11), pytest.approx(1 - 2 / 10)]
    assert d["model"] == pytest.approx(1 - 11 / 21)
    with pytest.raises(ValueError, match="different modules"):
        jaccard(A, {"0.q_proj": a.view(2, 2)})


@pytest.fixture
def two_langs(tmp_path: Path) -> tuple[str, str]:
    """Two small corpora: Python files and C++-looking text files."""
    py = tmp_path / "py"
    py.mkdir()
    for p in sorted(python_stdlib_dir().glob("*.py"))[:30]:
        (py / p.name).write_text(p.read_text(encoding="utf-8"), encoding="utf-8")
    cpp = tmp_path / "cpp"
    cpp.mkdir()
    for i in range(30):
        body = "\n".join(f"  int v{j} = f{i}(x + {j}) * {j};" for j in range(40))
        (cpp / f"f{i}.cpp").write_text(f"#include <vector>\nnamespace n{i} {{\nint g(int x) {{\n{body}\n"
                                       f"  return v0;\n}}\n}}\n")
    return f"python=python:{py}", f"cpp=cpp:{cpp}"


def _prune_report(**fields) -> PruneReport:
    return PruneReport(**{"model": "m", "method": "wanda", "pruning": "unstructured", "params_total": 10,
                          "params_nonzero": 5, **fields})


def test_run_labels_and_default_out(tmp_path):
    from codeprune.reporting.analysis import default_out, read_runs

    for parent in ("a", "b"):
        (tmp_path / parent / "wanda50").mkdir(parents=True)
        write_report(tmp_path / parent / "wanda50", _prune_report())
    before = (tmp_path / "a" / "wanda50" / "report.json").read_text()
    runs, _ = read_runs([tmp_path / "a" / "wanda50", tmp_path / "b" / "wanda50"])
    assert [r.label for r in runs] == ["a/wanda50", "b/wanda50"]
    assert runs[0].report.method == "wanda"
    assert (tmp_path / "a" / "wanda50" / "report.json").read_text() == before  # reports are never rewritten
    assert default_out([tmp_path / "a" / "wanda50"], "report") == tmp_path / "a" / "report"
    with pytest.raises(ConfigError, match="--out"):
        default_out(["/usr", "/etc"], "report")


def test_parse_languages(two_langs):
    langs = parse_languages(",".join(two_langs))
    assert list(langs) == ["python", "cpp"] and langs["cpp"].startswith("cpp:")
    assert parse_languages("python") == {"python": "python-stdlib"}
    with pytest.raises(ConfigError, match="no cobol corpus"):
        parse_languages("cobol")
    with pytest.raises(ConfigError, match="twice"):
        parse_languages("python,python=python-stdlib")
    for bad in ("c/c++=cpp:/x", "compare=cpp:/x", "..=cpp:/x"):
        with pytest.raises(ConfigError, match="bad language name"):
            parse_languages(bad)
    with pytest.raises(ConfigError):
        parse_languages(" , ")


def test_sweep_compare_report_on_a_tiny_model(tiny_tokenizer, two_langs, tmp_path):
    lm = make_tiny("qwen2", tokenizer=tiny_tokenizer)
    dense = {k: v.clone() for k, v in lm.model.state_dict().items()}
    res = codeprune.sweep(lm, "wanda", sparsity=0.5, calib_langs=",".join(two_langs), samples=4,
                          seq_len=32, eval_windows=4, out=tmp_path / "langs")
    out = Path(res["out"])
    assert sorted(p.name for p in out.iterdir()) == ["compare", "cpp", "python", "sweep.json", "sweep.md"]
    assert json.loads((out / "sweep.json").read_text()) == {k: v for k, v in res.items()
                                                            if k not in ("out", "compare")}
    assert set(res["ppl_matrix"]) == {"python", "cpp"}
    assert all(set(row) == {"python", "cpp"} for row in res["ppl_matrix"].values())
    # the model is handed back dense
    assert all(torch.equal(v, dense[k]) for k, v in lm.model.state_dict().items())
    for lang in ("python", "cpp"):
        r = json.loads((out / lang / "report.json").read_text())
        assert r["calibration_language"] == lang and r["sparsity_actual"] == pytest.approx(0.5, abs=0.01)
        assert r["schema"] == "codeprune-report/2" and r["kind"] == "prune" and r["pruning"] == "unstructured"
        assert r["perplexity"]["python"]["ppl"] == res["ppl_matrix"][lang]["python"]
        assert r["efficiency"]["speed"]["batch_1"]["decode_tok_s"] > 0
        masks = load_masks(out / lang / "masks.safetensors")
        assert len(masks) == 2 * 7
        assert sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values()) \
            == pytest.approx(r["sparsity_actual"])
    cmp = json.loads((out / "compare" / "compare.json").read_text())
    assert cmp["ppl"]["rows"] == ["python", "cpp"] and cmp["ppl"]["cols"] == ["python", "cpp"]
    assert cmp["ppl"]["dense"] == res["ppl_dense"]
    jac = cmp["jaccard"]
    assert jac["model"][0][0] == 0.0 and 0.0 < jac["model"][0][1] < 1.0
    assert len(jac["per_layer_mean"]) == 2 and list(jac["per_type_mean"])[0] == "q_proj"
    for png in ("ppl_matrix.png", "jaccard_model.png", "jaccard_layers.png"):
        assert (out / "compare" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "best on that language" in (out / "compare" / "compare.md").read_text()

    # compare again from the CLI, into its default folder beside the runs (ours: replaced)
    assert main(["compare", str(out / "python"), str(out / "cpp"), str(out / "sweep.json")]) == 0
    again = json.loads((out / "compare" / "compare.json").read_text())
    assert again["jaccard"]["model"] == jac["model"]
    # the sweep folder itself stands for its members
    whole = compare_runs([out], out=tmp_path / "cmp2")
    assert [r["label"] for r in whole["runs"]] == ["python", "cpp"]

    # report: every run in one table, with plots
    rep = report_runs([out / "python", out / "cpp", out / "compare"], out=tmp_path / "report")
    assert [r["run"] for r in rep["runs"]] == ["python", "cpp"]
    assert any("compare" in s for s in rep["skipped"])
    row = rep["runs"][0]
    assert row["compression"] == pytest.approx(1 - row["params_nonzero"] / row["params_dense"])
    assert row["ppl"] == res["ppl_matrix"]["python"]["python"]
    assert (tmp_path / "report" / "ppl_vs_compression.png").is_file()
    assert (tmp_path / "report" / "speed_vs_compression.png").is_file()
    assert "| python |" in (tmp_path / "report" / "report.md").read_text()


def test_sweep_refuses_bad_input(tiny_tokenizer, two_langs, tmp_path):
    lm = make_tiny("llama", tokenizer=tiny_tokenizer)
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError):
        codeprune.sweep(lm, calib_langs=",".join(two_langs), out=tmp_path / "exists")
    with pytest.raises(ConfigError, match="calibration"):
        codeprune.sweep(lm, "magnitude", calib_langs=",".join(two_langs), out=tmp_path / "m")
    with pytest.raises(codeprune.CorpusError):
        codeprune.sweep(lm, calib_langs="go=go:/nonexistent/folder", out=tmp_path / "g")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpp", "exists", "py"]


def test_compare_and_report_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match="no run folders"):
        compare_runs([tmp_path])
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text("{broken")
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not valid JSON" in err[0]
    (run / "report.json").write_text(json.dumps({"method": "wanda", "params_total": 10, "params_nonzero": 5}))
    assert main(["report", str(run)]) == 2  # a report without a schema version: refused, one line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no 'schema' field" in err[0]
    write_report(run, _prune_report(params_dense=10))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError):
        report_runs([run], out=foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    rep = report_runs([run], out=tmp_path / "rep")
    assert rep["runs"][0]["compression"] == 0.5 and rep["figures"] == []


@pytest.fixture
def real_cpp(tmp_path: Path) -> str:
    """libstdc++'s bits/ headers (real C++), when the machine has them."""
    heads = sorted(Path("/usr/include/c++").glob("[0-9]*/bits/*.h"))
    if not heads:
        pytest.skip("no libstdc++ headers under /usr/include/c++")
    dest = tmp_path / "realcpp"
    dest.mkdir()
    for h in heads:
        (dest / h.name).write_bytes(h.read_bytes())
    return f"cpp=cpp:{dest}"


@pytest.mark.slow
def test_language_sweep_on_smollm2(smollm2, real_cpp, tmp_path, capsys):
    """Two small corpora: the ppl matrix, the plots, and a report listing every run."""
    py, cpp = "python=python-stdlib", real_cpp
    res = codeprune.sweep(smollm2, "wanda", sparsity=0.5, calib_langs=f"{py},{cpp}", samples=16,
                          seq_len=128, eval_windows=8, efficiency=False, out=tmp_path / "langs")
    m = res["ppl_matrix"]
    assert set(m) == {"python", "cpp"}
    # own-language calibration helps: clearly on C++ (a small effect on Python for this model,
    # within the noise of 16 windows), and over both languages together
    assert m["cpp"]["cpp"] < 0.95 * m["python"]["cpp"]
    assert (m["python"]["python"] / m["cpp"]["python"]) * (m["cpp"]["cpp"] / m["python"]["cpp"]) < 1
    out = Path(res["out"])
    for png in ("ppl_matrix.png", "jaccard_model.png", "jaccard_layers.png"):
        assert (out / "compare" / png).is_file()
    assert main(["report", str(out / "python"), str(out / "cpp"), "--out", str(tmp_path / "rep")]) == 0
    text = capsys.readouterr().out
    assert "| python |" in text and "| cpp |" in text


def test_packed_and_boolean_masks_give_the_same_distances(tmp_path):
    g = torch.Generator().manual_seed(3)
    a = {f"{i}.{s}": torch.rand(5, 11, generator=g) < 0.5 for i in range(2) for s in ("q_proj", "up_proj")}
    b = {k: torch.rand(5, 11, generator=g) < 0.4 for k in a}
    save_masks(tmp_path / "a.safetensors", a)
    pa = load_masks(tmp_path / "a.safetensors", packed=True)
    assert jaccard(pa, b) == jaccard(a, b)
