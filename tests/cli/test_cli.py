"""The CLI contract: an input error is one line on stderr, exit code 2, and nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from codeprune.cli import main
from codeprune.models import offline as sources
from codeprune.models.offline import OfflineModel

ALIASES = ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
SENTINEL = "sentinel.txt"
SENTINEL_TEXT = "written before the run\n"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep the model cache of these tests out of the user's ~/.cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("CODEPRUNE_CACHE", str(cache))
    return cache


@pytest.fixture
def code_dir(tmp_path: Path) -> Path:
    """A small, valid calibration folder (so that no test reads the whole stdlib)."""
    root = tmp_path / "code"
    root.mkdir()
    for i in range(4):
        (root / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 20)
    return root


@dataclass
class Out:
    path: Path
    existing: bool

    @property
    def args(self) -> list[str]:
        # an existing folder needs --overwrite, or the output check would fail first
        return ["--out", str(self.path), *(["--overwrite"] if self.existing else [])]

    def assert_untouched(self) -> None:
        parent = self.path.parent
        if self.existing:
            assert sorted(p.name for p in self.path.iterdir()) == [SENTINEL]
            assert (self.path / SENTINEL).read_text() == SENTINEL_TEXT
            assert sorted(p.name for p in parent.iterdir()) == [self.path.name]
        else:
            assert not self.path.exists()
            leftovers = [p.name for p in parent.iterdir()]
            assert leftovers == [], leftovers  # no .NAME.tmp-* / .NAME.old-* either


@pytest.fixture(params=["existing", "absent"])
def out(request, tmp_path: Path) -> Out:
    parent = tmp_path / "runs"
    parent.mkdir()
    path = parent / "result"
    if request.param == "existing":
        path.mkdir()
        (path / SENTINEL).write_text(SENTINEL_TEXT)
    return Out(path, request.param == "existing")


@pytest.fixture
def forbid_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """For errors that must be reported before any model is loaded (it takes seconds to minutes)."""

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was validated")

    monkeypatch.setattr("codeprune.workflows.common.load_model", no_loading)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str) -> str:
    """Exit code 2 and exactly one non-empty line on stderr, no traceback; returns the line."""
    assert code == 2
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert err == lines[0] + "\n"
    assert lines[0].startswith("codeprune: error: ")
    assert lines[0].strip() != "codeprune: error:"
    return lines[0]


def prune_argv(model: str, calib: Path | str, *extra: str) -> list[str]:
    calib = calib if isinstance(calib, str) else f"python:{calib}"
    return ["prune", "--model", model, "--method", "magnitude", "--no-eval", "--calib", calib,
            *extra]


# -- bad options ----------------------------------------------------------------------


@pytest.mark.usefixtures("forbid_loading")
@pytest.mark.parametrize(
    "option, expected",
    [
        (["--sparsity", "1.5"], "sparsity"),
        (["--sparsity", "-0.1"], "sparsity"),
        (["--sparsity", "1.0"], "sparsity"),
        (["--pattern", "4:2"], "4:2"),
        (["--pattern", "2:x"], "2:x"),
        (["--pattern", "0:4"], "0:4"),
        (["--pattern", "2:2"], "2:2"),
    ],
)
def test_bad_options(option, expected, out: Out, code_dir: Path, capsys):
    argv = prune_argv("smollm2-135m", code_dir, *option, *out.args)
    code, stdout, err = run_cli(argv, capsys)
    line = assert_one_line_error(code, err)
    assert expected in line
    assert stdout == ""
    out.assert_untouched()


# -- bad models ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model, expected",
    [
        ("no-such-model-xyz", "no-such-model-xyz"),
        ("./nope/model", "not found: ./nope/model"),
        ("nope/missing.Q4_0.gguf", "GGUF file not found: nope/missing.Q4_0.gguf"),
    ],
)
def test_model_not_found(model, expected, out: Out, code_dir: Path, capsys, monkeypatch):
    monkeypatch.chdir(code_dir.parent)
    code, stdout, err = run_cli(prune_argv(model, code_dir, *out.args), capsys)
    line = assert_one_line_error(code, err)
    assert expected in line
    assert stdout == ""
    out.assert_untouched()


FAKE = OfflineModel(
    alias="fake-coder-1m",
    upstream="example/Fake-Coder-1M",
    quantization="Q4_0",
    version="9.9.9",
    parts=(("codeprune-no-such-dist-xyz", "codeprune_no_such_dist_xyz/model.gguf"),),
    size=1234,
    sha256="0" * 64,
    summary="not a real model",
    license="apache-2.0",
)


def test_offline_alias_not_installed(out: Out, code_dir: Path, capsys, monkeypatch):
    monkeypatch.setitem(sources.OFFLINE_MODELS, FAKE.alias, FAKE)
    code, stdout, err = run_cli(prune_argv(FAKE.alias, code_dir, *out.args), capsys)
    line = assert_one_line_error(code, err)
    assert "fake-coder-1m" in line
    assert "pip install --no-deps codeprune-no-such-dist-xyz==9.9.9" in line
    out.assert_untouched()


def test_unsupported_architecture(out: Out, code_dir: Path, tmp_path: Path, capsys):
    from transformers import GPT2Config

    model_dir = tmp_path / "gpt2-tiny"
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100).save_pretrained(model_dir)
    code, stdout, err = run_cli(prune_argv(str(model_dir), code_dir, *out.args), capsys)
    line = assert_one_line_error(code, err)
    assert "gpt2" in line
    assert "llama" in line and "qwen2" in line
    out.assert_untouched()


# -- bad corpora ---------------------------------------------------------------------------


@pytest.mark.usefixtures("forbid_loading")
def test_missing_corpus(out: Out, capsys):
    code, _, err = run_cli(prune_argv("smollm2-135m", "python:/does/not/exist", *out.args),
                           capsys)
    line = assert_one_line_error(code, err)
    assert "/does/not/exist" in line
    out.assert_untouched()


@pytest.mark.usefixtures("forbid_loading")
def test_empty_corpus(out: Out, tmp_path: Path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("no python here\n")
    code, _, err = run_cli(prune_argv("smollm2-135m", empty, *out.args), capsys)
    line = assert_one_line_error(code, err)
    assert str(empty) in line
    out.assert_untouched()


# -- the output folder ---------------------------------------------------------------------


@pytest.mark.usefixtures("forbid_loading")
def test_existing_output_without_overwrite(tmp_path: Path, code_dir: Path, capsys):
    out = Out(tmp_path / "runs" / "result", existing=True)
    out.path.mkdir(parents=True)
    (out.path / SENTINEL).write_text(SENTINEL_TEXT)
    argv = prune_argv("smollm2-135m", code_dir, "--out", str(out.path))
    code, stdout, err = run_cli(argv, capsys)
    line = assert_one_line_error(code, err)
    assert str(out.path) in line and "--overwrite" in line
    assert stdout == ""
    out.assert_untouched()


@pytest.mark.usefixtures("forbid_loading")
def test_output_path_is_a_file(tmp_path: Path, code_dir: Path, capsys):
    target = tmp_path / "result"
    target.write_text(SENTINEL_TEXT)
    argv = prune_argv("smollm2-135m", code_dir, "--out", str(target), "--overwrite")
    code, _, err = run_cli(argv, capsys)
    assert_one_line_error(code, err)
    assert target.read_text() == SENTINEL_TEXT
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# -- eval -------------------------------------------------------------------------------------


@pytest.mark.usefixtures("forbid_loading")
def test_eval_unknown_source(capsys):
    code, stdout, err = run_cli(["eval", "--model", "smollm2-135m", "--ppl", "foo"], capsys)
    line = assert_one_line_error(code, err)
    assert "'foo'" in line
    assert stdout == ""


def test_eval_missing_model(code_dir: Path, capsys):
    argv = ["eval", "--model", "./nope/model", "--ppl", f"python:{code_dir}"]
    code, _, err = run_cli(argv, capsys)
    line = assert_one_line_error(code, err)
    assert "./nope/model" in line


# -- models ----------------------------------------------------------------------------------


def test_models_lists_the_aliases(capsys):
    code, stdout, err = run_cli(["models"], capsys)
    assert code == 0
    assert err == ""
    starts = [line.split()[0] for line in stdout.splitlines() if line and not line[0].isspace()]
    assert starts == ["alias", *ALIASES]


def test_models_shows_how_to_install(capsys, monkeypatch):
    monkeypatch.setitem(sources.OFFLINE_MODELS, FAKE.alias, FAKE)
    code, stdout, _ = run_cli(["models"], capsys)
    assert code == 0
    row = next(line for line in stdout.splitlines() if line.startswith(FAKE.alias))
    assert row.split()[1:3] == ["no", "no"]
    assert f"codeprune models --install {FAKE.alias}" in stdout
    assert FAKE.pip_command in stdout


# -- the real console script -----------------------------------------------------------------


def test_console_script_error(tmp_path: Path):
    script = Path(sys.executable).with_name("codeprune")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "codeprune.cli"]
    out = tmp_path / "result"
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRANSFORMERS_VERBOSITY", "TQDM_DISABLE")}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run(
        [*cmd, "prune", "--model", "smollm2-135m", "--sparsity", "1.5", "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("codeprune: error:")
    assert "sparsity" in lines[0]
    assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == []  # neither the output nor a hidden temporary folder


@pytest.mark.parametrize("argv", [
    ["prune", "--model", "x", "--sparsity", "abc"],
    ["prune", "--model", "x", "--method", "no-such-method"],
    ["prune"],
    [],
])
def test_usage_errors_are_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert_one_line_error(exc.value.code, capsys.readouterr().err)


@pytest.mark.usefixtures("forbid_loading")
def test_language_without_folder(capsys):
    code, _, err = run_cli(["eval", "--model", "smollm2-135m", "--ppl", "python:"], capsys)
    assert "names no folder" in assert_one_line_error(code, err)


@pytest.mark.usefixtures("forbid_loading")
@pytest.mark.parametrize("device", ["bogus", "cuda:0"] if not __import__("torch").cuda.is_available()
                         else ["bogus"])
def test_bad_device(device, code_dir: Path, capsys):
    code, _, err = run_cli(["eval", "--model", "smollm2-135m", "--device", device], capsys)
    assert "device" in assert_one_line_error(code, err)


# -- the parser: help, examples, --json, --version, options generated from the configs ----------


def _subparsers(parser):
    import argparse

    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_help_imports_neither_torch_nor_transformers():
    code = ("import sys\nfrom codeprune.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'codeprune.methods') if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout
    assert "prune" in proc.stdout and "--version" in proc.stdout


def test_version(capsys):
    from codeprune.version import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"codeprune {__version__}"


def test_every_option_has_help_and_every_command_examples_and_json():
    from codeprune.cli import build_parser

    commands = _subparsers(build_parser(full=True))
    assert set(commands) == {"models", "prune", "export", "eval", "sweep", "compare", "report", "recover",
                             "instructions", "distill-data"}
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help and action.help.strip(), (name, action.option_strings or action.dest)
        flags = {f for a in sub._actions for f in a.option_strings}
        assert "--json" in flags, name
        examples = [line for line in sub.epilog.splitlines() if f"codeprune {name}" in line]
        assert 2 <= len(examples) <= 4, name
    assert "--efficiency" not in {f for a in commands["eval"]._actions for f in a.option_strings}
    for name in ("prune", "sweep", "recover"):
        dtype = next(a for a in commands[name]._actions if "--save-dtype" in a.option_strings)
        assert tuple(dtype.choices) == ("float32", "bfloat16", "float16") and dtype.default is None


def test_every_method_option_is_a_flag_of_prune_and_a_recipe_key():
    """A method's options reach it from the CLI and from a recipe stage, with help text."""
    from codeprune.cli import build_parser
    from codeprune.methods import METHODS, is_structured
    from codeprune.options import config_options
    from codeprune.recipes.spec import Stage, check_stage

    prune = _subparsers(build_parser("prune"))["prune"]
    flags = {f: a for a in prune._actions for f in a.option_strings}
    for method, cls in METHODS.items():
        for o in config_options(cls.config_class):
            assert o.meta.help, (method, o.name)
            if o.meta.cli:
                assert o.flag in flags, (method, o.flag)
                if o.meta.choices:
                    assert tuple(flags[o.flag].choices) == o.meta.choices
            options = {o.name: o.default}
            if is_structured(method) and o.name != "ratio":
                options["ratio"] = 0.1
            check_stage(Stage(method, options), f"{method}.{o.name}")  # raises on an unknown key


def test_recipe_stage_refuses_an_option_its_method_lacks():
    from codeprune.errors import ConfigError
    from codeprune.recipes.spec import parse_recipe

    parse_recipe({"stages": [{"stage": "sparsegpt", "block_size": 64, "damp": 0.02}]})
    with pytest.raises(ConfigError, match="block_size"):
        parse_recipe({"stages": [{"stage": "wanda", "block_size": 64}]})
    with pytest.raises(ConfigError, match="units"):
        parse_recipe({"stages": [{"stage": "ffn", "ratio": 0.1, "units": "heads"}]})


class _Captured:
    def __init__(self, result):
        self.result, self.calls = result, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.result


def test_prune_passes_only_the_method_options_given(monkeypatch, capsys):
    from types import SimpleNamespace

    fake = _Captured(SimpleNamespace(report={"ok": True}, out=None, export=None))
    monkeypatch.setattr("codeprune.api.prune", fake)
    assert main(["prune", "--model", "m", "--method", "sparsegpt", "--block-size", "64", "--damp", "0.02",
                 "--pattern", "2:4", "--save-dtype", "bfloat16", "--json"]) == 0
    (args, kwargs), = fake.calls
    assert args == ("m", "sparsegpt")
    assert kwargs["block_size"] == 64 and kwargs["damp"] == 0.02 and kwargs["pattern"] == "2:4"
    assert kwargs["save_dtype"] == "bfloat16"
    assert "sparsity" not in kwargs and "ratio" not in kwargs  # absent: the method's default
    assert json.loads(capsys.readouterr().out) == {"ok": True}
    fake.calls.clear()
    assert main(["prune", "--model", "m", "--method", "taylor", "--no-checkpointing", "--scope", "0.2:0.8",
                 "--no-compensation", "--json"]) == 0
    (_, kwargs), = fake.calls
    assert kwargs["checkpointing"] is False and kwargs["compensation"] is False
    assert kwargs["scope"] == "0.2:0.8" and kwargs["save_dtype"] is None  # None: the source's dtype


def test_recover_distill_and_eval_options_reach_their_configs(monkeypatch, capsys):
    from types import SimpleNamespace

    from codeprune.evaluation.humaneval import HumanEvalConfig

    rec = _Captured(SimpleNamespace(report={}, out=None))
    monkeypatch.setattr("codeprune.api.recover", rec)
    assert main(["recover", "--model", "m", "--data", "d.jsonl", "--out", "o", "--targets", "q_proj,v_proj",
                 "--lora-r", "4", "--warmup-ratio", "0.1", "--save-dtype", "float16"]) == 0
    (_, kwargs), = rec.calls
    assert kwargs["targets"] == ("q_proj", "v_proj") and kwargs["lora_r"] == 4
    assert kwargs["warmup_ratio"] == 0.1 and kwargs["save_dtype"] == "float16" and "lr" not in kwargs

    dis = _Captured(([], {"out": "o"}))
    monkeypatch.setattr("codeprune.api.distill_data", dis)
    assert main(["distill-data", "--original", "a", "--pruned", "b", "--data", "d", "--out", "o",
                 "--criterion", "match", "--limit", "3", "--json"]) == 0
    (_, kwargs), = dis.calls
    assert kwargs["criterion"] == "match" and kwargs["limit"] == 3 and "workers" not in kwargs

    ev = _Captured({"out": None})
    monkeypatch.setattr("codeprune.api.evaluate", ev)
    assert main(["eval", "--completions", "s.jsonl", "--k", "1,5", "--samples", "5", "--json"]) == 0
    (_, kwargs), = ev.calls
    assert kwargs["humaneval"] == HumanEvalConfig(samples=5, ks=(1, 5), completions="s.jsonl")
    capsys.readouterr()
    code, _, err = run_cli(["eval", "--completions", "s.jsonl", "--k", "1,x"], capsys)
    assert "--k takes comma-separated integers, got '1,x'" in assert_one_line_error(code, err)


def test_models_and_instructions_json(monkeypatch, capsys):
    code, stdout, _ = run_cli(["models", "--json"], capsys)
    assert code == 0
    rows = json.loads(stdout)
    assert [r["alias"] for r in rows] == list(ALIASES)
    assert {"installed", "cached", "upstream", "size_bytes", "install"} <= set(rows[0])
    summary = {"pairs": 1, "train": 1, "eval": 0, "files": 1, "test_files_skipped": 0, "duplicates": 0,
               "out": "x.jsonl"}
    monkeypatch.setattr("codeprune.api.instructions", _Captured(([], summary)))
    code, stdout, _ = run_cli(["instructions", "--from", "python:src", "--out", "x.jsonl", "--json"], capsys)
    assert code == 0 and json.loads(stdout) == summary


def test_the_command_line_is_recorded_for_the_reports(capsys):
    provenance = pytest.importorskip("codeprune.reporting.provenance").provenance
    assert main(["models", "--json"]) == 0
    assert provenance()["command"] == "codeprune models --json"
