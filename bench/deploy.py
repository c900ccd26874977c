"""Benchmark: pruned models deployed in llama.cpp -- file size, speed and perplexity per GGUF type.

For each result (dense, Wanda 50%, FLAP 20% uniform, FLAP 20% adaptive, LLM-Pruner
(Taylor) 20%, Flab-Pruner 22%), pruned once and saved (runs are reused when present):

  transformers   held-out perplexity of the checkpoint on python-stdlib (the windows
                 every row shares), and the time to write its safetensors
  per GGUF type  export time and file size; llama.cpp perplexity on the same token
                 windows (a vocabulary-pruned model: remapped, per original token);
                 llama.cpp prefill / decode tokens/s at batch 1, threads = cores

and prints one Markdown table for the targets: f16 perplexity within 1% of transformers'
(q8_0 within 2%); the decode speed-up of structured results >= 95% of the decoder's
parameter ratio (the per-token ratio, decoder + output matrix, is what bounds it: the
output matrix is not pruned); export < 1.5x the safetensors write. Runs alone (2 cores shared make
timings meaningless).

    .venv/bin/python bench/deploy.py                                  # qwen2.5-coder-0.5b
    .venv/bin/python bench/deploy.py --model smollm2-135m --rows dense,flap-adaptive --types f16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROWS = {  # name -> codeprune.prune arguments
    "dense": None,
    "wanda-50": dict(method="wanda", sparsity=0.5),
    "flap-20-uniform": dict(method="flap", ratio=0.2, structure="uniform", compensation=True),
    "flap-20-adaptive": dict(method="flap", ratio=0.2, structure="adaptive", compensation=True),
    "taylor-20": dict(method="taylor", ratio=0.2),
    "flab-22": dict(recipe="flab", target=0.22),
}


def decoder_params(lm) -> int:
    return sum(p.numel() for layer in lm.adapter.layers() for p in layer.parameters())


def per_token_params(lm) -> int:
    """The weights one decoded token multiplies: the decoder layers and the output matrix
    (the embedding is a lookup)."""
    return decoder_params(lm) + lm.adapter.lm_head().weight.numel()


def prepare(args, name: str, runs: Path):
    """The saved checkpoint of one row (pruned now, or reused), and seconds to save it."""
    import codeprune
    from codeprune.models.checkpoint import save_checkpoint

    folder = runs / name
    if not (folder / "config.json").is_file():
        kwargs = ROWS[name]
        if kwargs is None:
            lm = codeprune.load(args.model)
        else:
            lm = codeprune.prune(args.model, calib="python-stdlib", samples=args.samples, seq_len=256,
                                 eval_ppl=False, efficiency=False, **kwargs).model
        save_checkpoint(lm, folder, save_dtype="float32")
    lm = codeprune.load(str(folder))
    start = time.perf_counter()
    save_checkpoint(lm, runs / ".write-test", overwrite=True, save_dtype="float16")
    seconds = time.perf_counter() - start
    return lm, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--types", default="f16,q8_0,q4_0")
    ap.add_argument("--runs", default="runs/deploy", help="where checkpoints and GGUF files go")
    ap.add_argument("--samples", type=int, default=32, help="calibration windows of 256 tokens")
    ap.add_argument("--windows", type=int, default=8, help="held-out windows of 512 tokens")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--keep", action="store_true", help="keep the GGUF files (several GB for 0.5B)")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in RUNS/rows.jsonl")
    ap.add_argument("--rows-file", help=argparse.SUPPRESS)
    args = ap.parse_args()

    import codeprune
    from codeprune.data import heldout_windows, read_source
    from codeprune.evaluation.llamacpp import LlamaCpp, default_threads
    from codeprune.evaluation.perplexity import perplexity, perplexity_remapped
    from codeprune.methods.vocab import id_map, make_remap
    from codeprune.models.gguf_export import export_gguf, plan_export
    from codeprune.models.offline import source_gguf_kv

    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    dense = codeprune.load(args.model)
    held = heldout_windows(dense.tokenizer, read_source("python-stdlib"), seq_len=512,
                           max_windows=args.windows)
    dense_decoder = decoder_params(dense)
    rows, base_decode = [], {}
    done = Path(args.rows_file) if args.rows_file else runs / "rows.jsonl"
    if args.resume and done.is_file():  # rows measured by an earlier, interrupted run
        rows = [json.loads(line) for line in done.read_text().splitlines() if line.strip()]
        base_decode = {r["type"]: r["decode"] for r in rows if r["model"] == "dense"}
    for name in args.rows.split(","):
        if {(name, t) for t in args.types.split(",")} <= {(r["model"], r["type"]) for r in rows}:
            continue
        lm, write_s = prepare(args, name, runs)
        remap = None
        if len(lm.tokenizer) != len(dense.tokenizer):
            remap = make_remap(dense.tokenizer, lm.tokenizer, id_map(dense.tokenizer, lm.tokenizer))
        hf = (perplexity_remapped(lm, held, remap) if remap else perplexity(lm, held))["ppl"]
        kv = source_gguf_kv(args.model) if remap is None else {}
        ratio = dense_decoder / decoder_params(lm)
        compute_ratio = per_token_params(dense) / per_token_params(lm)
        for qtype in args.types.split(","):
            path = runs / f"{name}.{qtype}.gguf"
            plan = plan_export(lm, qtype, source_metadata=kv)
            start = time.perf_counter()
            export_gguf(lm, path, plan=plan, overwrite=True, progress=False)
            export_s = time.perf_counter() - start
            n_ctx = max([512] + [len(remap(row)) for row in held.input_ids.tolist()] if remap else [512])
            with LlamaCpp(path, n_ctx=n_ctx) as rt:
                ppl = rt.perplexity(held, remap=remap)["ppl"]
                speed = rt.speed(prompt_len=128, new_tokens=128, repeats=5)
            if name == "dense":
                base_decode[qtype] = speed["decode_tok_s"]
            speedup = speed["decode_tok_s"] / base_decode[qtype] if qtype in base_decode else None
            row = {"model": name, "type": qtype, "arch": plan.arch, "mib": path.stat().st_size / 2**20,
                   "ppl_hf": hf, "ppl_llama_cpp": ppl, "ppl_gap": ppl / hf - 1,
                   "prefill": speed["prefill_tok_s"], "decode": speed["decode_tok_s"],
                   "decode_speedup": speedup, "param_ratio": ratio, "compute_ratio": compute_ratio,
                   "export_s": export_s,
                   "safetensors_s": write_s, "fallbacks": len(plan.fallbacks),
                   "padded_channels": plan.padded_channels}
            rows.append(row)
            with done.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
            if not args.keep:
                path.unlink()
    print(f"\n{args.model}, python-stdlib held-out: {args.windows} windows x 512 tokens; "
          f"llama.cpp batch 1, {default_threads()} threads\n")
    print("| model | type | llama.cpp arch | MiB | ppl transformers | ppl llama.cpp | gap | prefill tok/s "
          "| decode tok/s | decode speed-up | decoder param ratio | per-token param ratio | export s "
          "| safetensors s |")
    print("|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        sp = f"{r['decode_speedup']:.2f}x" if r["decode_speedup"] else ""
        print(f"| {r['model']} | {r['type']} | {r['arch']} | {r['mib']:.0f} | {r['ppl_hf']:.3f} | "
              f"{r['ppl_llama_cpp']:.3f} | {100 * r['ppl_gap']:+.2f}% | {r['prefill']:.0f} | "
              f"{r['decode']:.1f} | {sp} | {r['param_ratio']:.2f}x | {r['compute_ratio']:.2f}x | "
              f"{r['export_s']:.1f} | "
              f"{r['safetensors_s']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
