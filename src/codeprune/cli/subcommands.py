"""The arguments of each ``codeprune`` subcommand, one small function each, and the command table.

A builder runs only for the subcommand being parsed (cli/parser.py), so its imports
(the method registry, which imports torch) cost nothing to ``codeprune --help``.
Method, recovery, distillation and HumanEval options are generated from their config
dataclasses (``add_config_options``); the flags written here are the command's own.
"""

from __future__ import annotations

import argparse

from codeprune.cli.arguments import (
    Command,
    add_common,
    add_config_options,
    add_json,
    add_save_dtype,
)

GGUF_TYPE_HELP = "f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0"  # models/gguf_export.py GGUF_TYPES


def _methods(structured: bool | None = None) -> dict[str, type]:
    """{method: config class}, unstructured methods first (``structured``: only those / the others)."""
    from codeprune.methods import METHODS, is_structured

    names = sorted(METHODS, key=lambda m: (is_structured(m), m))  # registered now, plugins included
    return {m: METHODS[m].config_class for m in names if structured in (None, is_structured(m))}


def _options_of(users: list[str]) -> str:
    return "options of " + ", ".join(users)


def build_models(p: argparse.ArgumentParser) -> None:
    p.add_argument("--install", metavar="NAME", help="pip-install the packages of an offline model")
    p.add_argument("--verify", nargs="*", metavar="ALIAS",
                   help="check the cache against its manifests (sha256), every entry when none is named; "
                        "exit 2 if one is corrupt")
    p.add_argument("--rebuild", metavar="ALIAS",
                   help="rebuild the cache of an offline alias, a .gguf file or a cache folder (the old one "
                        "stays until the new one is whole)")
    add_json(p, "the list")


def build_prune(p: argparse.ArgumentParser) -> None:
    add_common(p)
    methods = _methods()
    p.add_argument("--method", choices=list(methods),
                   help="the pruning method (default wanda); its options are in the groups below")
    p.add_argument("--recipe", metavar="NAME|FILE",
                   help="run a recipe's stages instead of one method: flab, shortgpt or a YAML file "
                        "(docs/recipes.md)")
    p.add_argument("--target", type=float,
                   help="with --recipe: fraction of all parameters removed, split across its stages "
                        "(default: the recipe's)")
    p.add_argument("--min-count", type=int,
                   help="with --recipe: keep the tokens used at least this often on the calibration corpus "
                        "(the vocab stage's min_count)")
    p.add_argument("--calib", default="python-stdlib",
                   help="python-stdlib, LANG:DIR, FILE.txt, FILE.jsonl or hf:NAME[:CONFIG]:SPLIT:FIELD")
    p.add_argument("--samples", type=int, default=64, help="calibration windows (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (default 0)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward in calibration")
    p.add_argument("--eval-windows", type=int, default=32,
                   help="held-out windows for perplexity before/after (default 32)")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity measurements")
    p.add_argument("--out", help="output folder (checkpoint + report.json/md)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--gguf", metavar="TYPE",
                   help="also export the result to OUT.TYPE.gguf (+ OUT.TYPE.Modelfile) for llama.cpp / "
                        f"ollama; TYPE: {GGUF_TYPE_HELP}")
    add_save_dtype(p)
    add_config_options(p, methods, title=_options_of)


def build_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="RUN", help="a run folder (checkpoint), offline alias, folder or hub id")
    p.add_argument("--gguf", required=True, metavar="FILE.gguf",
                   help="the GGUF file to write (an ollama Modelfile is written beside it)")
    p.add_argument("--type", dest="gguf_type", default="f16", metavar="TYPE",
                   help=f"weight type: {GGUF_TYPE_HELP} (default f16; norms and biases stay f32)")
    p.add_argument("--ffn-multiple", type=int, default=32, metavar="N",
                   help="pad every FFN width with zero channels to a multiple of N (default 32: the same "
                        "outputs, quantizable rows and llama.cpp's fast kernels; 1: as pruned)")
    p.add_argument("--no-modelfile", action="store_true", help="do not write the ollama Modelfile")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    add_json(p, "the summary")


def build_eval(p: argparse.ArgumentParser) -> None:
    from codeprune.evaluation.humaneval import HumanEvalConfig

    add_common(p, model_required=False)
    p.add_argument("--ppl", action="append", metavar="SOURCE",
                   help="source to score on its held-out split (repeatable); code-ppl = every language "
                        "corpus present; default python-stdlib when nothing else is asked")
    p.add_argument("--windows", type=int, default=32, help="held-out windows per source (default 32)")
    p.add_argument("--ppl-tokenizer", metavar="MODEL",
                   help="cut the windows with this model's tokenizer and score per its tokens: give the "
                        "original of a vocabulary-pruned model so that the perplexities compare")
    p.add_argument("--no-efficiency", action="store_true",
                   help="skip the efficiency measurements (size, disk, MACs/token, prefill/decode tokens/s, "
                        "memory, energy), which run by default")
    p.add_argument("--runtime", choices=["transformers", "llama.cpp"], default="transformers",
                   help="run the model in transformers (default) or llama.cpp (a .gguf --model: perplexity "
                        "and batch-1 prefill/decode speed as llama.cpp gives them)")
    p.add_argument("--threads", type=int, help="llama.cpp threads (default: one per core)")
    p.add_argument("--out", help="write report.json / report.md (and HumanEval samples) to this folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    h = p.add_argument_group("HumanEval")
    h.add_argument("--humaneval", action="store_true", help="HumanEval pass@k (164 problems, sandboxed)")
    add_config_options(h, {"humaneval": HumanEvalConfig})


def build_sweep(p: argparse.ArgumentParser) -> None:
    add_common(p, offload=False)  # the sweep keeps the model on --device
    methods = _methods(structured=False)
    p.add_argument("--method", default="wanda", choices=list(methods),
                   help="an unstructured method (default wanda)")
    p.add_argument("--calib-langs", default="python,java,cpp,javascript",
                   help="languages (corpora found here, see `codeprune eval --ppl code-ppl`) or "
                        "NAME=SOURCE pairs, comma-separated (default python,java,cpp,javascript)")
    p.add_argument("--eval-langs", help="evaluation languages, same syntax (default: the calibration ones)")
    p.add_argument("--samples", type=int, default=64, help="calibration windows per language (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (default 0)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward in calibration (default 8)")
    p.add_argument("--eval-windows", type=int, default=32, help="held-out windows per language (default 32)")
    p.add_argument("--save-models", action="store_true", help="also save every sub-model as a checkpoint")
    p.add_argument("--no-efficiency", action="store_true", help="skip the speed measurements")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per language)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    add_save_dtype(p)
    add_config_options(p, methods, title=_options_of)


def _build_many_runs(p: argparse.ArgumentParser, folder: str, what: str) -> None:
    p.add_argument("runs", nargs="+", help="run folders (with report.json" + (
        "; masks or checkpoint)" if folder == "compare" else ")"))
    p.add_argument("--out", help=f"output folder (default: {folder}/ beside the runs)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder that is not ours")
    add_json(p, what)


def build_compare(p: argparse.ArgumentParser) -> None:
    _build_many_runs(p, "compare", "the result")


def build_report(p: argparse.ArgumentParser) -> None:
    _build_many_runs(p, "report", "the table")


def build_recover(p: argparse.ArgumentParser) -> None:
    from codeprune.workflows.recover import RecoverConfig

    p.add_argument("--model", required=True, help="the pruned checkpoint (folder), alias or hub id")
    p.add_argument("--data", required=True,
                   help="instruction data: FILE.jsonl (instruction/input/output or messages) or "
                        "hf:NAME[:CONFIG]:SPLIT; or code: python-stdlib, code-ppl, LANG:DIR, FILE.txt "
                        "(see --data-kind, --tokens)")
    p.add_argument("--teacher", default=None,
                   help="with --kd: the model to distill from (alias, folder or hub id; usually the model "
                        "before pruning)")
    p.add_argument("--teacher-dtype", default="auto",
                   help="the teacher's dtype; auto (default): bfloat16 where the device computes it natively "
                        "(AVX512-BF16/AMX CPUs, recent GPUs), else --dtype")
    p.add_argument("--out", required=True, help="output folder (merged checkpoint, adapter/, report)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--eval-data", default="python-stdlib",
                   help="source whose held-out split gives perplexity before/after ('none' to skip)")
    p.add_argument("--eval-windows", type=int, default=16, help="held-out perplexity windows (default 16)")
    p.add_argument("--eval-seq-len", type=int, default=512, help="tokens per perplexity window (default 512)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep OUT.checkpoints/ after success")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    add_save_dtype(p)
    add_json(p)
    add_config_options(p, {"recover": RecoverConfig}, title=lambda _: "LoRA, distillation and training")


def build_instructions(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", required=True, metavar="LANG:DIR",
                   help="python, java, javascript or cpp:DIR, or python-stdlib; e.g. python:src/")
    p.add_argument("--out", required=True, help="output .jsonl (instruction/input/output/source/split)")
    p.add_argument("--eval-fraction", type=float, default=0.05, help="share of files held out (by hash)")
    p.add_argument("--style", choices=("alpaca", "completion"), default="alpaca",
                   help="alpaca: docstring -> body (default); completion: HumanEval-shaped chat pairs, "
                        "prompted as `eval --humaneval --prompt-format instruct` prompts (Python)")
    p.add_argument("--with-tests", action="store_true",
                   help="keep the functions whose docstrings hold doctests (>>>), with those as the pair's "
                        "test, each checked in the sandbox (Python)")
    p.add_argument("--workers", type=int, default=None, help="doctests run at once (default: min(4, cores))")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    add_json(p, "the summary")


def build_distill(p: argparse.ArgumentParser) -> None:
    from codeprune.workflows.distill import DistillConfig

    p.add_argument("--original", required=True, help="the model before pruning (alias, folder, hub id)")
    p.add_argument("--pruned", required=True, help="the pruned checkpoint (folder)")
    p.add_argument("--data", required=True, help="instruction data FILE.jsonl (Alpaca or chat; optional "
                                                 "test / entry_point / prompt_code fields) or "
                                                 "hf:NAME[:CONFIG]:SPLIT")
    p.add_argument("--out", required=True, help="output .jsonl for codeprune recover")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    add_json(p, "the summary")
    add_config_options(p, {"distill-data": DistillConfig}, title=lambda _: "selection and generation")


COMMANDS: dict[str, Command] = {
    "models": Command("list the offline models, installed or cached", (
        "codeprune models",
        "codeprune models --install smollm2-135m",
        "codeprune models --verify",
        "codeprune models --rebuild smollm2-135m",
    ), build_models),
    "prune": Command("prune a model and save a checkpoint + report", (
        "codeprune prune --model smollm2-135m --method wanda --sparsity 0.5 --out runs/wanda50",
        "codeprune prune --model smollm2-135m --method sparsegpt --pattern 2:4 --damp 0.02 --out runs/sg",
        "codeprune prune --model smollm2-135m --method flap --ratio 0.2 --save-dtype bfloat16 --out runs/f20",
        "codeprune prune --model qwen2.5-coder-0.5b --recipe flab --target 0.22 --out runs/qf --gguf q8_0",
    ), build_prune),
    "export": Command("write a run as a GGUF file for llama.cpp / ollama, with an ollama Modelfile", (
        "codeprune export runs/q-flap-20 --gguf runs/q-flap-20.gguf --type q8_0",
        "codeprune export runs/q-flab-22 --gguf q-flab-22.f16.gguf",
        "codeprune export smollm2-135m --gguf smollm2.f32.gguf --type f32 --no-modelfile --json",
    ), build_export),
    "eval": Command("perplexity per language, HumanEval pass@k, efficiency of a model", (
        "codeprune eval --model runs/wanda50 --ppl code-ppl --humaneval --out runs/wanda50-eval",
        "codeprune eval --model smollm2-135m --ppl python-stdlib --no-efficiency --json",
        "codeprune eval --completions samples.jsonl --k 1,10 --samples 10",
        "codeprune eval --model runs/q-flap-20.gguf --ppl python-stdlib --runtime llama.cpp",
    ), build_eval),
    "sweep": Command("one sub-model per calibration language, scored on every language", (
        "codeprune sweep --model smollm2-135m --calib-langs python,java --out runs/langs",
        "codeprune sweep --model smollm2-135m --method sparsegpt --pattern 2:4 --save-models --out runs/l24",
    ), build_sweep),
    "compare": Command("mask Jaccard distances and cross-language perplexity of runs", (
        "codeprune compare runs/langs/*",
        "codeprune compare runs/langs/python runs/langs/java --json",
    ), build_compare),
    "report": Command("one table (Markdown, JSON) and plots over many runs", (
        "codeprune report runs/*",
        "codeprune report runs/wanda50 runs/flap20 --out runs/report --json",
    ), build_report),
    "recover": Command("recovery (LoRA or full; cross-entropy or distillation) into a plain checkpoint", (
        "codeprune recover --model runs/t20 --data data/instr.jsonl --out runs/t20-rec",
        "codeprune recover --model runs/f20 --teacher qwen2.5-coder-0.5b --kd --data code-ppl --tokens 200k "
        "--out runs/f20-kd",
        "codeprune recover --model runs/w50 --teacher smollm2-135m --kd --full --data python-stdlib "
        "--out runs/w50-kd",
        "accelerate launch -m codeprune recover --model runs/t20 --data data/instr.jsonl --out runs/t20-ddp",
    ), build_recover),
    "instructions": Command("instruction pairs (docstring/comment -> body) from a codebase", (
        "codeprune instructions --from python:src/ --out data/instr.jsonl",
        "codeprune instructions --from python-stdlib --style completion --with-tests "
        "--out data/doctests.jsonl",
        "codeprune instructions --from python-stdlib --out data/stdlib.jsonl --json",
    ), build_instructions),
    "distill-data": Command("Flab-Pruner's data strategy: the examples the pruned model gets wrong, with "
                            "the original model's correct answers as targets", (
        "codeprune distill-data --original qwen2.5-coder-0.5b --pruned runs/q-flab-22 "
        "--data data/instr.jsonl --out data/instr-flab.jsonl",
        "codeprune distill-data --original smollm2-135m --pruned runs/flap20 --data data/instr.jsonl "
        "--criterion match --limit 200 --out data/d.jsonl --json",
    ), build_distill),
}
