"""Reports: report.json for machines, report.md for people."""

from __future__ import annotations

from collections import defaultdict


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _scope(r: dict) -> str | None:
    scope = (r.get("method_options") or {}).get("scope")
    return None if scope is None else f"{scope[0]:g}:{scope[1]:g} of depth"


def render_markdown(report: dict) -> str:
    """A short human-readable report of one pruning run."""
    r = report
    lines = [f"# codeprune report: {r.get('method')} on {r.get('model')}", ""]
    rows = [
        ("method", r.get("method")), ("pattern", r.get("pattern")),
        ("sparsity target", r.get("sparsity_target")), ("sparsity actual", r.get("sparsity_actual")),
        ("structure", r.get("structure")), ("bias compensation", r.get("compensation")),
        ("ratio target (decoder parameters)", r.get("ratio_target")),
        ("ratio actual (decoder parameters)", r.get("ratio_actual_decoder")),
        ("target (all parameters)", r.get("target")),
        ("ratio actual (all parameters)", r.get("ratio_actual_total")),
        ("vocabulary", _dense_to_now(r, "vocab_size")), ("layers", _dense_to_now(r, "num_layers")),
        ("dense parameters", r.get("params_dense") if r.get("pruning") in ("structured", "recipe") else None),
        ("parameters", r.get("params_total")), ("non-zero parameters", r.get("params_nonzero")),
        ("perplexity dense", r.get("ppl_dense")), ("perplexity pruned", r.get("ppl_pruned")),
        ("importance", (r.get("method_options") or {}).get("importance")),
        ("layer scope", _scope(r)),
        ("gradient pass (s)", (r.get("gradient_pass") or {}).get("seconds")),
        ("pruning time (s)", r.get("seconds_prune")), ("peak RSS (MB)", r.get("peak_rss_mb")),
        ("device", r.get("device")), ("checkpoint loads with", _EXPORT.get(r.get("export"))),
    ]
    lines += ["| | |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows if v is not None]
    calib = r.get("calibration")
    if calib:
        lines += ["", f"Calibration: `{calib['source']}`, {calib['samples']} windows x "
                  f"{calib['seq_len']} tokens from {calib['documents']} files, seed {calib['seed']}."]
    if r.get("ppl_protocol"):
        lines += ["", f"Perplexity protocol: {r['ppl_protocol']}."]
    if r.get("perplexity"):  # sweep members: every evaluation language
        dense = r.get("perplexity_dense") or {}
        lines += ["", "| evaluated on | ppl | dense ppl |", "|---|---|---|"]
        lines += [f"| {lang} | {e['ppl']:.3f} | {_fmt(dense.get(lang, ''))} |"
                  for lang, e in r["perplexity"].items()]
        first = next(iter(r["perplexity"].values()))
        lines += ["", f"Perplexity protocol: {first['protocol']}."]
    if r.get("stages"):
        lines += _stage_lines(r)
    if r.get("heads_per_layer"):
        lines += _structure_lines(r)
    per_layer = r.get("per_layer") or {}
    if per_layer:
        by_kind = defaultdict(list)
        for name, s in per_layer.items():
            by_kind[name.rsplit(".", 1)[-1]].append(s)
        lines += ["", "| sublayer | modules | mean sparsity |", "|---|---|---|"]
        lines += [f"| {k} | {len(v)} | {sum(v) / len(v):.4f} |" for k, v in by_kind.items()]
    if r.get("efficiency"):
        lines += _efficiency_lines(r["efficiency"])
    energy = r.get("energy_prune")
    if energy:
        lines += ["", f"Energy of the pruning step (estimate, {energy['tool']}): {energy['kwh']:.3g} kWh, "
                  f"{energy['co2_kg']:.3g} kg CO2-eq."]
    for note in r.get("notes", []):
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


def _dense_to_now(r: dict, key: str) -> str | None:
    dense, now = (r.get("dense_shape") or {}).get(key), r.get(key)
    return None if dense is None or now is None else f"{dense:,} -> {now:,}"


def _stage_what(st: dict) -> str:
    """One cell: what a recipe stage removed."""
    if st.get("skipped"):
        return f"skipped: {st['skipped']}"
    if st["stage"] == "vocab":
        return (f"vocabulary {st['vocab_before']:,} -> {st['vocab_after']:,} tokens "
                f"({st['files']} files counted{', capped by its budget' if st.get('capped') else ''})")
    if st["stage"] == "layers":
        return (f"layers {st['layers_before']} -> {st['layers_after']} "
                f"({st['metric']}: removed {st['removed_layers']})")
    if "ffn_per_layer" in st:
        ffn, heads = sorted(set(st["ffn_per_layer"])), sorted(set(st["heads_per_layer"]))
        return (f"{st['method']} {st['structure']}: FFN width {'/'.join(map(str, ffn))}, "
                f"heads {'/'.join(map(str, heads))} per layer")
    return f"{st['method']} {st['pattern']}: sparsity {st['sparsity_actual']:.3f} (zeros, not removed)"


def _stage_lines(r: dict) -> list[str]:
    lines = ["", "## Stages", "", "| # | stage | removed params | % of dense | params after | ppl | what |",
             "|---|---|---|---|---|---|---|"]
    for k, st in enumerate(r["stages"], 1):
        lines.append(f"| {k} | {st['stage']} | {st['removed_params']:,} | {st['removed_fraction']:.2%} | "
                     f"{st['params_after']:,} | {_fmt(st.get('ppl')) if st.get('ppl') is not None else ''} | "
                     f"{_stage_what(st)} |")
    return lines


_EXPORT = {"plain": "plain from_pretrained",
           "trust_remote_code": "from_pretrained(trust_remote_code=True) or codeprune.load"}


def _structure_lines(r: dict) -> list[str]:
    lines = ["", "## Structure", "", "| layer | heads | KV heads | FFN channels |", "|---|---|---|---|"]
    rows = zip(r["heads_per_layer"], r["kv_heads_per_layer"], r["ffn_per_layer"], strict=True)
    lines += [f"| {i} | {h} | {kv} | {f} |" for i, (h, kv, f) in enumerate(rows)]
    dense, pruned = r.get("tokens_per_s_dense"), r.get("tokens_per_s_pruned")
    if dense and pruned:
        lines += ["", "| batch 1 | prefill tok/s | decode tok/s |", "|---|---|---|",
                  f"| dense | {dense['prefill']:.1f} | {dense['decode']:.1f} |",
                  f"| pruned | {pruned['prefill']:.1f} | {pruned['decode']:.1f} |",
                  f"| speed-up | {pruned['prefill'] / dense['prefill']:.2f}x | "
                  f"{pruned['decode'] / dense['decode']:.2f}x |"]
    lines += [f"\nNote: {n}" for n in r.get("structure_notes", [])]
    return lines


def _efficiency_lines(eff: dict) -> list[str]:
    disk = f"{eff['disk_bytes'] / 2**20:.1f} MB" if eff.get("disk_bytes") else "n/a"
    lines = ["", "## Efficiency", "",
             f"Parameters {eff['params_total']:,} ({eff['params_nonzero']:,} non-zero); disk {disk}; "
             f"in memory {eff['bytes_in_memory'] / 2**20:.1f} MB; peak memory {eff['peak_memory_mb']:.0f} MB "
             f"({'max allocated' if str(eff.get('device', '')).startswith('cuda') else 'RSS'}); "
             f"MACs/token {eff['macs_per_token']:,} dense, {eff['macs_per_token_nonzero']:,} non-zero "
             f"(context {eff['macs_context']}).", "",
             "| batch | prefill tok/s | decode tok/s |", "|---|---|---|"]
    for b, sp in eff["speed"].items():
        lines.append(f"| {b.removeprefix('batch_')} | {sp['prefill_tok_s']:.1f} | {sp['decode_tok_s']:.1f} |")
    energy = eff.get("energy")
    if energy:
        lines += ["", f"Energy (estimate, {energy['tool']}): {energy['kwh']:.3g} kWh, "
                  f"{energy['co2_kg']:.3g} kg CO2-eq for the speed measurement."]
    return lines


def render_eval_markdown(result: dict) -> str:
    """report.md of one ``codeprune eval`` run."""
    r = result
    he_cfg = (r.get("humaneval") or {}).get("config", {})
    title = r.get("model") or f"completions {he_cfg.get('completions')}"
    lines = [f"# codeprune eval: {title}", ""]
    if "params_total" in r:
        lines += [f"{r['params_total']:,} parameters, {r['params_nonzero']:,} non-zero; decoder Linear "
                  f"sparsity {r['sparsity']:.4f}.", ""]
    if r.get("perplexity"):
        lines += ["## Perplexity (held-out)", "", "| source | language | ppl | tokens |", "|---|---|---|---|"]
        for src, p in r["perplexity"].items():
            lines.append(f"| `{src}` | {p.get('language') or ''} | {p['ppl']:.3f} | {p['tokens']:,} |")
        first = next(iter(r["perplexity"].values()))
        lines += ["", f"Protocol: {first['protocol']}.", ""]
    he = r.get("humaneval")
    if he:
        cfg = he.get("config", {})
        how = "scored from " + cfg["completions"] if cfg.get("completions") else (
            f"{cfg.get('decoding')}, {cfg.get('samples')} sample(s)/problem, prompt format "
            f"{cfg.get('prompt_format')}, max {cfg.get('max_new_tokens')} new tokens")
        ks = ", ".join(f"{k} {v:.4f}" for k, v in he["pass@k"].items())
        st = he["statuses"]
        box = he.get("sandbox", {})
        lines += ["## HumanEval", "", f"{ks} over {he['n_problems']} problems ({how}).", "",
                  f"Programs: {st['passed']} passed, {st['failed']} failed, {st['timeout']} timed out, "
                  f"{st['error']} errors. Sandbox: {box.get('timeout_s')} s, {box.get('memory_mb')} MB, "
                  f"network {'isolated' if box.get('network_isolated') else 'NOT isolated'}, "
                  f"{'throwaway uid' if box.get('uid_drop') else 'same uid'}.", ""]
    if r.get("efficiency"):
        lines += _efficiency_lines(r["efficiency"])
    return "\n".join(lines).rstrip() + "\n"
