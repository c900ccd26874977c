"""Hub ids without a network fail at once, in one line; a hub id already cached still loads.

The probe (models/loading.py: hub_reachable) is one bounded TCP connect; HF_HUB_OFFLINE
skips it. Figures on the 2-core development machine: ~3 s wall for the whole
`codeprune eval` process (interpreter and torch import included), under 0.1 s for the
load itself (it took 32-50 s and 11 retry lines before)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from codeprune.errors import ModelNotFoundError
from codeprune.models import loading
from codeprune.models.checkpoint import save_checkpoint
from codeprune.models.loading import load_model

from ..conftest import make_tiny

REFUSED = "http://127.0.0.1:9"  # the discard port: nothing listens, the connect fails at once


def _env(offline: bool, endpoint: str | None, **extra) -> dict:
    drop = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HTTPS_PROXY", "https_proxy")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    return {**env, **extra}


@pytest.mark.parametrize("offline, endpoint, expected", [
    (True, None, "and HF_HUB_OFFLINE is set"),
    (False, REFUSED, "the hub cannot be reached (127.0.0.1:9: no network)"),
    (False, None, "the hub cannot be reached (huggingface.co:443: no network)"),
])
def test_unknown_hub_id_offline_fails_fast_in_one_line(offline, endpoint, expected, tmp_path):
    if endpoint is None and not offline and loading.hub_reachable("huggingface.co", 443):
        pytest.skip("this machine reaches huggingface.co")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "codeprune", "eval", "--model", "some-org/some-model",
                           "--ppl", "python-stdlib"], capture_output=True, text=True, timeout=120,
                          env=_env(offline, endpoint, CODEPRUNE_CACHE=str(tmp_path / "cache")))
    wall = time.monotonic() - start
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("codeprune: error: model 'some-org/some-model' is not an offline alias")
    assert expected in lines[0]
    assert wall < 8, f"{wall:.1f} s"


@pytest.mark.parametrize("offline", [True, False])
def test_the_load_itself_takes_under_two_seconds(offline, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.setenv("HF_ENDPOINT", REFUSED)
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError):
        load_model("some-org/some-model")
    assert time.monotonic() - start < 2


LOAD = ("from codeprune.models.loading import load_model; "
        "print(load_model('org/tiny').model.config.model_type)")


@pytest.mark.parametrize("offline", [True, False])
def test_a_cached_hub_id_still_loads_offline(offline, tiny_tokenizer, tmp_path):
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / ("a" * 40)
    save_checkpoint(make_tiny("qwen2", tokenizer=tiny_tokenizer), snapshot)
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text("a" * 40)
    env = _env(offline, None if offline else REFUSED, HF_HUB_CACHE=str(tmp_path / "hub"),
               CODEPRUNE_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["qwen2"]
    assert "Retry" not in proc.stderr


def test_probe_result_is_remembered(monkeypatch):
    calls = []
    monkeypatch.setattr(loading.socket, "create_connection",
                        lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(OSError("down")))
    monkeypatch.setattr(loading, "_REACHABLE", {})
    assert not loading.hub_reachable("example.invalid", 443)
    assert not loading.hub_reachable("example.invalid", 443)
    assert len(calls) == 1
