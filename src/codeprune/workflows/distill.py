"""Flab-Pruner's code instruction data strategy (``codeprune distill-data``).

Recovery works best on what pruning broke. Given the original model, the pruned
one and an instruction set (.jsonl or hf:, Alpaca or chat, as ``recover`` reads it):

1. the pruned model answers every example (greedy, the prompt rendered exactly as
   ``codeprune recover`` renders it: the tokenizer's chat template, or the plain
   ``### Instruction / ### Response`` layout; completion-style pairs, whose answer
   opens a ```python block, are prompted with that fence and stopped at the
   closing one, as ``eval --humaneval --prompt-format instruct`` prompts);
2. examples it answers correctly are dropped: it does not need them;
3. the original model answers the rest; where *its* answer is correct it becomes
   the training target (the pruned model learns to behave like the model it came
   from), otherwise the reference answer of the data stays the target;
4. the kept examples are written as JSONL for ``codeprune recover``, each with a
   ``distill`` field saying why it was kept and which target it has.

"Correct" (``criterion``):

``tests``  the example carries tests (a ``test`` field: Python code that raises on
           failure; ``entry_point`` adds ``check(entry_point)`` as in HumanEval;
           ``prompt_code`` is code put before the answer, e.g. imports or a stub;
           ``problem`` + ``function``: an answer that does not define the function
           is a body that continues the problem). ``codeprune instructions
           --with-tests`` writes such rows from the doctests of a codebase. The
           answer's code (the first fenced block, else the whole answer) is run
           with them in the sandbox (evaluation/sandbox.py: own process, time and
           memory limits, own temporary folder, no network); it is correct when
           the program exits cleanly.
``match``  examples without tests: the answer is correct when its similarity to
           the reference, difflib's ratio on whitespace-collapsed text, is at least
           ``match_threshold`` (default 0.6: most of the reference reproduced, in
           order). Exact match is too strict for code, a loss would never judge
           the original's own answer.
``auto``   (default) tests where an example has them, match otherwise.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from codeprune.calibration.devices import place_model, resolve_device
from codeprune.data.instructions import answer_code, program_with_tests, to_messages, write_jsonl
from codeprune.data.instructions import read_rows as raw_rows
from codeprune.data.prompts import INSTRUCT_STOP, RESPONSE_PREFIX, prompt_segments
from codeprune.errors import ConfigError, CorpusError
from codeprune.evaluation.humaneval import generate_texts
from codeprune.evaluation.sandbox import SandboxLimits, check_sandbox, run_programs
from codeprune.models.loading import LoadedModel
from codeprune.options import opt
from codeprune.workflows.common import check_out, load, releasing_outputs

CRITERIA = ("auto", "tests", "match")


PLAIN_STOPS = ("\n### Instruction", "\n### Response")


@dataclass
class DistillRow:
    row: dict  # the data's own row (kept fields: id, split, test, ...)
    messages: list[dict]  # the conversation up to and including the reference answer
    where: str

    @property
    def reference(self) -> str:
        return self.messages[-1]["content"]

    @property
    def has_tests(self) -> bool:
        return isinstance(self.row.get("test"), str) and bool(self.row["test"].strip())


@dataclass
class DistillConfig:
    criterion: str = opt("auto", "correctness: run the example's tests, or similarity to the reference "
                         "(auto: tests where present)", choices=CRITERIA)
    match_threshold: float = opt(0.6, "similarity (difflib ratio) from which an answer counts as correct")
    max_new_tokens: int = opt(256, "tokens generated per answer at most")
    batch_size: int = opt(8, "prompts per generate call")
    limit: int | None = opt(None, "only the first N examples", type=int, metavar="N")
    timeout: float = opt(10.0, "seconds per test program")
    memory_mb: int = opt(1024, "memory per test program, in MB")
    workers: int | None = opt(None, "test programs run at once (default: min(4, cores))", type=int)

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise ConfigError(f"unknown criterion '{self.criterion}': choose {', '.join(CRITERIA)}")
        if not 0 < self.match_threshold <= 1:
            raise ConfigError(f"match threshold must be in (0, 1], got {self.match_threshold}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("max_new_tokens and batch_size must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")


def read_rows(spec: str, limit: int | None = None) -> list[DistillRow]:
    """Rows of an instruction set (.jsonl or hf:, Alpaca or chat, as ``codeprune recover``
    reads them), each ending with the reference answer."""
    rows = []
    for where, row in raw_rows(spec):
        messages = to_messages(row, where)
        if messages[-1]["role"] != "assistant":
            raise CorpusError(f"{where}: the conversation must end with the assistant's answer")
        rows.append(DistillRow(row, messages, where))
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise CorpusError(f"instruction data '{spec}' holds no example")
    return rows


def prompt_of(tokenizer, messages: list[dict]) -> tuple[str, bool]:
    """(the text before the last answer, whether a chat template made it): the prompt
    ``codeprune recover`` trains that answer after."""
    segs = prompt_segments(tokenizer, messages)
    last = max(k for k, (_, trained) in enumerate(segs) if trained)
    prompt = "".join(text for text, _ in segs[:last])
    return prompt, not prompt.endswith("### Response:\n")


def similarity(answer: str, reference: str) -> float:
    a, b = " ".join(answer.split()), " ".join(reference.split())
    if not a and not b:
        return 1.0
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def judge(rows: list[DistillRow], answers: list[str], cfg: DistillConfig) -> list[tuple[bool, str, float]]:
    """[(correct, criterion, score)] per answer (score: 1/0 for tests, the similarity for match)."""
    kinds = ["tests" if r.has_tests and cfg.criterion != "match" else "match" for r in rows]
    out: list = [None] * len(rows)
    runs = [k for k, kind in enumerate(kinds) if kind == "tests"]
    if runs:
        limits = SandboxLimits(timeout=cfg.timeout, memory_mb=cfg.memory_mb)
        results = run_programs([program_with_tests(rows[k].row, answers[k]) for k in runs], limits=limits,
                               workers=cfg.workers)
        for k, res in zip(runs, results, strict=True):
            out[k] = (res.passed, "tests", float(res.passed))
    for k, kind in enumerate(kinds):
        if kind == "match":
            score = similarity(answer_code(answers[k]), answer_code(rows[k].reference))
            out[k] = (score >= cfg.match_threshold, "match", score)
    return out


def answer_all(lm, rows: list[DistillRow], cfg: DistillConfig, desc: str) -> list[str]:
    """Greedy answers. A chat row whose reference opens with RESPONSE_PREFIX (completion-style
    pairs) is answered as ``eval --humaneval --prompt-format instruct`` answers: the prompt
    ends with the opening fence and the answer stops at the closing one."""
    prompts, templated = zip(*(prompt_of(lm.tokenizer, r.messages) for r in rows), strict=True)
    fenced = [t and r.reference.startswith(RESPONSE_PREFIX) for r, t in zip(rows, templated, strict=True)]
    answers: list[str] = [""] * len(rows)
    for group in (True, False):
        idx = [k for k in range(len(rows)) if fenced[k] == group]
        if not idx:
            continue
        chat = all(templated[k] for k in idx)
        stops = INSTRUCT_STOP if group else () if chat else PLAIN_STOPS
        texts = generate_texts(lm, [prompts[k] + (RESPONSE_PREFIX if group else "") for k in idx],
                               max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, stops=stops,
                               desc=desc, add_special_tokens=not chat)
        for k, t in zip(idx, texts, strict=True):
            answers[k] = f"{RESPONSE_PREFIX}{t[0].split('```', 1)[0].rstrip()}\n```" if group else t[0]
    return answers


def distill(original, pruned, data: str, cfg: DistillConfig) -> tuple[list[dict], dict]:
    """(records to write, summary): see the module docstring. ``original`` and ``pruned`` are
    LoadedModels (each with its own tokenizer: a vocab-pruned model has a smaller one)."""
    start = time.perf_counter()
    rows = read_rows(data, cfg.limit)
    if cfg.criterion == "tests":
        missing = [r.where for r in rows if not r.has_tests]
        if missing:
            raise CorpusError(f"{missing[0]}: criterion 'tests' needs a 'test' field in every example")
    pruned_answers = answer_all(pruned, rows, cfg, "pruned model answers")
    pruned_judged = judge(rows, pruned_answers, cfg)
    wrong = [k for k, (ok, _, _) in enumerate(pruned_judged) if not ok]
    orig_answers, orig_judged = [], []
    if wrong:
        orig_answers = answer_all(original, [rows[k] for k in wrong], cfg, "original model answers")
        orig_judged = judge([rows[k] for k in wrong], orig_answers, cfg)
    records = []
    for k, answer, (ok, _, score) in zip(wrong, orig_answers, orig_judged, strict=True):
        r = rows[k]
        target = answer if ok else r.reference
        crit, p_score = pruned_judged[k][1], pruned_judged[k][2]
        meta = {"criterion": crit, "pruned_score": p_score, "original_score": score,
                "original_correct": ok, "target": "original" if ok else "reference"}
        records.append(_with_target(r.row, target) | {"distill": meta})
    from_original = sum(r["distill"]["original_correct"] for r in records)
    summary = {"data": data, "examples": len(rows), "pruned_correct": len(rows) - len(wrong),
               "kept": len(records), "target_original": from_original,
               "target_reference": len(records) - from_original,
               "with_tests": sum(r.has_tests for r in rows), "criterion": cfg.criterion,
               "match_threshold": cfg.match_threshold, "max_new_tokens": cfg.max_new_tokens,
               "seconds": time.perf_counter() - start}
    return records, summary


def _with_target(row: dict, target: str) -> dict:
    """The row with its reference answer replaced by ``target`` (Alpaca output or last message)."""
    new = json.loads(json.dumps(row))
    new.pop("distill", None)
    if "messages" in new:
        new["messages"][-1]["content"] = target
    else:
        new["output"] = target
    if "id" not in new:  # keep the example's split stable: recover hashes the id
        new["id"] = hashlib.sha1(json.dumps(row, sort_keys=True).encode()).hexdigest()
    return new


@releasing_outputs
def distill_data(original: str | LoadedModel, pruned: str | LoadedModel, data: str, *,
                 out: str | Path | None = None, overwrite: bool = False, device: str = "cpu",
                 dtype: str | torch.dtype = "float32", **options) -> tuple[list[dict], dict]:
    """Flab-Pruner's code instruction data strategy: keep the examples of ``data`` the pruned
    model gets wrong, with the original model's answer as target where it is correct;
    written to ``out`` (.jsonl) when given. ``options`` are ``DistillConfig``
    fields (criterion, match_threshold, max_new_tokens, batch_size, limit, timeout,
    memory_mb, workers). Returns (records, summary); see the module docstring."""
    try:
        cfg = DistillConfig(**options)
    except TypeError as e:
        raise ConfigError(f"bad distill-data option: {e}") from None
    check_out(out, overwrite, original, pruned, data, kind="file")
    rows = read_rows(data, cfg.limit)  # fail fast on bad data, before loading two models
    if any(r.has_tests for r in rows) and cfg.criterion != "match":
        check_sandbox(SandboxLimits(timeout=cfg.timeout, memory_mb=cfg.memory_mb))
    dev = resolve_device(device)
    models = []
    for m in (original, pruned):
        lm = m if isinstance(m, LoadedModel) else load(m, dtype=dtype)
        place_model(lm, dev)
        models.append(lm)
    records, summary = distill(models[0], models[1], data, cfg)
    summary.update(original=models[0].name, pruned=models[1].name)
    if not records:
        raise CorpusError(f"the pruned model answers all {summary['examples']} examples correctly by "
                          f"criterion '{cfg.criterion}': nothing to distill")
    if out is not None:
        summary["out"] = str(write_jsonl(records, out, overwrite=overwrite))
    return records, summary
