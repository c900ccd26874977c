"""A tiny random Llama written as a float32 .gguf file (the `gguf` package), for cache tests.

    path = write_tiny_gguf(tmp_path / "tiny.gguf")   # ~1.3 MB, dequantizes in about a second
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

D, F, LAYERS, HEADS, KV = 128, 192, 2, 4, 2


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    import gguf

    from ..conftest import _tokenizer

    tok = _tokenizer()
    vocab = tok.backend_tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(256)
    w.add_embedding_length(D)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(F)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(D // HEADS)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_eos_token_id(vocab["<|endoftext|>"])
    w.add_bos_token_id(vocab["<|endoftext|>"])
    rng = np.random.default_rng(seed)

    def rand(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    rand("token_embd.weight", len(tokens), D)
    w.add_tensor("output_norm.weight", np.ones(D, np.float32))
    rand("output.weight", len(tokens), D)
    kv = KV * D // HEADS
    for b in range(LAYERS):
        w.add_tensor(f"blk.{b}.attn_norm.weight", np.ones(D, np.float32))
        w.add_tensor(f"blk.{b}.ffn_norm.weight", np.ones(D, np.float32))
        for name, shape in (("attn_q", (D, D)), ("attn_k", (kv, D)), ("attn_v", (kv, D)),
                            ("attn_output", (D, D)), ("ffn_gate", (F, D)), ("ffn_up", (F, D)),
                            ("ffn_down", (D, F))):
            rand(f"blk.{b}.{name}.weight", *shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
