"""The report schema, the writer, provenance and the number formatter (reporting/)."""

import json
import re
from pathlib import Path

import pytest

import codeprune
from codeprune.errors import CorruptModelError
from codeprune.reporting import provenance as prov
from codeprune.reporting.formatting import fmt
from codeprune.reporting.markdown import render
from codeprune.reporting.provenance import display_name, sanitise_source
from codeprune.reporting.schema import (
    REPORTS,
    SCHEMA,
    EvalReport,
    LoraSettings,
    PruneReport,
    RecoverData,
    RecoverReport,
    SweepReport,
    TrainingSettings,
    report_from_dict,
)
from codeprune.reporting.writer import read_report, write_report

from ..conftest import make_tiny


def _reports() -> list:
    prune = PruneReport(model="m", method="wanda", pruning="unstructured", params_total=10, params_nonzero=5,
                        pattern="2:4", sparsity_target=0.5, sparsity_actual=0.5,
                        per_layer={"l.0.q_proj": 0.5})
    ev = EvalReport(model=None)
    rec = RecoverReport(
        model="runs/x", data=RecoverData(spec="d.jsonl", examples=4, train=3, eval=1,
                                         dropped_no_answer_within_seq_len=0, chat_template=False),
        lora=LoraSettings(r=8, alpha=16, dropout=0.05, targets=["q_proj"], trainable_params=100),
        training=TrainingSettings(epochs=1, max_steps=2, lr=1e-4, batch_size=1, grad_accum=1, seq_len=64,
                                  processes=1, resumed_from=None),
        steps=2, samples_seen=2, seconds=1.0, train_loss=2.0, loss_curve={"train": [[1, 2.0]], "eval": []},
        eval_loss_before=None, eval_loss_after=None, ppl_before=None, ppl_after=None, ppl_protocol=None,
        sparsity_before=0.0, sparsity_after=0.0, masks_kept=0, params_total=10, export="plain", device="cpu")
    sweep = SweepReport(model="m", method="wanda", pattern="unstructured", sparsity=0.5,
                        calib_languages={"python": "python-stdlib"},
                        eval_languages={"python": "python-stdlib"},
                        samples=4, seq_len=32, seed=0, eval_windows=4, ppl_dense={"python": 9.0},
                        ppl_matrix={"python": {"python": 10.0}}, members=["python"])
    return [prune, ev, rec, sweep]


@pytest.mark.parametrize("report", _reports(), ids=lambda r: r.kind)
def test_every_kind_round_trips_and_renders(report, tmp_path):
    d = report.to_dict()
    assert list(d)[:6] == ["schema", "kind", "model", "source", "provenance", "notes"]
    assert d["schema"] == SCHEMA and d["kind"] == report.kind and set(d["provenance"]) == {
        "codeprune", "torch", "transformers", "python", "command", "created"}
    assert report_from_dict(json.loads(json.dumps(d))) == report
    path = write_report(tmp_path, report)
    assert path.name == ("sweep.json" if report.kind == "sweep" else "report.json")
    assert read_report(tmp_path) == report
    md = path.with_suffix(".md").read_text()
    assert md.startswith("# codeprune ") and md == render(report) == render(d)
    assert set(REPORTS) == {"prune", "eval", "recover", "sweep"}


def test_optional_fields_are_left_out_but_core_ones_stay():
    d = _reports()[0].to_dict()
    assert "structure" not in d and "heads_per_layer" not in d and "stages" not in d
    assert d["ppl_dense"] is None and d["ppl_protocol"] is None and d["calibration"] is None


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("schema"), "no 'schema' field"),
    (lambda d: d.update(schema="codeprune-report/1"), "this codeprune reads codeprune-report/2"),
    (lambda d: d.update(kind="distill"), "kind 'distill'"),
    (lambda d: d.update(sparsity="x", bogus=1), r"unknown field\(s\) bogus"),
    (lambda d: d.pop("method"), "missing field 'method'"),
    (lambda d: d["provenance"].pop("codeprune"), r"report\.provenance: missing field 'codeprune'"),
])
def test_unreadable_reports_get_a_clear_error(change, message):
    d = _reports()[0].to_dict()
    change(d)
    with pytest.raises(CorruptModelError, match=message):
        report_from_dict(d)


def test_provenance_has_versions_and_the_command(monkeypatch):
    import importlib.metadata as md

    monkeypatch.setattr(prov, "_command", None)
    p = prov.provenance()
    assert p["codeprune"] == codeprune.__version__ and p["torch"] == md.version("torch")
    assert p["transformers"] == md.version("transformers") and p["command"] is None
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", p["created"])
    prov.set_command(["prune", "--model", "my model", "--sparsity", "0.5"])
    assert prov.provenance()["command"] == "codeprune prune --model 'my model' --sparsity 0.5"


def test_sources_carry_no_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "w50").mkdir(parents=True)
    cache = tmp_path.parent / "cache" / "models" / "smollm2-135m"
    alias = {"kind": "alias", "alias": "smollm2-135m", "upstream": "HuggingFaceTB/SmolLM2-135M",
             "sha256": "ab", "note": "dequantized", "base_model": "HuggingFaceTB/SmolLM2-135M",
             "dtype": "bfloat16", "path": str(cache)}
    kept = {k: v for k, v in alias.items() if k not in ("path", "alias")}
    assert sanitise_source(alias, "smollm2-135m") == kept | {"name": "smollm2-135m"}
    gguf = {"kind": "gguf", "gguf": "/data/models/q.gguf", "upstream": "q", "path": str(cache)}
    assert sanitise_source(gguf, "/data/models/q.gguf") == {"kind": "gguf", "name": "q.gguf", "upstream": "q"}
    inside = {"kind": "folder", "path": str(tmp_path / "runs" / "w50")}
    assert sanitise_source(inside, str(tmp_path / "runs" / "w50"))["name"] == "runs/w50"
    assert sanitise_source(inside, "runs/w50")["name"] == "runs/w50"
    assert sanitise_source({"kind": "folder", "path": "/elsewhere/w50"}, "/elsewhere/w50")["name"] == "w50"
    assert sanitise_source({"kind": "hub", "path": "org/m"}, "org/m") == {"kind": "hub", "name": "org/m"}
    assert display_name("python:/srv/src/jdk") == "python:jdk"
    assert display_name("python-stdlib") == "python-stdlib"


def test_one_number_formatter():
    assert [fmt(None), fmt(True), fmt(False), fmt(1234567), fmt(0.123456), fmt(0.5, ".3f"), fmt("x")] == [
        "", "yes", "no", "1,234,567", "0.1235", "0.500", "x"]


def _strings(value, where="report"):
    """(where, string) for every string value and key of a parsed JSON document."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield where, k
            yield from _strings(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, f"{where}[{i}]")
    elif isinstance(value, str):
        yield where, value


def _absolute(path: Path) -> list[tuple[str, str]]:
    return [(w, s) for w, s in _strings(json.loads(path.read_text())) if s.startswith("/") or ":/" in s]


def _folder_model(tmp_path: Path, tiny_tokenizer) -> str:
    """A tiny checkpoint outside the working folder, named by its absolute path."""
    lm = make_tiny("llama", tokenizer=tiny_tokenizer)
    folder = tmp_path / "models" / "tiny"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return str(folder)


def test_prune_eval_and_sweep_reports_hold_no_absolute_paths(tiny_tokenizer, stdlib_dir, tmp_path):
    model = _folder_model(tmp_path, tiny_tokenizer)
    calib = f"python:{stdlib_dir}"
    res = codeprune.prune(model, "wanda", sparsity=0.5, calib=calib, samples=2, seq_len=16, eval_windows=2,
                          efficiency=False, out=tmp_path / "run")
    assert res.report["model"] == "tiny"
    assert res.report["source"] == {"kind": "folder", "name": "tiny", "dtype": "float32",
                                    "model_type": "llama"}
    assert _absolute(res.out / "report.json") == []
    assert read_report(res.out).to_dict() == res.report

    ev = codeprune.evaluate(str(res.out), ppl=[calib], seq_len=16, windows=2, out=tmp_path / "ev")
    assert ev["kind"] == "eval" and ev["efficiency"]["disk_bytes"] > 0
    assert _absolute(tmp_path / "ev" / "report.json") == []

    sw = codeprune.sweep(model, "wanda", sparsity=0.5, calib_langs=f"python={calib},again={calib}",
                         samples=2, seq_len=16, eval_windows=2, save_models=True, compare=False,
                         out=tmp_path / "langs")
    out = Path(sw["out"])
    for f in (out / "sweep.json", out / "python" / "report.json", out / "again" / "report.json"):
        assert _absolute(f) == [], f
    member = json.loads((out / "python" / "report.json").read_text())
    weights = (out / "python" / "model.safetensors").stat().st_size
    assert member["efficiency"]["disk_bytes"] > weights  # the checkpoint's files, through save_checkpoint
    assert (out / "python" / "masks.safetensors").is_file() and (out / "python" / "config.json").is_file()
    assert codeprune.load(str(out / "python")).model.config.model_type == "llama"


def test_sanitised_sources_hold_only_the_schema_fields():
    from dataclasses import fields

    from codeprune.reporting.provenance import SOURCE_FIELDS, sanitise_source
    from codeprune.reporting.schema import Source

    assert SOURCE_FIELDS == {f.name for f in fields(Source)}
    src = sanitise_source({"kind": "folder", "path": "/x/y", "something_new": 1, "note": "n"}, "/x/y")
    assert Source.from_dict(src).note == "n" and "something_new" not in src


def test_the_recorded_command_has_no_local_path(monkeypatch):
    from codeprune.reporting import provenance

    monkeypatch.setattr(provenance, "_command", None)  # restored afterwards
    provenance.set_command(["prune", "--calib", "python:/home/u/src", "--out", "/tmp/x/run"])
    command = provenance.provenance()["command"]
    assert "/home/u" not in command and "/tmp/x" not in command and "--calib python:" in command
