"""Every Markdown codeprune writes: report.md of each report kind, compare.md, the runs table.

    from codeprune.reporting.markdown import render
    print(render(report))          # a schema record (reporting/schema.py) or its dict

``render`` dispatches on the report's kind (prune, eval, recover, sweep);
``render_compare`` and ``render_runs`` render the views over many runs
(reporting/analysis.py). Tables go through ``kv_table`` / ``table`` and every
number through ``formatting.fmt``.
"""

from __future__ import annotations

from collections import defaultdict

from codeprune.reporting.formatting import fmt, megabytes
from codeprune.reporting.schema import (
    EvalReport,
    PruneReport,
    RecoverReport,
    Report,
    SweepReport,
    report_from_dict,
)

_EXPORT = {"plain": "plain from_pretrained",
           "trust_remote_code": "from_pretrained(trust_remote_code=True) or codeprune.load"}


def table(header: list[str], rows: list[list]) -> list[str]:
    """A Markdown table; cells that are not strings go through ``fmt``."""
    return (["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
            + ["| " + " | ".join(v if isinstance(v, str) else fmt(v) for v in row) + " |" for row in rows])


def kv_table(rows: list[tuple[str, object]]) -> list[str]:
    """A two-column table of (label, value), rows whose value is None left out."""
    return table(["", ""], [[k, v] for k, v in rows if v is not None])


def render(report: Report | dict) -> str:
    """report.md of ``report``, by its kind."""
    if isinstance(report, dict):
        report = report_from_dict(report)
    by_kind = {"prune": _prune, "eval": _eval, "recover": _recover, "sweep": _sweep}
    return by_kind[report.kind](report)



def _notes(report: Report) -> list[str]:
    return [line for n in report.notes for line in ("", f"Note: {n}")]


def _provenance_line(report: Report) -> list[str]:
    p = report.provenance
    made = f"codeprune {p.codeprune}, torch {p.torch}, transformers {p.transformers}"
    return ["", f"Made by `{p.command}` ({made})." if p.command else f"Made by {made}."]


# -- prune --------------------------------------------------------------------------------------

def _prune(r: PruneReport) -> str:
    options = r.method_options or {}
    scope = options.get("scope")
    rows = [
        ("method", r.method), ("pattern", r.pattern),
        ("sparsity target", r.sparsity_target), ("sparsity actual", r.sparsity_actual),
        ("structure", r.structure), ("bias compensation", r.compensation),
        ("ratio target (decoder parameters)", r.ratio_target),
        ("ratio actual (decoder parameters)", r.ratio_actual_decoder),
        ("target (all parameters)", r.target),
        ("ratio actual (all parameters)", r.ratio_actual_total),
        ("vocabulary", _dense_to_now(r, "vocab_size")), ("layers", _dense_to_now(r, "num_layers")),
        ("dense parameters", r.params_dense if r.pruning in ("structured", "recipe") else None),
        ("parameters", r.params_total), ("non-zero parameters", r.params_nonzero),
        ("perplexity dense", r.ppl_dense), ("perplexity pruned", r.ppl_pruned),
        ("importance", options.get("importance")),
        ("layer scope", None if scope is None else f"{scope[0]:g}:{scope[1]:g} of depth"),
        ("gradient pass (s)", (r.gradient_pass or {}).get("seconds")),
        ("pruning time (s)", r.seconds_prune), ("peak RSS (MB)", r.peak_rss_mb),
        ("device", r.device), ("checkpoint loads with", _EXPORT.get(r.export)),
    ]
    lines = [f"# codeprune report: {r.method} on {r.model}", "", *kv_table(rows)]
    c = r.calibration
    if c:
        lines += ["", f"Calibration: `{c.source}`, {c.samples} windows x {c.seq_len} tokens from "
                  f"{c.documents} files, seed {c.seed}."]
    if r.ppl_protocol:
        lines += ["", f"Perplexity protocol: {r.ppl_protocol}."]
    if r.perplexity:  # sweep members: every evaluation language
        dense = r.perplexity_dense or {}
        rows = [[lang, fmt(e.ppl, ".3f"), dense.get(lang)] for lang, e in r.perplexity.items()]
        lines += ["", *table(["evaluated on", "ppl", "dense ppl"], rows)]
        lines += ["", f"Perplexity protocol: {next(iter(r.perplexity.values())).protocol}."]
    if r.stages:
        lines += _stage_lines(r)
    if r.heads_per_layer:
        lines += _structure_lines(r)
    if r.per_layer:
        by_kind = defaultdict(list)
        for name, s in r.per_layer.items():
            by_kind[name.rsplit(".", 1)[-1]].append(s)
        lines += ["", *table(["sublayer", "modules", "mean sparsity"],
                             [[k, len(v), fmt(sum(v) / len(v), ".4f")] for k, v in by_kind.items()])]
    if r.efficiency:
        lines += _efficiency_lines(r.efficiency)
    if r.energy_prune:
        e = r.energy_prune
        lines += ["", f"Energy of the pruning step (estimate, {e['tool']}): {fmt(e['kwh'], '.3g')} kWh, "
                  f"{fmt(e['co2_kg'], '.3g')} kg CO2-eq."]
    return "\n".join(lines + _notes(r) + _provenance_line(r)) + "\n"


def _dense_to_now(r: PruneReport, key: str) -> str | None:
    dense, now = (r.dense_shape or {}).get(key), getattr(r, key)
    return None if dense is None or now is None else f"{fmt(dense)} -> {fmt(now)}"


def _stage_what(st: dict) -> str:
    """One cell: what a recipe stage removed."""
    if st.get("skipped"):
        return f"skipped: {st['skipped']}"
    if st["stage"] == "vocab":
        return (f"vocabulary {fmt(st['vocab_before'])} -> {fmt(st['vocab_after'])} tokens "
                f"({st['files']} files counted{', capped by its budget' if st.get('capped') else ''})")
    if st["stage"] == "layers":
        return (f"layers {st['layers_before']} -> {st['layers_after']} "
                f"({st['metric']}: removed {st['removed_layers']})")
    if "ffn_per_layer" in st:
        ffn, heads = sorted(set(st["ffn_per_layer"])), sorted(set(st["heads_per_layer"]))
        return (f"{st['method']} {st['structure']}: FFN width {'/'.join(map(str, ffn))}, "
                f"heads {'/'.join(map(str, heads))} per layer")
    sparsity = fmt(st["sparsity_actual"], ".3f")
    return f"{st['method']} {st['pattern']}: sparsity {sparsity} (zeros, not removed)"


def _stage_lines(r: PruneReport) -> list[str]:
    rows = [[str(k), st["stage"], st["removed_params"], fmt(st["removed_fraction"], ".2%"),
             st["params_after"], st.get("ppl"), _stage_what(st)] for k, st in enumerate(r.stages, 1)]
    return ["", "## Stages", "",
            *table(["#", "stage", "removed params", "% of dense", "params after", "ppl", "what"], rows)]


def _structure_lines(r: PruneReport) -> list[str]:
    layers = zip(r.heads_per_layer, r.kv_heads_per_layer, r.ffn_per_layer, strict=True)
    rows = [[str(i), str(h), str(kv), str(f)] for i, (h, kv, f) in enumerate(layers)]
    lines = ["", "## Structure", "", *table(["layer", "heads", "KV heads", "FFN channels"], rows)]
    dense, pruned = r.tokens_per_s_dense, r.tokens_per_s_pruned
    if dense and pruned:
        lines += ["", *table(["batch 1", "prefill tok/s", "decode tok/s"], [
            ["dense", fmt(dense["prefill"], ".1f"), fmt(dense["decode"], ".1f")],
            ["pruned", fmt(pruned["prefill"], ".1f"), fmt(pruned["decode"], ".1f")],
            ["speed-up", f"{fmt(pruned['prefill'] / dense['prefill'], '.2f')}x",
             f"{fmt(pruned['decode'] / dense['decode'], '.2f')}x"]])]
    lines += [f"\nNote: {n}" for n in r.structure_notes or []]
    return lines


def _efficiency_lines(eff) -> list[str]:
    disk = megabytes(eff.disk_bytes) if eff.disk_bytes else "n/a"
    peak = "max allocated" if str(eff.device).startswith("cuda") else "RSS"
    speeds = [[b.removeprefix("batch_"), fmt(sp["prefill_tok_s"], ".1f"), fmt(sp["decode_tok_s"], ".1f")]
              for b, sp in eff.speed.items()]
    lines = ["", "## Efficiency", "",
             f"Parameters {fmt(eff.params_total)} ({fmt(eff.params_nonzero)} non-zero); disk {disk}; "
             f"in memory {megabytes(eff.bytes_in_memory)}; peak memory "
             f"{fmt(eff.peak_memory_mb, '.0f')} MB ({peak}); MACs/token {fmt(eff.macs_per_token)} dense, "
             f"{fmt(eff.macs_per_token_nonzero)} non-zero (context {eff.macs_context}).", "",
             *table(["batch", "prefill tok/s", "decode tok/s"], speeds)]
    if eff.energy:
        e = eff.energy
        lines += ["", f"Energy (estimate, {e['tool']}): {fmt(e['kwh'], '.3g')} kWh, "
                  f"{fmt(e['co2_kg'], '.3g')} kg CO2-eq for the speed measurement."]
    return lines


# -- eval, recover, sweep -------------------------------------------------------------------------

def _eval(r: EvalReport) -> str:
    he = r.humaneval
    title = r.model or f"completions {(he.config if he else {}).get('completions')}"
    lines = [f"# codeprune eval: {title}", ""]
    if r.params_total is not None and r.runtime == "llama.cpp":
        lines += [f"{fmt(r.params_total)} parameters (llama.cpp's count); run in llama.cpp.", ""]
    elif r.params_total is not None:
        lines += [f"{fmt(r.params_total)} parameters, {fmt(r.params_nonzero)} non-zero; decoder Linear "
                  f"sparsity {fmt(r.sparsity, '.4f')}.", ""]
    if r.perplexity:
        lines += ["## Perplexity (held-out)", "",
                  *table(["source", "language", "ppl", "tokens"],
                         [[f"`{src}`", p.language or "", fmt(p.ppl, ".3f"), p.tokens]
                          for src, p in r.perplexity.items()]),
                  "", f"Protocol: {next(iter(r.perplexity.values())).protocol}.", ""]
    if he:
        lines += _humaneval_lines(he)
    if r.efficiency:
        lines += _efficiency_lines(r.efficiency)
    if r.llama_cpp:
        lines += _llama_cpp_lines(r.llama_cpp)
    return "\n".join(lines + _notes(r) + _provenance_line(r)).rstrip() + "\n"


def _llama_cpp_lines(run) -> list[str]:
    sp = run.speed
    return ["", "## llama.cpp", "",
            f"{run.architecture or '?'} GGUF, {run.file_type or '?'}, {megabytes(run.file_bytes)} on disk; "
            f"llama-cpp-python {run.llama_cpp_python or '?'}, {run.threads} threads.", "",
            *table(["batch", "prefill tok/s", "decode tok/s"],
                   [[sp.get("batch_size", 1), fmt(sp["prefill_tok_s"], ".1f"),
                     fmt(sp["decode_tok_s"], ".1f")]]),
            "", f"Prefill: a {sp['prompt_len']}-token prompt; decode: {sp['new_tokens']} greedy steps "
            "from its KV cache; the best of 3 runs."]


def _humaneval_lines(he) -> list[str]:
    cfg = he.config
    how = "scored from " + cfg["completions"] if cfg.get("completions") else (
        f"{cfg.get('decoding')}, {cfg.get('samples')} sample(s)/problem, prompt format "
        f"{cfg.get('prompt_format')}, max {cfg.get('max_new_tokens')} new tokens")
    ks = ", ".join(f"{k} {fmt(v, '.4f')}" for k, v in he.pass_at_k.items())
    st, box = he.statuses, he.sandbox
    return ["## HumanEval", "", f"{ks} over {he.n_problems} problems ({how}).", "",
            f"Programs: {st['passed']} passed, {st['failed']} failed, {st['timeout']} timed out, "
            f"{st['error']} errors. Sandbox: {box.get('timeout_s')} s, {box.get('memory_mb')} MB, "
            f"network {'isolated' if box.get('network_isolated') else 'NOT isolated'}, "
            f"{'throwaway uid' if box.get('uid_drop') else 'same uid'}{_sandbox_files(box)}.", ""]


def _sandbox_files(box: dict) -> str:
    """What held of the sandbox's own file system (evaluation/sandbox.py), for the sandbox line."""
    prot = box.get("protections")
    if not prot:
        return ""  # a report from before the mount namespace
    ipc = ", private IPC (shared memory, message queues)" if prot.get("ipc") else ""
    if not prot.get("minimal_root"):
        return ", host file system visible (no mount namespace)" + ipc
    held = [name for key, name in (("private_tmp", "private /tmp, /var/tmp, /dev/shm"),
                                   ("readonly_root", "read-only root"), ("private_proc", "private /proc"))
            if prot.get(key)]
    return ", minimal root (only the interpreter's files)" + "".join(", " + h for h in held) + ipc


def _recover(r: RecoverReport) -> str:
    d, lora, kd, t = r.data, r.lora, r.kd, r.training
    rows = [
        ("model", r.model), ("data", f"{d.spec} ({d.kind})"),
        ("examples train / eval", f"{d.train} / {d.eval}"),
        ("chat template", d.chat_template),
        ("trained", "every weight (full fine-tuning)" if lora is None else
         f"LoRA r {lora.r} / alpha {lora.alpha} / dropout {lora.dropout}"),
        ("trainable parameters", t.trainable_params if lora is None else lora.trainable_params),
    ]
    if kd is not None:
        rows += [("teacher", kd.teacher),
                 ("KD temperature / alpha (CE weight)", f"{kd.temperature} / {kd.alpha}"),
                 ("teacher distribution", "restricted to the student's "
                  f"{kd.restricted_vocab} tokens" if kd.restricted_vocab else "full vocabulary")]
    rows += [
        ("steps", r.steps), ("samples seen", r.samples_seen), ("tokens seen", r.tokens_seen),
        ("seconds", r.seconds), ("tokens / s", r.tokens_per_second),
        ("eval loss before", r.eval_loss_before), ("eval loss after", r.eval_loss_after),
        ("perplexity before", r.ppl_before), ("perplexity after", r.ppl_after),
        ("sparsity before", r.sparsity_before), ("sparsity after", r.sparsity_after),
        ("Linears kept sparse", r.masks_kept), ("parameters", r.params_total),
        ("checkpoint loads with", _EXPORT.get(r.export)),
    ]
    lines = [f"# codeprune recover: {r.model}", "", *kv_table(rows)]
    if r.ppl_protocol:
        lines += ["", f"Perplexity protocol: {r.ppl_protocol}."]
    tokens = "every next token of the code windows" if d.kind == "code" else "the response tokens"
    loss = (f"the distillation loss ((1 - alpha) T^2 KL(teacher || student) + alpha CE) on {tokens}"
            if kd is not None else f"the mean cross-entropy on {tokens}")
    lines += ["", f"Loss is {loss}; the curve is in loss.png."]
    return "\n".join(lines + _notes(r) + _provenance_line(r)) + "\n"


def _sweep(r: SweepReport) -> str:
    langs = list(r.eval_languages)
    rows = [["dense", *(fmt(r.ppl_dense.get(e), ".3f") for e in langs)]]
    rows += [[c, *(fmt(row.get(e), ".3f") for e in langs)] for c, row in r.ppl_matrix.items()]
    lines = [f"# codeprune sweep: {r.method} {r.pattern} {fmt(r.sparsity)} on {r.model}", "",
             f"{r.samples} calibration windows x {r.seq_len} tokens per language (seed {r.seed}); "
             f"{r.eval_windows} held-out windows per evaluation language. One run folder per "
             f"calibration language: {', '.join(r.members)}.", "",
             "Held-out perplexity, calibration language (rows) x evaluation language (columns):", "",
             *table(["calibrated on", *langs], rows)]
    return "\n".join(lines + _notes(r) + _provenance_line(r)) + "\n"


# -- views over many runs (reporting/analysis.py) -----------------------------------------------

def render_compare(result: dict) -> str:
    """compare.md: the cross-language perplexity matrix and the masks' Jaccard distances."""
    lines = ["# codeprune compare", ""]
    lines += ["Runs: " + ", ".join(f"`{r['label']}` ({r['path']})" for r in result["runs"]) + ".", ""]
    if result.get("ppl"):
        lines += _ppl_matrix_lines(result["ppl"])
    jac = result.get("jaccard")
    if jac:
        labels, types = jac["labels"], jac["types"]
        lines += ["## Mask Jaccard distance (1 - |A∩B| / |A∪B|, True = pruned)", "", "Whole model:", "",
                  *table(["", *labels], [[a, *(fmt(v, ".4f") for v in row)]
                                         for a, row in zip(labels, jac["model"], strict=True)])]
        mean_model = sum(p["model"] for p in jac["pairs"]) / len(jac["pairs"])
        rows = [["**mean**", *(fmt(jac["per_type_mean"][t], ".4f") for t in types), fmt(mean_model, ".4f")]]
        rows += [[f"{p['a']} / {p['b']}", *(fmt(p["per_type"][t], ".4f") for t in types),
                  fmt(p["model"], ".4f")] for p in jac["pairs"]]
        lines += ["", "Per sublayer type (pooled over layers), mean over run pairs and per pair:", "",
                  *table(["pair", *types, "model"], rows)]
        lines += ["", "Per layer (pooled over sublayers, mean over pairs): "
                  + ", ".join(f"{i}: {fmt(d, '.3f')}" for i, d in enumerate(jac["per_layer_mean"])) + ".", ""]
    return "\n".join(lines + _figures_and_skipped(result)).rstrip() + "\n"


def _ppl_matrix_lines(pm: dict) -> list[str]:
    cols = pm["cols"]
    best = [min((row[j] for row in pm["matrix"] if row[j] is not None), default=None)
            for j in range(len(cols))]
    rows = [["dense", *(fmt(pm["dense"].get(c), ".3f") for c in cols)]] if pm["dense"] else []
    for label, row in zip(pm["rows"], pm["matrix"], strict=True):
        rows.append([label, *(f"**{fmt(v, '.3f')}**" if v is not None and v == best[j] else fmt(v, ".3f")
                              for j, v in enumerate(row))])
    lines = ["## Perplexity: calibration language (rows) x evaluation language (columns)", "",
             "Held-out perplexity; the best sub-model for each evaluation language is in bold.", "",
             *table(["calibrated on", *cols], rows)]
    own = [(j, c) for j, c in enumerate(cols) if c in pm["rows"]]
    if own:
        wins = sum(pm["matrix"][pm["rows"].index(c)][j] == best[j] for j, c in own)
        lines += ["", f"The sub-model calibrated on a language is the best on that language in "
                  f"{wins} of {len(own)} languages."]
    return lines + [""]


def _figures_and_skipped(result: dict) -> list[str]:
    lines = []
    if result.get("figures"):
        lines += ["Figures: " + ", ".join(f"[{f}]({f})" for f in result["figures"]) + ".", ""]
    return lines + [f"- skipped {s}" for s in result.get("skipped", [])]


RUN_COLUMNS = [("run", None), ("model", None), ("method", None), ("pattern", None), ("calibration", None),
               ("sparsity", ".3f"), ("params_nonzero", ","), ("compression", ".3f"), ("ppl", ".3f"),
               ("ppl_dense", ".3f"), ("pass@1", ".3f"), ("decode_tok_s", ".1f"), ("disk_mb", ".1f")]


def render_runs(result: dict) -> str:
    """report.md of ``codeprune report``: one row per run."""
    rows = [[fmt(row[c], spec) for c, spec in RUN_COLUMNS] for row in result["runs"]]
    lines = ["# codeprune report", "", *table([c for c, _ in RUN_COLUMNS], rows)]
    lines += ["", "ppl: held-out perplexity on the run's calibration source (prune runs) or its first "
              "evaluation source; compression: 1 - non-zero parameters / dense parameters; decode tok/s at "
              "batch 1.", ""]
    return "\n".join(lines + _figures_and_skipped(result)).rstrip() + "\n"
