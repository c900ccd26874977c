"""Reports: report.json for machines, report.md for people."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, non-zero) over unique parameters (tied embeddings counted once)."""
    total = nonzero = 0
    for p in model.parameters():  # parameters() already de-duplicates shared tensors
        total += p.numel()
        nonzero += int(torch.count_nonzero(p).item())
    return total, nonzero


def linear_sparsity(model: nn.Module, linears: list[nn.Linear]) -> tuple[float, dict[str, float]]:
    """(overall sparsity over ``linears``' weights, {module name: sparsity})."""
    names = {id(m): n for n, m in model.named_modules()}
    per_layer, zeros, total = {}, 0, 0
    for lin in linears:
        z = int((lin.weight == 0).sum().item())
        per_layer[names[id(lin)]] = z / lin.weight.numel()
        zeros += z
        total += lin.weight.numel()
    return (zeros / total if total else 0.0), per_layer


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def render_markdown(report: dict) -> str:
    """A short human-readable report of one pruning run."""
    r = report
    lines = [f"# codeprune report: {r.get('method')} on {r.get('model')}", ""]
    rows = [
        ("method", r.get("method")), ("pattern", r.get("pattern")),
        ("sparsity target", r.get("sparsity_target")), ("sparsity actual", r.get("sparsity_actual")),
        ("parameters", r.get("params_total")), ("non-zero parameters", r.get("params_nonzero")),
        ("perplexity dense", r.get("ppl_dense")), ("perplexity pruned", r.get("ppl_pruned")),
        ("pruning time (s)", r.get("seconds_prune")), ("peak RSS (MB)", r.get("peak_rss_mb")),
        ("device", r.get("device")),
    ]
    lines += ["| | |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows if v is not None]
    calib = r.get("calibration")
    if calib:
        lines += ["", f"Calibration: `{calib['source']}`, {calib['samples']} windows x "
                  f"{calib['seq_len']} tokens from {calib['documents']} files, seed {calib['seed']}."]
    if r.get("ppl_protocol"):
        lines += ["", f"Perplexity protocol: {r['ppl_protocol']}."]
    per_layer = r.get("per_layer") or {}
    if per_layer:
        by_kind = defaultdict(list)
        for name, s in per_layer.items():
            by_kind[name.rsplit(".", 1)[-1]].append(s)
        lines += ["", "| sublayer | modules | mean sparsity |", "|---|---|---|"]
        lines += [f"| {k} | {len(v)} | {sum(v) / len(v):.4f} |" for k, v in by_kind.items()]
    for note in r.get("notes", []):
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"
