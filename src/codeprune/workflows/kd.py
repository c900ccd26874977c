"""Knowledge distillation for ``codeprune recover --teacher MODEL --kd``.

    loss = (1 - alpha) * T^2 * KL(p_teacher^T || p_student^T) + alpha * CE(student, data)

per trained position (every next-token position of a code window; the answer
tokens of an instruction example), averaged over the positions of the whole
optimizer step: Hinton et al. 2015 ("Distilling the Knowledge in a Neural
Network"), the T^2 factor keeping the gradient scale of the soft term
independent of the temperature. p^T is the softmax of the logits divided by T.
Minitron (Muralidharan et al. 2024, "Compact Language Models via Pruning and
Knowledge Distillation") distills pruned LLMs with logit KL alone (alpha = 0),
which needs no labels: the default here. The default temperature is 2: on
smollm2-135m FLAP 20% with 16 LoRA steps, T = 1 only tied the same budget of
cross-entropy training on held-out perplexity (28.3 against 28.0) while T = 2
beat it (22.4; docs/recovery.md "Distillation").

A vocabulary-pruned student (Flab-Pruner's vocabulary stage) has a subset of the
teacher's tokens. Its input ids are mapped to the teacher's ids for the same
token strings, and the teacher's distribution is restricted to the kept ids
(its logits gathered there, then renormalised by the softmax): the student is
taught the teacher's preferences among the tokens it can still produce.

The teacher runs online, in evaluation mode and without gradients, on the
student's device, in ``--teacher-dtype``. Caching its top-k logits to disk was
measured against this and not chosen: on a CPU one teacher forward costs 23%
(bfloat16) to 41% (float32) of a LoRA training step on smollm2-135m
(docs/recovery.md "Distillation"), a cache would only pay back from the second
epoch, and a top-k cache changes the loss (the tail of the distribution is dropped).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from codeprune.data.prompts import IGNORE
from codeprune.errors import ConfigError


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
            temperature: float = 1.0, alpha: float = 0.0, kept: torch.Tensor | None = None,
            num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """The distillation loss of one batch (see the module docstring).

    ``student_logits`` [B, L, Vs], ``teacher_logits`` [B, L, Vt], ``labels`` [B, L] (IGNORE
    where no loss is taken; position t predicts labels[t + 1]). ``kept`` [Vs]: the teacher
    id of each student id (a vocabulary-pruned student), else Vs must equal Vt. The sum
    over trained positions is divided by ``num_items`` (the positions of the whole
    optimizer step, the Trainer's ``num_items_in_batch``) when given, else by their count."""
    vs = student_logits.shape[-1]
    # the target of row (b, i) is labels[b, i + 1]; the last position of a row predicts nothing
    target = torch.full_like(labels, IGNORE)
    target[:, :-1] = labels[:, 1:]
    target = target.reshape(-1)
    trained = target != IGNORE
    s, t = student_logits.reshape(-1, vs), teacher_logits.reshape(-1, teacher_logits.shape[-1])
    if trained.float().mean() < 0.5:  # instructions: the answers only (a copy of few rows)
        rows = trained.nonzero().squeeze(1)
        s, t, target, trained = s[rows], t[rows], target[rows], trained[rows]
    # else code windows: every row as a view of the logits (no copy), the last positions weighted 0
    if kept is not None:
        t = t.index_select(-1, kept.to(t.device))
    if s.shape[-1] != t.shape[-1]:
        raise ConfigError(f"the student predicts {s.shape[-1]} tokens and the teacher {t.shape[-1]}: a "
                          "teacher must share the student's vocabulary (or hold it, for a pruned one)")
    s = s.float()
    total = s.new_zeros(())
    if alpha < 1:
        # KL(p_t || p_s) = CE(p_t, p_s) - H(p_t): the soft-target cross-entropy is one fused kernel
        # (its gradient is p_s - p_t), the teacher's entropy a constant computed without gradients
        with torch.no_grad():
            log_t = F.log_softmax(t.float() / temperature, dim=-1)
            p_t = log_t.exp()
            neg_entropy = (p_t * log_t).sum(-1)
            del log_t
        cross = F.cross_entropy(s / temperature if temperature != 1 else s, p_t, reduction="none")
        kl = ((cross + neg_entropy) * trained).sum()
        total = total + (1 - alpha) * temperature ** 2 * kl
    if alpha > 0:
        total = total + alpha * F.cross_entropy(s, target.to(s.device), ignore_index=IGNORE, reduction="sum")
    denom = num_items if num_items is not None else trained.sum()
    return total / torch.as_tensor(denom, device=total.device).clamp(min=1)


def vocabulary_map(teacher_tokenizer, student_tokenizer, student_vocab: int,
                   teacher_vocab: int) -> torch.Tensor | None:
    """``kept`` for ``kd_loss``: the teacher id of each student id, or None when both share
    one vocabulary. ConfigError when the student's tokens are not a subset of the
    teacher's (another model family)."""
    from codeprune.methods.vocab import id_map

    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab == s_vocab:
        if student_vocab != teacher_vocab:
            raise ConfigError(f"the student's output layer has {student_vocab} rows and the teacher's "
                              f"{teacher_vocab} with the same tokenizer: not a teacher for this model")
        return None
    old_to_new = id_map(teacher_tokenizer, student_tokenizer)  # ConfigError for a foreign vocabulary
    kept = torch.full((student_vocab,), -1, dtype=torch.long)
    for old, new in old_to_new.items():
        if new < student_vocab:
            kept[new] = old
    missing = int((kept < 0).sum())
    if missing:
        raise ConfigError(f"{missing} of the student's {student_vocab} output rows have no token of the "
                          "teacher: not a vocabulary-pruned version of the teacher")
    if int(kept.max()) >= teacher_vocab:
        raise ConfigError("the teacher's output layer is smaller than its tokenizer")
    return kept


def kd_trainer_class():
    """The Trainer subclass that distills (built on first use: transformers loads lazily)."""
    from transformers import Trainer

    class KDTrainer(Trainer):
        """A Trainer whose loss is ``kd_loss`` against ``teacher`` (a causal LM, kept frozen).

        The teacher's logits are computed in ``compute_loss`` and the loss itself is the
        Trainer's ``compute_loss_func``, so gradient accumulation, ``num_items_in_batch``
        and multi-process averaging follow the Trainer's own rules."""

        def __init__(self, *args, teacher, kept: torch.Tensor | None, temperature: float, alpha: float,
                     **kwargs):
            super().__init__(*args, compute_loss_func=self._loss, **kwargs)
            self.teacher = teacher.eval().requires_grad_(False)
            self.kept, self.temperature, self.alpha = kept, temperature, alpha
            self._teacher_logits = None

        @torch.no_grad()
        def _teach(self, inputs: dict) -> torch.Tensor:
            ids = inputs["input_ids"]
            device = ids.device
            if next(self.teacher.parameters()).device != device:
                self.teacher.to(device)
            if self.kept is not None:
                self.kept = self.kept.to(device)
                ids = self.kept[ids]  # student ids -> the teacher's ids of the same tokens
            return self.teacher(input_ids=ids, attention_mask=inputs.get("attention_mask")).logits

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self._teacher_logits = self._teach(inputs)
            try:
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            finally:
                self._teacher_logits = None

        def _loss(self, outputs, labels, num_items_in_batch=None):
            return kd_loss(outputs.logits, self._teacher_logits, labels, temperature=self.temperature,
                           alpha=self.alpha, kept=self.kept, num_items=num_items_in_batch)

    return KDTrainer
