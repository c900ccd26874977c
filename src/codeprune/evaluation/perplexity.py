"""Perplexity over held-out windows, token-weighted.

Protocol: non-overlapping windows of L tokens (stride L) from a source's
held-out split; each window is scored on its own (no context carried between
windows), predicting tokens 2..L; perplexity = exp(total NLL / total predicted
tokens). Logits are computed in chunks of tokens so a 150k vocabulary never
materialises (B, L, V) at once, through the adapter (``adapter.logits``: final
norm, lm_head and the family's logit soft-capping, as the model's own forward).

A non-finite NLL (nan/inf logits: corrupt weights, or an overflow in float16) or a
perplexity beyond float range raises NonFiniteOutputError naming the model, at the
first batch that shows it: a report never holds ``nan``. Every perplexity codeprune
reports (prune, sweep, recover, eval) comes from the two functions below.

    codeprune eval --model runs/wanda50 --ppl python-stdlib --seq-len 512
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from codeprune.calibration.engine import forward_layers
from codeprune.data.calibration import TokenWindows
from codeprune.errors import CorruptModelError
from codeprune.models.loading import LoadedModel

_LOGIT_CHUNK = 512  # tokens per logits call: (512, vocab) float32 logits stay small


class NonFiniteOutputError(CorruptModelError):
    """A model whose logits (hence NLL or perplexity) are nan or inf on an evaluation source."""


def check_finite(lm: LoadedModel, nll: float, source: str, what: str = "logits") -> None:
    """Raise NonFiniteOutputError naming ``lm`` when ``nll`` (a sum or a mean) is nan or inf."""
    if math.isfinite(nll):
        return
    dtype = str(next(lm.model.parameters()).dtype).removeprefix("torch.")
    hint = ("load it in float32 (--dtype float32), or check the checkpoint" if dtype != "float32"
            else "check the checkpoint (a cached offline model: `codeprune models --verify`)")
    raise NonFiniteOutputError(f"model '{lm.name}' gives non-finite {what} (nan/inf) on {source}: its "
                               f"weights are corrupt or overflow in {dtype}; {hint}")


def _where(windows: TokenWindows, desc: str) -> str:
    """The source, and the caller's label of the pass when it has one ("ppl pruned")."""
    return f"'{windows.source}'" + (f" ({desc})" if desc != "perplexity" else "")


def _result(lm: LoadedModel, total_nll: float, tokens: int, source: str) -> tuple[float, float]:
    """(nll per token, ppl), both finite, or NonFiniteOutputError."""
    nll = total_nll / tokens
    check_finite(lm, nll, source)
    if nll > 700:  # exp overflows a float64 past ~709.8
        check_finite(lm, math.inf, source, what=f"perplexity (NLL {nll:.0f} per token)")
    return nll, math.exp(nll)


@torch.no_grad()
def perplexity(lm: LoadedModel, windows: TokenWindows, *, batch_size: int = 4,
               desc: str = "perplexity", offload_device: str | torch.device | None = None) -> dict:
    """{"ppl", "nll", "tokens", "windows", "seq_len"} of ``lm`` on ``windows``.

    Runs where the model's parameters are; with ``offload_device`` the model
    stays on the CPU and the decoder layers run one at a time on that device
    (the sequential engine), the final norm and lm_head on the CPU."""
    adapter = lm.adapter
    ids_all = windows.input_ids
    if offload_device is not None:
        layer_out = iter(forward_layers(lm, ids_all, device=offload_device, offload=True,
                                        batch_size=batch_size))
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, ids_all.shape[0], batch_size), desc=desc, leave=False):
        ids = ids_all[start:start + batch_size].to(adapter.lm_head().weight.device)  # (B, L)
        if offload_device is None:  # the decoder's output has the final norm applied
            hidden, normed = adapter.decoder(input_ids=ids, use_cache=False).last_hidden_state, True
        else:
            hidden, normed = next(layer_out).to(ids.device), False  # (B, L, D)
        target = ids[:, 1:].reshape(-1)
        total_nll += _nll_sum(adapter, hidden[:, :-1].reshape(-1, hidden.shape[-1]), target, normed=normed)
        total_tokens += target.numel()
        check_finite(lm, total_nll, _where(windows, desc))  # stop at the first bad batch
    nll, ppl = _result(lm, total_nll, total_tokens, _where(windows, desc))
    return {"ppl": ppl, "nll": nll, "tokens": total_tokens,
            "windows": ids_all.shape[0], "seq_len": windows.seq_len}


def _nll_sum(adapter, hidden: torch.Tensor, target: torch.Tensor, *, normed: bool) -> float:
    """Summed next-token NLL of ``target`` (T,) from ``hidden`` (T, D), logits in chunks
    (``normed``: ``hidden`` already went through the final norm)."""
    total = 0.0
    for c in range(0, hidden.shape[0], _LOGIT_CHUNK):
        logits = adapter.logits(hidden[c:c + _LOGIT_CHUNK], normed=normed).float()
        total += F.cross_entropy(logits, target[c:c + _LOGIT_CHUNK], reduction="sum").item()
    return total


def protocol(windows: TokenWindows, source: str | None = None) -> str:
    """How ``windows`` were cut and scored, in words; ``source``: how to name their source (a
    report passes the spec without local paths)."""
    return (f"held-out split of '{source or windows.source}' ({windows.n_documents} files, never used for "
            f"calibration; each file contributes one slice of at most {windows.seq_len} tokens at a "
            f"fixed pseudo-random offset), "
            f"{windows.samples} non-overlapping windows of {windows.seq_len} tokens, stride "
            f"{windows.seq_len}, no context carried across windows, token-weighted mean NLL "
            f"over {windows.seq_len - 1} predictions per window, ppl = exp(NLL)")


@torch.no_grad()
def perplexity_remapped(lm: LoadedModel, windows: TokenWindows, remap, *, desc: str = "perplexity") -> dict:
    """Perplexity of a model whose vocabulary was pruned, on windows cut by the *original*
    tokenizer, so that it compares with the dense model's figure.

    ``remap(ids) -> ids`` rewrites one window for the pruned tokenizer (methods.vocab.remap_ids):
    the same bytes, where a removed token becomes several kept ones. Each window's
    NLL is summed over all of its predictions and divided by the window's *original*
    prediction count (L - 1): perplexity per original token, the text's total
    probability spread over the same denominator as the dense model's."""
    adapter = lm.adapter
    total_nll, model_tokens = 0.0, 0
    for row in tqdm(windows.input_ids, desc=desc, leave=False):
        ids = torch.tensor(remap(row), dtype=torch.long, device=adapter.lm_head().weight.device)[None]
        hidden = adapter.decoder(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]
        total_nll += _nll_sum(adapter, hidden, ids[0, 1:], normed=True)
        model_tokens += ids.shape[1] - 1
        check_finite(lm, total_nll, _where(windows, desc))
    tokens = windows.samples * (windows.seq_len - 1)
    nll, ppl = _result(lm, total_nll, tokens, _where(windows, desc))
    return {"ppl": ppl, "nll": nll, "tokens": tokens, "model_tokens": model_tokens,
            "windows": windows.samples, "seq_len": windows.seq_len, "per": "original token"}
