"""Recovery of a pruned model (``codeprune recover``): LoRA or full fine-tuning, on instruction
data or plain code, with the data's cross-entropy or distillation from a teacher; peft and the
HF Trainer.

    codeprune recover --model runs/t20 --data data/instr.jsonl --out runs/t20-rec
    codeprune recover --model runs/f20 --teacher qwen2.5-coder-0.5b --kd --data code-ppl --tokens 200k \
        --out runs/f20-kd
    accelerate launch -m codeprune recover --model runs/t20 --data data/instr.jsonl --out runs/t20-rec

Flow:
1. The data (``data_kind``; auto: a .jsonl of instruction/messages rows and hf:
   datasets are instructions, any other source is code):
   - instructions (data/instructions.py) are split by their pinned "split" fields,
     else by a hash of each example's id (``eval_fraction``), and rendered with the
     tokenizer's chat template when it has one (else a plain "### Instruction /
     ### Response" layout); the loss is taken on the assistant tokens only
     (labels -100 elsewhere), truncated to ``seq_len``;
   - code (any calibration source: python-stdlib, code-ppl = every language corpus
     here in equal shares, LANG:DIR, FILE.txt/.jsonl, hf:...:FIELD) gives
     ``tokens`` training tokens in windows of ``seq_len`` from its calibration
     split (documents shuffled by ``seed``, at most ``4 * seq_len`` tokens from
     each), and evaluation windows from its held-out split; the loss is taken on
     every next token.
2. The objective: the data's cross-entropy, or with ``kd`` and a ``teacher``
   (usually the model before pruning) the distillation loss of workflows/kd.py:
   KL(teacher || student) at ``kd_temperature``, mixed with the cross-entropy by
   ``kd_alpha``; a vocabulary-pruned student learns the teacher's distribution
   restricted to its kept tokens.
3. What trains: LoRA (r=8, alpha=16, dropout 0.05 on q/k/v/o/gate/up/down by
   default), or with ``full`` every weight of the pruned model. Through the
   Trainer: ``accelerate launch`` (DDP, DeepSpeed, FSDP) works unchanged.
   Checkpoints go to ``OUT.checkpoints/``; running the same command again after
   an interruption resumes from the last one (options must match).
4. LoRA: the adapter is saved (``trainer.save_model``, which gathers sharded
   weights), then, on the main process only, merged into a fresh copy of the
   model. Full: the trained weights are saved the same way and loaded into a fresh
   copy. A sparse model (any decoder Linear with >= 1% exact zeros, Wanda /
   SparseGPT / N:M) keeps exactly its zeros: masked after the merge, and with
   ``full`` its gradients are masked and its weights re-masked after every
   optimizer step, so sparsity and pattern are those before recovery.
5. ``OUT`` holds a plain checkpoint (with modeling_codeprune.py when the pruned
   model needed it), the adapter (``adapter/``, LoRA only), report.json /
   report.md and loss.png; held-out perplexity and evaluation loss are measured
   before and after.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import math
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

import torch

from codeprune.calibration.devices import place_model, resolve_device
from codeprune.data import heldout_windows, read_source
from codeprune.data.calibration import calibration_windows, check_window_sizes
from codeprune.data.instructions import EVAL_FRACTION, read_instructions
from codeprune.data.prompts import Collator, encode_all
from codeprune.data.sources import code_corpora
from codeprune.errors import ConfigError, CorruptModelError, OutputWriteError
from codeprune.evaluation.perplexity import perplexity, protocol
from codeprune.models.adapters.base import DecoderAdapter
from codeprune.models.checkpoint import needs_modeling_file, save_checkpoint
from codeprune.models.counting import count_parameters, decoder_sparsity
from codeprune.models.dtypes import dtype_name, fast_bfloat16
from codeprune.options import count, opt
from codeprune.reporting.model_card import render_model_card
from codeprune.reporting.provenance import display_name, sanitise_source
from codeprune.reporting.schema import (
    KDSettings,
    LoraSettings,
    RecoverData,
    RecoverReport,
    Source,
    TrainingSettings,
)
from codeprune.reporting.writer import write_report
from codeprune.workflows.common import check_out, load, own_report, releasing_outputs, weights_bytes
from codeprune.workflows.kd import kd_trainer_class, vocabulary_map

LORA_TARGETS = DecoderAdapter.sublayer_names  # canonical names; the adapter maps them to module names
MASK_MIN_SPARSITY = 0.01  # a Linear with at least this share of exact zeros keeps them after the merge
DATA_KINDS = ("auto", "instructions", "code")
PER_DOC_WINDOWS = 4  # a code document gives at most this many windows of training tokens


@dataclass
class RecoverConfig:
    """Options of ``recover``; the Trainer knobs have the names of the CLI flags."""

    lora_r: int = opt(8, "LoRA rank")
    lora_alpha: int = opt(16, "LoRA scaling numerator (the update is scaled by alpha / r)")
    lora_dropout: float = opt(0.05, "dropout on the LoRA branch")
    targets: tuple[str, ...] = opt(LORA_TARGETS, "projections given LoRA adapters, comma-separated",
                                   metavar="PROJ,PROJ,...")
    lr: float = opt(1e-4, "peak learning rate")
    epochs: float = opt(2.0, "passes over the training examples")
    max_steps: int = opt(-1, "optimizer steps; overrides --epochs when > 0")
    batch_size: int = opt(4, "examples per device per step")
    grad_accum: int = opt(4, "gradient accumulation steps")
    seq_len: int = opt(512, "tokens per example (longer ones are cut)")
    warmup_ratio: float = opt(0.03, "share of the steps spent warming the learning rate up")
    eval_fraction: float = opt(EVAL_FRACTION, "held-out share of the examples (a 'split' field in the data "
                               "wins)")
    eval_steps: int | None = opt(None, "steps between evaluations (default: about 5 per run)", type=int)
    save_steps: int | None = opt(None, "steps between checkpoints (default: --eval-steps)", type=int)
    seed: int = opt(0, "seed of the Trainer: data order and LoRA initialisation")
    keep_mask: str = opt("auto", "restore the zeros of sparse Linears after the merge (auto: those with "
                         ">= 1% zeros, unless the checkpoint's report says it was not pruned "
                         "unstructured)", choices=("auto", "always", "never"))
    full: bool = opt(False, "fine-tune every weight of the pruned model instead of LoRA adapters (zeros of "
                     "sparse Linears stay zero)")
    kd: bool = opt(False, "distill from --teacher: KL(teacher || student) on the next-token distributions")
    kd_temperature: float = opt(2.0, "distillation temperature T (the KL term is scaled by T^2)")
    kd_alpha: float = opt(0.0, "weight of the data's cross-entropy in the distillation loss (0: KL only)")
    data_kind: str = opt("auto", "instructions (loss on the answers) or code (every token); auto: .jsonl "
                         "instruction rows and hf: are instructions, other sources code", choices=DATA_KINDS)
    tokens: int = opt(200_000, "training tokens drawn from a code source (e.g. 200k, 1M)", type=count,
                      metavar="N")

    def __post_init__(self) -> None:
        checks = [
            (self.lora_r >= 1, f"lora r must be >= 1, got {self.lora_r}"),
            (self.lora_alpha > 0, f"lora alpha must be > 0, got {self.lora_alpha}"),
            (0 <= self.lora_dropout < 1, f"lora dropout must be in [0, 1), got {self.lora_dropout}"),
            (self.lr > 0, f"learning rate must be > 0, got {self.lr}"),
            (self.epochs > 0 or self.max_steps > 0, "give epochs > 0 or max steps > 0"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch size and grad accum must be >= 1"),
            (self.seq_len >= 16, f"seq len must be >= 16, got {self.seq_len}"),
            (0 <= self.eval_fraction < 1, f"eval fraction must be in [0, 1), got {self.eval_fraction}"),
            (self.keep_mask in ("auto", "always", "never"), "keep mask: auto, always or never"),
            (bool(self.targets) and set(self.targets) <= set(LORA_TARGETS),
             f"LoRA targets must be among {', '.join(LORA_TARGETS)}"),
            (self.kd_temperature > 0, f"kd temperature must be > 0, got {self.kd_temperature}"),
            (0 <= self.kd_alpha <= 1, f"kd alpha must be in [0, 1], got {self.kd_alpha}"),
            (self.data_kind in DATA_KINDS, f"data kind: {', '.join(DATA_KINDS)}"),
            (self.tokens >= 1, f"tokens must be >= 1, got {self.tokens}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self.targets = tuple(self.targets)
        self._refuse_unused()

    def _refuse_unused(self) -> None:
        """Options that would be ignored are refused, not silently dropped: LoRA options with
        ``full``, distillation options without ``kd``."""
        changed = {f.name for f in fields(self) if getattr(self, f.name) != f.default}
        lora = ("lora_r", "lora_alpha", "lora_dropout", "targets")
        for on, group, flag in ((self.full, lora, "with --full"),
                                (not self.kd, ("kd_temperature", "kd_alpha"), "without --kd")):
            unused = sorted(changed & set(group))
            if on and unused:
                names = ", ".join("--" + n.replace("_", "-") for n in unused)
                raise ConfigError(f"{names} {'has' if len(unused) == 1 else 'have'} no effect {flag}: "
                                  "drop " + ("it" if len(unused) == 1 else "them"))


def zeros_are_pruned(lm) -> bool | None:
    """What the checkpoint's own codeprune report says of its exact zeros.

    True when it was pruned unstructured or N:M (a method, or a recipe stage), or is a
    recovery that kept masks; False for every other codeprune result (structured,
    vocabulary, layers): exact zeros there are the source's, e.g. the zero level of a
    4-bit GGUF dequantized to bfloat16 (4-11% of each Linear of the offline
    qwen2.5-coder-0.5b), and must not freeze those weights. None without a report."""
    r = own_report(lm)
    if r.get("kind") == "prune":
        stages = [s for s in r.get("stages") or [] if isinstance(s, dict)]
        return "unstructured" in {r.get("pruning"), *(s.get("pruning") for s in stages)}
    if r.get("kind") == "recover":
        return bool(r.get("masks_kept"))
    return None


def sparse_masks(lm, mode: str = "auto") -> dict[str, torch.Tensor]:
    """{module name: bool mask of the kept weights} of the decoder Linears to keep sparse.

    ``auto``: the Linears with at least MASK_MIN_SPARSITY exact zeros, unless the
    checkpoint's report says its zeros are not a pruning pattern (``zeros_are_pruned``)."""
    if mode == "never" or (mode == "auto" and zeros_are_pruned(lm) is False):
        return {}
    names = {id(m): n for n, m in lm.model.named_modules()}
    masks = {}
    for layer in lm.adapter.layers():
        for lin in lm.adapter.linears(layer).values():
            kept = lin.weight != 0
            if mode == "always" or 1 - kept.float().mean().item() >= MASK_MIN_SPARSITY:
                masks[names[id(lin)]] = kept
    return masks


@torch.no_grad()
def apply_masks_(model, masks: dict[str, torch.Tensor]) -> None:
    """Zero every weight outside its mask (the model and the masks both come from loads on the CPU)."""
    modules = dict(model.named_modules())
    for name, kept in masks.items():
        weight = modules[name].weight
        weight.masked_fill_(~kept.to(weight.device), 0)


@dataclass
class RecoverResult:
    report: dict  # empty on the other processes of a distributed run
    out: Path | None


def _perplexity(lm, held, device) -> float | None:
    if held is None:
        return None
    place_model(lm, device)
    ppl = perplexity(lm, held, desc="ppl")["ppl"]
    place_model(lm, "cpu")
    return ppl


def _work_dir(out: Path) -> Path:
    return out.with_name(out.name + ".checkpoints")


def _check_resume(work: Path, options: dict) -> str | None:
    """The checkpoint to resume from (None: start afresh); ConfigError when the options differ."""
    from transformers.trainer_utils import get_last_checkpoint

    saved = work / "recover_options.json"
    if not work.is_dir():
        return None
    if saved.is_file():
        before = json.loads(saved.read_text())
        if before != options:
            changed = sorted(k for k in set(before) | set(options) if before.get(k) != options.get(k))
            raise ConfigError(f"{work} holds an interrupted run with other options ({', '.join(changed)}): "
                              "rerun with the same options to resume, or delete that folder")
    return get_last_checkpoint(str(work))


@dataclass
class _Inputs:
    """The encoded training and evaluation sets and the held-out perplexity windows of one run."""

    spec: str
    kind: str  # "instructions" or "code"
    examples: int
    train_set: list[dict]
    eval_set: list[dict]
    dropped: int
    held: object  # held-out windows, or None

    @property
    def train_tokens(self) -> int:
        return sum(len(e["input_ids"]) for e in self.train_set)


@dataclass
class _Trained:
    """What training left: the trained weights (adapter or whole model) and the report's figures."""

    weights_dir: Path
    trainable: int
    train_out: object  # transformers TrainOutput
    seconds: float
    eval_before: float | None
    eval_after: float | None
    history: list[dict]


def data_kind(spec: str, kind: str = "auto") -> str:
    """"instructions" or "code" for ``--data spec`` (see the module docstring)."""
    if kind != "auto":
        return kind
    if spec.startswith("hf:"):
        return "instructions"
    path = Path(spec).expanduser()
    if spec.endswith(".jsonl") and path.is_file():
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        return "instructions"  # read_instructions names the line
                    return "instructions" if isinstance(row, dict) and (
                        "messages" in row or "instruction" in row) else "code"
    return "instructions" if spec.endswith(".jsonl") else "code"


def _start(model: str, data: str, teacher: str | None, out, cfg: RecoverConfig, overwrite: bool,
           state) -> tuple[Path, dict, str | None]:
    """(work folder, options, checkpoint to resume from): refused before minutes of loading when
    an interrupted run in the work folder had other options."""
    work = _work_dir(out)
    options = {"model": str(model), "data": data, **asdict(cfg), "targets": list(cfg.targets)}
    if teacher is not None:
        options["teacher"] = str(teacher)
    if overwrite and state.is_main_process:
        shutil.rmtree(work, ignore_errors=True)  # start afresh: nothing to resume
    state.wait_for_everyone()
    return work, options, _check_resume(work, options)


def _read_data(data: str, kind: str, cfg: RecoverConfig):
    """The instruction set, or the code corpora (one per language for code-ppl), read before
    any model is loaded: bad data fails in a second."""
    if kind == "instructions":
        return read_instructions(data)
    specs = list(code_corpora().values()) if data == "code-ppl" else [data]
    return [read_source(s) for s in specs]


def _inputs(lm, data: str, kind: str, source, cfg: RecoverConfig, corpus, eval_windows: int,
            ppl_seq_len: int) -> _Inputs:
    """Encode the training and evaluation sets; cut the held-out perplexity windows."""
    held = heldout_windows(lm.tokenizer, corpus, seq_len=ppl_seq_len, max_windows=eval_windows) \
        if corpus else None
    if kind == "instructions":
        train_ex, eval_ex = source.split(cfg.eval_fraction)
        train_set, dropped_train = encode_all(lm.tokenizer, train_ex, cfg.seq_len)
        eval_set, dropped_eval = encode_all(lm.tokenizer, eval_ex, cfg.seq_len)
        if not train_set:
            raise ConfigError(f"no training example keeps an answer token within seq len {cfg.seq_len}")
        return _Inputs(data, kind, len(source.examples), train_set, eval_set, dropped_train + dropped_eval,
                       held)
    n_train = math.ceil(cfg.tokens / cfg.seq_len)
    n_eval = max(1, round(n_train * cfg.eval_fraction)) if cfg.eval_fraction > 0 else 0
    train_set, eval_set = [], []
    for k, c in enumerate(source):  # equal shares of every language (code-ppl)
        share = n_train // len(source) + (k < n_train % len(source))
        if share:
            w = calibration_windows(lm.tokenizer, c, samples=share, seq_len=cfg.seq_len, seed=cfg.seed,
                                    per_doc=PER_DOC_WINDOWS * cfg.seq_len)
            train_set += [{"input_ids": r.tolist(), "labels": r.tolist()} for r in w.input_ids]
        share = n_eval // len(source) + (k < n_eval % len(source))
        if share:
            w = heldout_windows(lm.tokenizer, c, seq_len=cfg.seq_len, max_windows=share)
            eval_set += [{"input_ids": r.tolist(), "labels": r.tolist()} for r in w.input_ids]
    return _Inputs(data, kind, len(train_set) + len(eval_set), train_set, eval_set, 0, held)


def _masked_grad(grad: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    return grad * kept.to(grad.device, grad.dtype)


class _KeepZeros:
    """Full fine-tuning of a sparse model: gradients of the pruned weights are zeroed as they
    are computed, and the weights are re-masked after every optimizer step (weight decay and
    numerical noise included), so the zeros are exactly those before recovery."""

    def __init__(self, model, masks: dict[str, torch.Tensor]):
        self.model, self.masks = model, masks
        modules = dict(model.named_modules())
        self.hooks = [modules[name].weight.register_hook(partial(_masked_grad, kept=kept))
                      for name, kept in masks.items()]

    def callback(self):
        from transformers import TrainerCallback

        keep = self

        class ReMask(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                apply_masks_(keep.model, keep.masks)

        return ReMask()

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def _train(lm, cfg: RecoverConfig, inputs: _Inputs, work: Path, dev, state, resume: str | None,
           callbacks: list | None, teacher=None, kept=None, masks: dict | None = None) -> _Trained:
    """LoRA (or every weight, ``cfg.full``) through the HF Trainer, resumed from ``resume``; with a
    ``teacher``, the distillation loss. The trained weights are saved in ``work/adapter``
    (LoRA) or ``work/full``."""
    from transformers import Trainer, TrainingArguments

    tok, train_set, eval_set = lm.tokenizer, inputs.train_set, inputs.eval_set
    steps_per_epoch = math.ceil(len(train_set) / (cfg.batch_size * cfg.grad_accum * state.num_processes))
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * steps_per_epoch)
    eval_steps = cfg.eval_steps or max(1, total // 5)
    callbacks = list(callbacks or [])
    keep = None
    if cfg.full:
        model = lm.model.train().requires_grad_(True)
        if masks:
            keep = _KeepZeros(model, masks)
            callbacks.append(keep.callback())
    else:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=lm.adapter.lora_target_modules(cfg.targets), task_type="CAUSAL_LM",
                          bias="none")
        with _peft_quiet():
            model = get_peft_model(lm.model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    args = TrainingArguments(
        output_dir=str(work), per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps, learning_rate=cfg.lr,
        warmup_steps=round(cfg.warmup_ratio * total), lr_scheduler_type="cosine",
        logging_steps=max(1, total // 50),
        eval_strategy="steps" if eval_set else "no", eval_steps=eval_steps,
        save_strategy="steps", save_steps=cfg.save_steps or eval_steps, save_total_limit=2,
        report_to=[], seed=cfg.seed, data_seed=cfg.seed, use_cpu=dev.type == "cpu",
        remove_unused_columns=False, label_names=["labels"], disable_tqdm=False, dataloader_num_workers=0,
    )
    trainer_cls, extra = Trainer, {}
    if teacher is not None:
        trainer_cls = kd_trainer_class()
        extra = dict(teacher=teacher, kept=kept, temperature=cfg.kd_temperature, alpha=cfg.kd_alpha)
    trainer = trainer_cls(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set or None,
                          data_collator=Collator(tok.pad_token_id if tok.pad_token_id is not None else 0),
                          callbacks=callbacks, **extra)
    with contextlib.redirect_stdout(sys.stderr), _writing(work):  # the Trainer prints its logs to stdout
        eval_before = trainer.evaluate()["eval_loss"] if eval_set and resume is None else None
        if eval_before is not None and state.is_main_process:
            (work / "eval_before.json").write_text(json.dumps({"eval_loss": eval_before}) + "\n")
        start = time.perf_counter()
        train_out = trainer.train(resume_from_checkpoint=resume)
        seconds = time.perf_counter() - start
        eval_after = trainer.evaluate()["eval_loss"] if eval_set else None
        weights_dir = work / ("full" if cfg.full else "adapter")
        trainer.save_model(str(weights_dir))  # gathers DeepSpeed / FSDP shards
    if keep is not None:
        keep.remove()
    if resume is not None:  # the evaluation at step 0 happened in the first attempt
        before = work / "eval_before.json"
        eval_before = json.loads(before.read_text())["eval_loss"] if before.is_file() else None
    return _Trained(weights_dir, trainable, train_out, seconds, eval_before, eval_after,
                    list(trainer.state.log_history))


@contextlib.contextmanager
def _writing(work: Path):
    """The Trainer's checkpoint writes: a full disk (an OSError, or torch.save's RuntimeError
    "file write failed") becomes one OutputWriteError; the run resumes from the last whole
    checkpoint once there is room."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        full = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES) if isinstance(e, OSError) \
            else "write failed" in str(e) or "No space left" in str(e)
        if full:
            reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0][:200]
            raise OutputWriteError(f"cannot write the training checkpoints in {work}: {reason}; run the "
                                   "same command again to resume from the last whole checkpoint") from e
        raise


def _config(config: RecoverConfig | None, options: dict) -> RecoverConfig:
    if not options:
        return config or RecoverConfig()
    if config is not None:
        raise ConfigError("give a RecoverConfig or its options as keywords, not both")
    try:
        return RecoverConfig(**options)
    except TypeError as e:
        raise ConfigError(f"bad recover option: {e}") from None


def teacher_dtype_for(teacher_dtype: str, dtype: str, device) -> str:
    """The teacher's dtype: ``auto`` is bfloat16 where the device computes it natively (a CPU
    with AVX512-BF16 / AMX, a CUDA GPU that supports it), else the run's ``dtype``. The teacher
    only runs forward; in bfloat16 it costs 23% of a LoRA step instead of 41% on smollm2-135m
    (docs/recovery.md "Distillation")."""
    if teacher_dtype != "auto":
        return dtype_name(teacher_dtype)
    return "bfloat16" if dtype_name(dtype) != "float16" and fast_bfloat16(device) else dtype_name(dtype)


def _teacher(teacher: str | None, cfg: RecoverConfig, lm, dtype: str):
    """(the teacher LoadedModel, the student -> teacher id map) of a distillation run, else
    (None, None); ConfigError when the teacher does not share the student's vocabulary."""
    if not cfg.kd:
        return None, None
    t = load(teacher, dtype=dtype)
    student_vocab = lm.model.get_output_embeddings().weight.shape[0]
    teacher_vocab = t.model.get_output_embeddings().weight.shape[0]
    kept = vocabulary_map(t.tokenizer, lm.tokenizer, student_vocab, teacher_vocab)
    return t, kept


@releasing_outputs
def recover(model: str, data: str, *, out: str | Path, config: RecoverConfig | None = None,
            teacher: str | None = None, teacher_dtype: str = "auto", device: str = "auto",
            dtype: str = "float32",
            eval_ppl: str | None = "python-stdlib", eval_windows: int = 16, ppl_seq_len: int = 512,
            keep_checkpoints: bool = False, overwrite: bool = False, callbacks: list | None = None,
            save_dtype: str | None = None, **options) -> RecoverResult:
    """Recover ``model`` (a folder or alias) on ``data``, merge, save to ``out``.

    See the module docstring; the training options are a ``RecoverConfig`` (``config``) or
    its fields as keywords (``options``: lora_r, lora_alpha, lora_dropout, targets, lr,
    epochs, max_steps, batch_size, grad_accum, seq_len, eval_fraction, eval_steps,
    save_steps, seed, keep_mask, full, kd, kd_temperature, kd_alpha, data_kind, tokens).
    ``teacher``: the model distilled from with ``kd`` (an alias, folder or hub id; usually
    the model before pruning), loaded in ``teacher_dtype`` (``teacher_dtype_for``).
    ``eval_ppl``: the source whose held-out split gives the
    perplexity before/after (None to skip); ``callbacks``: extra ``TrainerCallback``s;
    ``save_dtype``: the saved weights' dtype (default: the source's).
    ``RecoverResult.report`` is report.json's content (reporting/schema.py ``RecoverReport``)."""
    from accelerate import PartialState

    cfg = _config(config, options)
    if cfg.kd and not teacher:
        raise ConfigError("--kd distills from a teacher: give --teacher MODEL (usually the model before "
                          "pruning)")
    if teacher and not cfg.kd:
        raise ConfigError("--teacher is the model to distill from: add --kd (or drop --teacher)")
    kind = data_kind(data, cfg.data_kind)
    out = check_out(out, overwrite, model, data, eval_ppl, *([teacher] if teacher else []),
                    expected_bytes=weights_bytes(model, save_dtype))
    check_window_sizes(eval_windows, ppl_seq_len)
    state = PartialState()
    work, options, resume = _start(model, data, teacher, out, cfg, overwrite, state)
    dev = resolve_device(device)
    t_dtype = teacher_dtype_for(teacher_dtype, dtype, dev)
    source = _read_data(data, kind, cfg)
    corpus = read_source(eval_ppl) if eval_ppl else None
    lm = load(model, dtype=dtype)
    teacher_lm, kept = _teacher(teacher, cfg, lm, t_dtype)
    inputs = _inputs(lm, data, kind, source, cfg, corpus, eval_windows, ppl_seq_len)
    masks = sparse_masks(lm, cfg.keep_mask)
    before = {"sparsity": decoder_sparsity(lm),
              "ppl": _perplexity(lm, inputs.held, dev) if state.is_main_process else None}
    if state.is_main_process:
        work.mkdir(parents=True, exist_ok=True)
        (work / "recover_options.json").write_text(json.dumps(options, indent=2) + "\n")
    trained = _train(lm, cfg, inputs, work, dev, state, resume, callbacks,
                     teacher=teacher_lm.model if teacher_lm else None, kept=kept, masks=masks)
    state.wait_for_everyone()
    if not state.is_main_process:
        return RecoverResult({}, None)
    chat_template = bool(getattr(lm.tokenizer, "chat_template", None))
    kd = None
    if teacher_lm is not None:
        kd = KDSettings(teacher=display_name(teacher_lm.name), temperature=cfg.kd_temperature,
                        alpha=cfg.kd_alpha, restricted_vocab=None if kept is None else len(kept),
                        teacher_params=count_parameters(teacher_lm.model)[0], teacher_logits="online",
                        teacher_dtype=t_dtype)
    lm.model = teacher_lm = None
    gc.collect()
    merged = _load_full(model, dtype, trained.weights_dir, masks) if cfg.full else \
        _merge(model, dtype, trained.weights_dir, masks)
    report = _report(merged, cfg, inputs, trained, before, masks, dev, state.num_processes, resume,
                     chat_template, kd)
    path = _save(merged, out, overwrite, report, None if cfg.full else trained.weights_dir, save_dtype)
    if not keep_checkpoints:
        shutil.rmtree(work, ignore_errors=True)
    return RecoverResult(report.to_dict(), path)


def _report(merged, cfg: RecoverConfig, inputs: _Inputs, trained: _Trained, before: dict, masks: dict,
            dev, processes: int, resume: str | None, chat_template: bool,
            kd: KDSettings | None) -> RecoverReport:
    """report.json of a recovery (docs/recovery.md "Output")."""
    out, history = trained.train_out, trained.history
    eval_curve = [[0, trained.eval_before]] if trained.eval_before is not None else []
    samples = out.global_step * cfg.batch_size * cfg.grad_accum * processes
    # tokens trained on: exact for code windows (all seq_len long), the mean example length otherwise
    tokens = round(samples * inputs.train_tokens / max(1, len(inputs.train_set)))
    return RecoverReport(
        model=display_name(merged.name),
        source=Source.from_dict(sanitise_source(merged.origin, merged.name), "source"),
        data=RecoverData(spec=display_name(inputs.spec), examples=inputs.examples,
                         train=len(inputs.train_set), eval=len(inputs.eval_set),
                         dropped_no_answer_within_seq_len=inputs.dropped,
                         chat_template=chat_template, kind=inputs.kind, train_tokens=inputs.train_tokens),
        lora=None if cfg.full else LoraSettings(
            r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=list(cfg.targets),
            trainable_params=trained.trainable),
        training=TrainingSettings(epochs=cfg.epochs, max_steps=cfg.max_steps, lr=cfg.lr,
                                  batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, seq_len=cfg.seq_len,
                                  processes=processes, resumed_from=resume,
                                  mode="full" if cfg.full else "lora", trainable_params=trained.trainable,
                                  objective="kd" if kd else "ce"),
        kd=kd,
        steps=out.global_step, samples_seen=samples, tokens_seen=tokens,
        seconds=trained.seconds, tokens_per_second=tokens / trained.seconds if trained.seconds else None,
        train_loss=out.training_loss,
        loss_curve={"train": [[h["step"], h["loss"]] for h in history if "loss" in h],
                    "eval": eval_curve + [[h["step"], h["eval_loss"]] for h in history if "eval_loss" in h]},
        eval_loss_before=trained.eval_before, eval_loss_after=trained.eval_after,
        ppl_before=before["ppl"], ppl_after=_perplexity(merged, inputs.held, dev),
        ppl_protocol=None if inputs.held is None else protocol(inputs.held, display_name(inputs.held.source)),
        sparsity_before=before["sparsity"], sparsity_after=decoder_sparsity(merged), masks_kept=len(masks),
        params_total=count_parameters(merged.model)[0],
        export="trust_remote_code" if needs_modeling_file(merged.model.config) else "plain", device=str(dev),
    )


@contextlib.contextmanager
def _peft_quiet():
    """peft reads transformers' deprecated ``is_gradient_checkpointing``: a FutureWarning that is
    not the user's to act on, hidden around peft's model wrapping."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _merge(model: str, dtype: str, adapter_dir: Path, masks: dict):
    """A fresh copy of ``model`` with the adapter merged in (and its zeros restored)."""
    from peft import PeftModel

    lm = load(model, dtype=dtype)
    try:
        with _peft_quiet():
            peft_model = PeftModel.from_pretrained(lm.model, str(adapter_dir))
    except Exception as e:  # a damaged adapter folder
        raise CorruptModelError(f"cannot read the LoRA adapter in {adapter_dir}: {e}") from e
    lm.model = peft_model.merge_and_unload()
    apply_masks_(lm.model, masks)
    lm.model.eval()
    return lm


def _load_full(model: str, dtype: str, folder: Path, masks: dict):
    """A fresh copy of ``model`` (its config, tokenizer, modeling file) holding the fully
    fine-tuned weights the Trainer saved in ``folder`` (safetensors)."""
    from safetensors.torch import load_file

    lm = load(model, dtype=dtype)
    state: dict[str, torch.Tensor] = {}
    try:
        for f in sorted(folder.glob("*.safetensors")):
            state.update(load_file(f))
    except Exception as e:  # a damaged file
        raise CorruptModelError(f"cannot read the fine-tuned weights in {folder}: {e}") from e
    if not state:
        raise CorruptModelError(f"no fine-tuned weights (*.safetensors) in {folder}")
    missing, unexpected = lm.model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and lm.model.config.tie_word_embeddings}
    if unexpected or set(missing) - tied:
        raise CorruptModelError(f"the fine-tuned weights in {folder} do not fit the model "
                                f"({len(missing)} missing, {len(unexpected)} unexpected)")
    apply_masks_(lm.model, masks)
    lm.model.eval()
    return lm


def _save(lm, out: Path, overwrite: bool, report: RecoverReport, adapter_dir: Path | None,
          save_dtype: str | None = None) -> Path:
    def extra(folder: Path) -> None:
        write_report(folder, report, measure_disk=True)  # before adapter/ and loss.png land
        # the Trainer's training_args.bin is a pickle: codeprune writes none (recover_options.json
        # and report.json hold the settings)
        if adapter_dir is not None:
            shutil.copytree(adapter_dir, folder / "adapter", ignore=shutil.ignore_patterns("*.bin"))
        if report.loss_curve["train"] or report.loss_curve["eval"]:
            from codeprune.reporting.plots import loss_curves  # matplotlib: only when a plot is drawn

            what = "distillation" if report.kd else "recovery"
            how = "full fine-tuning" if report.lora is None else "LoRA"
            loss_curves(report.loss_curve, folder / "loss.png",
                        title=f"{how} {what} of {Path(report.model).name}")

    return save_checkpoint(lm, out, overwrite=overwrite, extra=extra, card=partial(render_model_card, report),
                           save_dtype=save_dtype)
