"""LoRA recovery of a pruned model (``codeprune recover``), with peft and the HF Trainer.

    codeprune recover --model runs/t20 --data data/instr.jsonl --out runs/t20-rec
    accelerate launch -m codeprune recover --model runs/t20 --data data/instr.jsonl --out runs/t20-rec

Flow:
1. Read the instruction set (data/instructions.py) and split it: pinned "split"
   fields first, else a hash of each example's id (``eval_fraction``).
2. Render each example with the tokenizer's chat template when it has one (else
   a plain "### Instruction / ### Response" layout); the loss is taken on the
   assistant tokens only (labels -100 elsewhere), truncated to ``seq_len``.
3. LoRA (r=8, alpha=16, dropout 0.05 on q/k/v/o/gate/up/down by default) through
   the Trainer: ``accelerate launch`` (DDP, DeepSpeed, FSDP) works unchanged.
   Checkpoints go to ``OUT.checkpoints/``; running the same command again after
   an interruption resumes from the last one (options must match).
4. The adapter is saved (``trainer.save_model``, which gathers sharded weights),
   then, on the main process only, merged into a fresh copy of the model. A
   sparse model (any decoder Linear with >= 1% exact zeros, Wanda / SparseGPT /
   N:M) gets its zeros back after the merge: sparsity and pattern are exactly
   those before recovery.
5. ``OUT`` holds a plain checkpoint (with modeling_codeprune.py when the pruned
   model needed it), the adapter (``adapter/``), report.json / report.md and
   loss.png; held-out perplexity and evaluation loss are measured before and
   after.
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
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from codeprune.calibration.devices import place_model, resolve_device
from codeprune.data import heldout_windows, read_source
from codeprune.data.calibration import check_window_sizes
from codeprune.data.instructions import EVAL_FRACTION, read_instructions
from codeprune.data.prompts import Collator, encode_all
from codeprune.errors import ConfigError, CorruptModelError, OutputWriteError
from codeprune.evaluation.perplexity import perplexity, protocol
from codeprune.models.adapters.base import DecoderAdapter
from codeprune.models.checkpoint import needs_modeling_file, save_checkpoint
from codeprune.models.counting import count_parameters, decoder_sparsity
from codeprune.options import opt
from codeprune.reporting.model_card import render_model_card
from codeprune.reporting.provenance import display_name, sanitise_source
from codeprune.reporting.schema import LoraSettings, RecoverData, RecoverReport, Source, TrainingSettings
from codeprune.reporting.writer import write_report
from codeprune.workflows.common import check_out, load, releasing_outputs, weights_bytes

LORA_TARGETS = DecoderAdapter.sublayer_names  # canonical names; the adapter maps them to module names
MASK_MIN_SPARSITY = 0.01  # a Linear with at least this share of exact zeros keeps them after the merge


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
                         ">= 1% zeros)", choices=("auto", "always", "never"))

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
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self.targets = tuple(self.targets)


def sparse_masks(lm, mode: str = "auto") -> dict[str, torch.Tensor]:
    """{module name: bool mask of the kept weights} of the decoder Linears to keep sparse."""
    if mode == "never":
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
        modules[name].weight.masked_fill_(~kept, 0)


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
    """The encoded instruction set and the held-out perplexity windows of one run."""

    spec: str
    examples: int
    train_set: list[dict]
    eval_set: list[dict]
    dropped: int
    held: object  # held-out windows, or None


@dataclass
class _Trained:
    """What training left: the adapter and the figures the report needs."""

    adapter_dir: Path
    trainable: int
    train_out: object  # transformers TrainOutput
    seconds: float
    eval_before: float | None
    eval_after: float | None
    history: list[dict]


def _start(model: str, data: str, out, cfg: RecoverConfig, overwrite: bool, state) -> tuple[Path, dict,
                                                                                              str | None]:
    """(work folder, options, checkpoint to resume from): refused before minutes of loading when
    an interrupted run in the work folder had other options."""
    work = _work_dir(out)
    options = {"model": str(model), "data": data, **asdict(cfg), "targets": list(cfg.targets)}
    if overwrite and state.is_main_process:
        shutil.rmtree(work, ignore_errors=True)  # start afresh: nothing to resume
    state.wait_for_everyone()
    return work, options, _check_resume(work, options)


def _inputs(lm, data: str, instructions, cfg: RecoverConfig, corpus, eval_windows: int,
            ppl_seq_len: int) -> _Inputs:
    """Split and encode the instruction set; cut the held-out perplexity windows."""
    train_ex, eval_ex = instructions.split(cfg.eval_fraction)
    train_set, dropped_train = encode_all(lm.tokenizer, train_ex, cfg.seq_len)
    eval_set, dropped_eval = encode_all(lm.tokenizer, eval_ex, cfg.seq_len)
    if not train_set:
        raise ConfigError(f"no training example keeps an answer token within seq len {cfg.seq_len}")
    held = heldout_windows(lm.tokenizer, corpus, seq_len=ppl_seq_len, max_windows=eval_windows) \
        if corpus else None
    return _Inputs(data, len(instructions.examples), train_set, eval_set, dropped_train + dropped_eval, held)


def _train(lm, cfg: RecoverConfig, inputs: _Inputs, work: Path, dev, state, resume: str | None,
           callbacks: list | None) -> _Trained:
    """LoRA through the HF Trainer (resumed from ``resume``); the adapter saved in ``work/adapter``."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    tok, train_set, eval_set = lm.tokenizer, inputs.train_set, inputs.eval_set
    steps_per_epoch = math.ceil(len(train_set) / (cfg.batch_size * cfg.grad_accum * state.num_processes))
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * steps_per_epoch)
    eval_steps = cfg.eval_steps or max(1, total // 5)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=lm.adapter.lora_target_modules(cfg.targets), task_type="CAUSAL_LM",
                      bias="none")
    peft_model = get_peft_model(lm.model, lora)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
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
    trainer = Trainer(model=peft_model, args=args, train_dataset=train_set, eval_dataset=eval_set or None,
                      data_collator=Collator(tok.pad_token_id if tok.pad_token_id is not None else 0),
                      callbacks=callbacks)
    with contextlib.redirect_stdout(sys.stderr), _writing(work):  # the Trainer prints its logs to stdout
        eval_before = trainer.evaluate()["eval_loss"] if eval_set and resume is None else None
        if eval_before is not None and state.is_main_process:
            (work / "eval_before.json").write_text(json.dumps({"eval_loss": eval_before}) + "\n")
        start = time.perf_counter()
        train_out = trainer.train(resume_from_checkpoint=resume)
        seconds = time.perf_counter() - start
        eval_after = trainer.evaluate()["eval_loss"] if eval_set else None
        adapter_dir = work / "adapter"
        trainer.save_model(str(adapter_dir))  # gathers DeepSpeed / FSDP shards
    if resume is not None:  # the evaluation at step 0 happened in the first attempt
        before = work / "eval_before.json"
        eval_before = json.loads(before.read_text())["eval_loss"] if before.is_file() else None
    return _Trained(adapter_dir, trainable, train_out, seconds, eval_before, eval_after,
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


@releasing_outputs
def recover(model: str, data: str, *, out: str | Path, config: RecoverConfig | None = None,
            device: str = "auto", dtype: str = "float32", eval_ppl: str | None = "python-stdlib",
            eval_windows: int = 16, ppl_seq_len: int = 512, keep_checkpoints: bool = False,
            overwrite: bool = False, callbacks: list | None = None,
            save_dtype: str | None = None, **options) -> RecoverResult:
    """LoRA-tune ``model`` (a folder or alias) on instruction ``data``, merge, save to ``out``.

    See the module docstring; the training options are a ``RecoverConfig`` (``config``) or
    its fields as keywords (``options``: lora_r, lora_alpha, lora_dropout, targets, lr,
    epochs, max_steps, batch_size, grad_accum, seq_len, eval_fraction, eval_steps,
    save_steps, seed, keep_mask, ...). ``eval_ppl``: the source whose held-out split gives
    the perplexity before/after (None to skip); ``callbacks``: extra ``TrainerCallback``s;
    ``save_dtype``: the saved weights' dtype (default: the source's).
    ``RecoverResult.report`` is report.json's content (reporting/schema.py ``RecoverReport``)."""
    from accelerate import PartialState

    cfg = _config(config, options)
    out = check_out(out, overwrite, model, data, eval_ppl,
                    expected_bytes=weights_bytes(model, save_dtype))
    check_window_sizes(eval_windows, ppl_seq_len)
    state = PartialState()
    work, options, resume = _start(model, data, out, cfg, overwrite, state)
    dev = resolve_device(device)
    instructions = read_instructions(data)
    corpus = read_source(eval_ppl) if eval_ppl else None
    lm = load(model, dtype=dtype)
    inputs = _inputs(lm, data, instructions, cfg, corpus, eval_windows, ppl_seq_len)
    masks = sparse_masks(lm, cfg.keep_mask)
    before = {"sparsity": decoder_sparsity(lm),
              "ppl": _perplexity(lm, inputs.held, dev) if state.is_main_process else None}
    if state.is_main_process:
        work.mkdir(parents=True, exist_ok=True)
        (work / "recover_options.json").write_text(json.dumps(options, indent=2) + "\n")
    trained = _train(lm, cfg, inputs, work, dev, state, resume, callbacks)
    state.wait_for_everyone()
    if not state.is_main_process:
        return RecoverResult({}, None)
    chat_template = bool(getattr(lm.tokenizer, "chat_template", None))
    lm.model = None
    gc.collect()
    merged = _merge(model, dtype, trained.adapter_dir, masks)
    report = _report(merged, cfg, inputs, trained, before, masks, dev, state.num_processes, resume,
                     chat_template)
    path = _save(merged, out, overwrite, report, trained.adapter_dir, save_dtype)
    if not keep_checkpoints:
        shutil.rmtree(work, ignore_errors=True)
    return RecoverResult(report.to_dict(), path)


def _report(merged, cfg: RecoverConfig, inputs: _Inputs, trained: _Trained, before: dict, masks: dict,
            dev, processes: int, resume: str | None, chat_template: bool) -> RecoverReport:
    """report.json of a recovery (docs/recovery.md "Output")."""
    out, history = trained.train_out, trained.history
    eval_curve = [[0, trained.eval_before]] if trained.eval_before is not None else []
    return RecoverReport(
        model=display_name(merged.name),
        source=Source.from_dict(sanitise_source(merged.origin, merged.name), "source"),
        data=RecoverData(spec=display_name(inputs.spec), examples=inputs.examples,
                         train=len(inputs.train_set), eval=len(inputs.eval_set),
                         dropped_no_answer_within_seq_len=inputs.dropped,
                         chat_template=chat_template),
        lora=LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                          targets=list(cfg.targets), trainable_params=trained.trainable),
        training=TrainingSettings(epochs=cfg.epochs, max_steps=cfg.max_steps, lr=cfg.lr,
                                  batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, seq_len=cfg.seq_len,
                                  processes=processes, resumed_from=resume),
        steps=out.global_step, samples_seen=out.global_step * cfg.batch_size * cfg.grad_accum * processes,
        seconds=trained.seconds, train_loss=out.training_loss,
        loss_curve={"train": [[h["step"], h["loss"]] for h in history if "loss" in h],
                    "eval": eval_curve + [[h["step"], h["eval_loss"]] for h in history if "eval_loss" in h]},
        eval_loss_before=trained.eval_before, eval_loss_after=trained.eval_after,
        ppl_before=before["ppl"], ppl_after=_perplexity(merged, inputs.held, dev),
        ppl_protocol=None if inputs.held is None else protocol(inputs.held, display_name(inputs.held.source)),
        sparsity_before=before["sparsity"], sparsity_after=decoder_sparsity(merged), masks_kept=len(masks),
        params_total=count_parameters(merged.model)[0],
        export="trust_remote_code" if needs_modeling_file(merged.model.config) else "plain", device=str(dev),
    )


def _merge(model: str, dtype: str, adapter_dir: Path, masks: dict):
    """A fresh copy of ``model`` with the adapter merged in (and its zeros restored)."""
    from peft import PeftModel

    lm = load(model, dtype=dtype)
    try:
        peft_model = PeftModel.from_pretrained(lm.model, str(adapter_dir))
    except Exception as e:  # a damaged adapter folder
        raise CorruptModelError(f"cannot read the LoRA adapter in {adapter_dir}: {e}") from e
    lm.model = peft_model.merge_and_unload()
    apply_masks_(lm.model, masks)
    lm.model.eval()
    return lm


def _save(lm, out: Path, overwrite: bool, report: RecoverReport, adapter_dir: Path,
          save_dtype: str | None = None) -> Path:
    def extra(folder: Path) -> None:
        write_report(folder, report, measure_disk=True)  # before adapter/ and loss.png land
        # the Trainer's training_args.bin is a pickle: codeprune writes none (recover_options.json
        # and report.json hold the settings)
        shutil.copytree(adapter_dir, folder / "adapter", ignore=shutil.ignore_patterns("*.bin"))
        if report.loss_curve["train"] or report.loss_curve["eval"]:
            from codeprune.reporting.plots import loss_curves  # matplotlib: only when a plot is drawn

            loss_curves(report.loss_curve, folder / "loss.png",
                        title=f"LoRA recovery of {Path(report.model).name}")

    return save_checkpoint(lm, out, overwrite=overwrite, extra=extra, card=partial(render_model_card, report),
                           save_dtype=save_dtype)

