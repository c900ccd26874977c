"""Write a (pruned) model as one GGUF file that llama.cpp, ollama and LM Studio run.

    plan = plan_export(lm, "q8_0")           # checks first: architecture, tokenizer, type
    export_gguf(lm, "runs/q-flap-20.gguf", plan=plan)

Which llama.cpp architecture a model is written as (``plan_export``):

- every layer the same size, no biases the family lacks: the family's own
  (``DecoderAdapter.gguf_arch``: llama for Llama / Mistral, qwen2, qwen3);
- layers of different sizes (adaptive FLAP, LLM-Pruner) or compensation biases on
  o_proj / down_proj (FLAP): ``deci``, the architecture llama.cpp wrote for
  Nemotron-51B, which reads head, KV-head and FFN-width arrays (one value a layer)
  and takes optional biases on every attention and FFN projection. Its rotary
  embedding pairs interleaved dimensions, so q/k rows (and biases) are permuted from
  transformers' half-split layout. Qwen3 (q_norm / k_norm) has no such
  architecture: its per-layer or compensated results are refused in one line.

Weights are written at ``GGUF_TYPES``: f32, f16, bf16, or a block quantization the
``gguf`` package implements in Python (q8_0, q5_0, q5_1, q4_0, q4_1). 1-D tensors (norms,
biases) stay f32, as llama.cpp's own converter keeps them. A matrix whose rows do not
split into 32-value blocks (an FFN width left odd by pruning) falls back to f16; at q4/q5
the output matrix is kept at q8_0 (llama.cpp keeps it above 4 bits too). ``plan.fallbacks``
lists what fell back.

The tokenizer goes in as llama.cpp's byte-level BPE ("gpt2"): tokens in id order, token
types (control for special tokens, user-defined for other added tokens, unused for the
padding rows of a larger embedding), merges, special ids, whether BOS is added, the chat
template, and the pre-tokenizer, recognised from the tokenizer's own split rule
(``PRE_TOKENIZERS``): vocabulary pruning keeps that rule, so llama.cpp splits text as
transformers does. A tokenizer whose rule llama.cpp does not know is refused.

A model read from a GGUF file (the offline aliases) keeps the source's ``general.*``
metadata (license, base model, ...; its name becomes ``general.base_model.0.name`` when it
names no base model), given as ``source_metadata``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from codeprune.errors import ConfigError, UnsupportedArchitectureError
from codeprune.models.loaded import LoadedModel
from codeprune.outputs import write_path_atomically

logger = logging.getLogger(__name__)

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
BLOCK = 32  # values per block of every quantized type above
# FFN widths are padded with zero channels to a multiple of this: pruning leaves odd widths
# (3839 of 4864), which no quantized type can store (32-value blocks) and llama.cpp's matrix
# kernels run on a slow path (measured: bench/deploy.py, README "Deploy")
FFN_MULTIPLE = 32

# canonical sublayer name -> GGUF tensor name inside blk.N
_LINEAR_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                 "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
_EXTRA_BIAS = ("o_proj", "gate_proj", "up_proj", "down_proj")  # biases llama/qwen2/qwen3 do not read
PER_LAYER_ARCH = "deci"


def _known_splits() -> dict[str, str]:
    """Split regex -> llama.cpp pre-tokenizer name, for the byte-level BPE families codeprune
    supports (the regexes are transformers' own constants where it has them)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    return {GGUF_PRE_TOKENIZER_SPLITS[name]: name for name in ("qwen2", "llama-bpe", "qwen35")}


_GPT2_BYTELEVEL = "gpt-2"  # ByteLevel with its own (GPT-2) regex
_SMOLLM = "smollm"  # digits split one by one, then the GPT-2 regex
PRE_TOKENIZERS = ("qwen2", "llama-bpe", "qwen35", _GPT2_BYTELEVEL, _SMOLLM)


@dataclass
class ExportPlan:
    """What ``export_gguf`` will write, decided (and checked) before any work."""

    arch: str
    qtype: str
    per_layer: bool  # head / KV-head / FFN arrays (the deci architecture)
    permute_rope: bool  # q/k rows interleaved for llama.cpp's "norm" rope
    pre: str  # llama.cpp pre-tokenizer name
    heads: list[int]
    kv_heads: list[int]
    ffn: list[int]
    tokenizer: dict = field(default_factory=dict, repr=False)  # tokenizer_fields()
    padded_channels: int = 0  # zero FFN channels added, over all layers
    fallbacks: dict[str, str] = field(default_factory=dict)  # tensor -> type it fell back to
    source_metadata: dict = field(default_factory=dict)

    def describe(self) -> str:
        shape = "per-layer sizes" if self.per_layer else "uniform layers"
        return f"{self.arch} ({shape}), {self.qtype}, pre-tokenizer {self.pre}"


def check_options(qtype: str, ffn_multiple: int = FFN_MULTIPLE) -> None:
    """The export's own options, checked before any model is loaded."""
    if qtype not in GGUF_TYPES:
        raise ConfigError(f"unsupported GGUF type '{qtype}': choose one of {', '.join(GGUF_TYPES)}")
    if not isinstance(ffn_multiple, int) or ffn_multiple < 1:
        raise ConfigError(f"--ffn-multiple must be a positive integer, got {ffn_multiple}")


def _layer_sizes(lm: LoadedModel) -> list[dict[str, int]]:
    return [lm.adapter.layer_sizes(layer) for layer in lm.adapter.layers()]


def _has_extra_bias(lm: LoadedModel) -> bool:
    return any(lin.bias is not None for layer in lm.adapter.layers()
               for name, lin in lm.adapter.linears(layer).items() if name in _EXTRA_BIAS)


def plan_export(lm: LoadedModel, qtype: str = "f16", *, source_metadata: dict | None = None,
                ffn_multiple: int = FFN_MULTIPLE) -> ExportPlan:
    """Choose the llama.cpp architecture, pre-tokenizer and types for ``lm``; raise
    ``ConfigError`` / ``UnsupportedArchitectureError`` for what llama.cpp cannot run.
    ``ffn_multiple``: FFN widths are padded with zero channels up to a multiple of it."""
    check_options(qtype, ffn_multiple)
    adapter, config = lm.adapter, lm.config
    if adapter.gguf_arch is None:
        raise UnsupportedArchitectureError(f"{config.model_type} has no llama.cpp architecture in "
                                           "codeprune's GGUF export")
    _check_config(adapter)
    sizes = _layer_sizes(lm)
    heads = [s["heads"] for s in sizes]
    kv = [s["kv_heads"] for s in sizes]
    widths = [s["intermediate"] for s in sizes]
    ffn = [-(-w // ffn_multiple) * ffn_multiple for w in widths]  # zero channels up to the multiple
    if min(heads) == 0 or min(kv) == 0 or min(ffn) == 0:
        raise UnsupportedArchitectureError("a layer without heads or FFN channels cannot be exported to GGUF")
    uniform = len(set(heads)) == len(set(kv)) == len(set(ffn)) == 1
    if uniform and not _has_extra_bias(lm):
        arch, per_layer, permute = adapter.gguf_arch, False, adapter.gguf_interleaved_rope
        if adapter.gguf_fixed_width and heads[0] * adapter.head_dim != adapter.hidden_size:
            arch, permute = "llama", True  # Qwen2 is Llama with q/k/v biases, which llama reads
    elif adapter.gguf_layer_norms:
        what = "layers of different sizes" if not uniform else "compensation biases on o_proj / down_proj"
        raise UnsupportedArchitectureError(
            f"llama.cpp has no architecture for {config.model_type} with {what} "
            f"(its per-layer architecture, deci, has no q_norm / k_norm): export a uniform result without "
            "bias compensation, or use the transformers checkpoint")
    else:
        arch, per_layer, permute = PER_LAYER_ARCH, True, True
    source_metadata = dict(source_metadata or {})
    pre = source_metadata.get("tokenizer.ggml.pre") or pre_tokenizer_name(lm.tokenizer)
    return ExportPlan(arch=arch, qtype=qtype, per_layer=per_layer, permute_rope=permute, pre=pre,
                      heads=heads, kv_heads=kv, ffn=ffn, source_metadata=source_metadata,
                      tokenizer=tokenizer_fields(lm.tokenizer, adapter.vocab_size),
                      padded_channels=sum(ffn) - sum(widths))


def _check_config(adapter) -> None:
    """Refuse what the GGUF keys written here cannot express."""
    rope_type = adapter.rope()[0]
    if rope_type != "default":
        raise UnsupportedArchitectureError(f"rope scaling '{rope_type}' is not written to GGUF by codeprune "
                                           "yet (only the default rope)")
    if adapter.sliding_window:
        logger.warning("llama.cpp runs this model without its sliding window: outputs match within %d tokens",
                       adapter.sliding_window)


# -- tokenizer ----------------------------------------------------------------
def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedArchitectureError("GGUF export needs a fast (tokenizers) tokenizer")
    return json.loads(backend.to_str())


def pre_tokenizer_name(tokenizer) -> str:
    """The llama.cpp pre-tokenizer that splits text as ``tokenizer`` does, or
    ``UnsupportedArchitectureError`` naming what it found."""
    spec = _tokenizer_json(tokenizer)
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise UnsupportedArchitectureError(
            f"GGUF export writes byte-level BPE tokenizers; this one is {model.get('type')}")
    sentencepiece = model.get("byte_fallback") or "Metaspace" in json.dumps(spec.get("pre_tokenizer")) \
        or "\u2581" in json.dumps(spec.get("normalizer"), ensure_ascii=False)
    if sentencepiece:
        raise UnsupportedArchitectureError(
            "GGUF export writes byte-level BPE tokenizers; SentencePiece-style ones (Llama 2, CodeLlama, "
            "Mistral) are not written yet")
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return _GPT2_BYTELEVEL
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") \
            and steps[1].get("use_regex", True):
        return _SMOLLM
    if kinds and kinds[0] == "Split" and kinds[-1] == "ByteLevel" and len(kinds) == 2:
        regex = (steps[0].get("pattern") or {}).get("Regex")
        name = _known_splits().get(regex)
        if name is not None:
            return name
    raise UnsupportedArchitectureError(
        "llama.cpp has no pre-tokenizer codeprune recognises for this tokenizer "
        f"({' + '.join(map(str, kinds))}); known: {', '.join(PRE_TOKENIZERS)}")


def tokenizer_fields(tokenizer, n_vocab: int) -> dict:
    """tokens, token types, merges and special ids of a byte-level BPE tokenizer, for ``n_vocab``
    embedding rows (rows past the tokenizer's last id are unused padding)."""
    import gguf

    spec = _tokenizer_json(tokenizer)
    vocab: dict[str, int] = spec["model"]["vocab"]
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    tokens: list[str | None] = [None] * n_vocab
    types = [int(gguf.TokenType.UNUSED)] * n_vocab
    for text, i in vocab.items():
        if i < n_vocab:
            tokens[i], types[i] = text, int(gguf.TokenType.NORMAL)
    for i, t in added.items():
        if i < n_vocab:
            tokens[i] = t["content"]
            types[i] = int(gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED)
    extra = [i for i in range(n_vocab, max([*vocab.values(), *added, -1]) + 1)]
    if extra:
        raise ConfigError(f"the tokenizer has ids up to {max(extra)} but the model only {n_vocab} "
                          "embedding rows")
    for i, text in enumerate(tokens):
        if text is None:
            tokens[i] = f"[PAD{i}]"
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    fields = {"tokens": tokens, "types": types, "merges": merges,
              "bos": bos, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id,
              "add_bos": bool(bos is not None and probe and probe[0] == bos),
              "chat_template": getattr(tokenizer, "chat_template", None)}
    return fields


# -- tensors ------------------------------------------------------------------
def _permute_rows(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of q/k (weight or bias) from transformers' half-split rotary layout to llama.cpp's
    interleaved one: in each head, row j of the first half and row j of the second half
    become rows 2j and 2j+1."""
    head_dim = t.shape[0] // n_heads
    rest = t.shape[1:]
    return t.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(t.shape)


def _pad_ffn(name: str, w: torch.Tensor, b: torch.Tensor | None, width: int):
    """gate / up with zero rows, down with zero columns, up to ``width`` channels: a zero channel's
    gate and up outputs are 0, silu(0) * 0 = 0, so it adds nothing to down's output."""
    if name == "down_proj":
        return torch.cat([w, w.new_zeros(w.shape[0], width - w.shape[1])], dim=1), b
    rows = width - w.shape[0]
    return (torch.cat([w, w.new_zeros(rows, w.shape[1])]),
            None if b is None else torch.cat([b, b.new_zeros(rows)]))


def _tensors(lm: LoadedModel, plan: ExportPlan):
    """(GGUF name, float32 tensor) for every weight, in llama.cpp's order."""
    adapter = lm.adapter
    yield "token_embd.weight", adapter.embed_tokens().weight
    for i, layer in enumerate(adapter.layers()):
        prefix = f"blk.{i}"
        yield f"{prefix}.attn_norm.weight", adapter.input_norm(layer).weight
        for name, lin in adapter.linears(layer).items():
            gname = _LINEAR_NAMES[name]
            w, b = lin.weight, lin.bias
            channels = w.shape[1] if name == "down_proj" else w.shape[0]
            if name in ("gate_proj", "up_proj", "down_proj") and plan.ffn[i] > channels:
                w, b = _pad_ffn(name, w, b, plan.ffn[i])
            if plan.permute_rope and name in ("q_proj", "k_proj"):
                n = plan.heads[i] if name == "q_proj" else plan.kv_heads[i]
                w = _permute_rows(w, n)
                b = _permute_rows(b, n) if b is not None else None
            yield f"{prefix}.{gname}.weight", w
            if b is not None:
                yield f"{prefix}.{gname}.bias", b
            if name == "o_proj":
                yield f"{prefix}.ffn_norm.weight", adapter.post_attention_norm(layer).weight
        for gname, path in adapter.gguf_layer_norms.items():
            yield f"{prefix}.{gname}.weight", layer.get_submodule(path).weight
    yield "output_norm.weight", adapter.final_norm().weight
    if not adapter.tied_embeddings:
        yield "output.weight", adapter.lm_head().weight


def _tensor_type(name: str, shape: tuple[int, ...], qtype: str) -> str:
    if len(shape) == 1 or qtype == "f32":
        return "f32"
    if qtype in ("f16", "bf16"):
        return qtype
    if shape[-1] % BLOCK:
        return "f16"
    if name == "output.weight" and qtype.startswith(("q4", "q5")):
        return "q8_0"
    return qtype


def _ggml_type(ttype: str):
    import gguf

    return getattr(gguf.GGMLQuantizationType, ttype.upper())


def _nbytes(shape: tuple[int, ...], ttype: str) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[_ggml_type(ttype)]
    return int(np.prod(shape)) // block * size


def _encode(array: np.ndarray, ttype: str) -> np.ndarray:
    """``array`` (float32) as the bytes GGUF stores for ``ttype``."""
    import gguf

    if ttype == "f32":
        return array
    if ttype == "f16":
        return array.astype(np.float16)
    return gguf.quants.quantize(array, _ggml_type(ttype))


_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
               "q5_1": "MOSTLY_Q5_1", "q5_0": "MOSTLY_Q5_0", "q4_1": "MOSTLY_Q4_1", "q4_0": "MOSTLY_Q4_0"}


def _metadata(writer, lm: LoadedModel, plan: ExportPlan, name: str) -> None:
    import gguf

    adapter = lm.adapter
    meta = {k: v for k, v in plan.source_metadata.items() if k.startswith("general.")}
    for key in ("general.architecture", "general.file_type", "general.quantization_version",
                "general.size_label"):  # this file's own, or no longer true of a pruned model
        meta.pop(key, None)
    source_name = meta.pop("general.name", None)
    if source_name and not any(k.startswith("general.base_model.") for k in meta):
        meta.update({"general.base_model.count": 1, "general.base_model.0.name": source_name})
    meta["general.name"] = name
    for key, value in meta.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value) if value >= 0 else writer.add_int32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            writer.add_array(key, value)
    writer.add_file_type(int(getattr(gguf.LlamaFileType, _FILE_TYPES[plan.qtype])))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(adapter.context_length)
    writer.add_embedding_length(adapter.hidden_size)
    writer.add_block_count(adapter.num_layers)
    if plan.per_layer:
        writer.add_feed_forward_length(plan.ffn)
        writer.add_head_count(plan.heads)
        writer.add_head_count_kv(plan.kv_heads)
    else:
        writer.add_feed_forward_length(plan.ffn[0])
        writer.add_head_count(plan.heads[0])
        writer.add_head_count_kv(plan.kv_heads[0])
    writer.add_key_length(adapter.head_dim)
    writer.add_value_length(adapter.head_dim)
    writer.add_rope_dimension_count(adapter.head_dim)
    writer.add_rope_freq_base(adapter.rope()[1])
    writer.add_layer_norm_rms_eps(adapter.norm_eps)
    writer.add_vocab_size(adapter.vocab_size)

    tok = plan.tokenizer
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(plan.pre)
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    writer.add_token_merges(tok["merges"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("pad", writer.add_pad_token_id)):
        if tok[key] is not None:
            add(int(tok[key]))
    writer.add_add_bos_token(tok["add_bos"])
    if tok["chat_template"]:
        writer.add_chat_template(tok["chat_template"])


def gguf_bytes(lm: LoadedModel, plan: ExportPlan) -> int:
    """About the bytes of the file ``export_gguf`` writes (for the free-space check)."""
    per_value = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32,
                 "q4_1": 20 / 32, "q4_0": 18 / 32}[plan.qtype]
    n = sum(p.numel() for p in lm.model.parameters())
    return int(n * per_value + 16 * 2**20)  # + the tokenizer's metadata


def export_gguf(lm: LoadedModel, out: str | Path, *, plan: ExportPlan, overwrite: bool = False,
                name: str | None = None, progress: bool = True) -> Path:
    """Write ``lm`` to the GGUF file ``out`` as ``plan`` says, atomically; ``plan.fallbacks`` is
    filled with the tensors written at another type."""
    import gguf

    out = Path(out)

    def write(tmp: Path) -> None:
        # two passes over the weights: the tensor infos (names, shapes, types: the header needs
        # them all), then the data one tensor at a time, so no second copy of the model is held
        writer = gguf.GGUFWriter(tmp, plan.arch)
        _metadata(writer, lm, plan, name or out.stem)
        types = {}
        for gname, t in _tensors(lm, plan):
            shape = tuple(t.shape)
            types[gname] = ttype = _tensor_type(gname, shape, plan.qtype)
            if ttype != ("f32" if len(shape) == 1 else plan.qtype):
                plan.fallbacks[gname] = ttype
            writer.add_tensor_info(gname, shape, np.dtype(np.float32), _nbytes(shape, ttype),
                                   raw_dtype=_ggml_type(ttype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with torch.no_grad():
            for gname, t in tqdm(_tensors(lm, plan), total=len(types), desc="GGUF", disable=not progress,
                                 leave=False):
                writer.write_tensor_data(_encode(t.detach().to("cpu", torch.float32).numpy(), types[gname]))
        writer.close()

    return write_path_atomically(out, overwrite, write, expected_bytes=gguf_bytes(lm, plan))


# -- ollama -------------------------------------------------------------------
# ollama's Modelfile TEMPLATE is a Go template; the ChatML one (Qwen2.5, SmolLM2 and most code
# models' instruct variants) is written out, other chat templates are left to ollama, which
# reads the GGUF's tokenizer.chat_template itself.
_CHATML = ('{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
           '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
           '<|im_start|>assistant\n')


def modelfile_text(tokenizer, gguf_name: str) -> str:
    """An ollama Modelfile for the GGUF file ``gguf_name`` beside it: FROM, the chat template
    (ChatML as a Go template; otherwise ollama's own reading of the GGUF), stop tokens."""
    template = getattr(tokenizer, "chat_template", None) or ""
    stops = []
    if "<|im_start|>" in template:
        stops.append("<|im_end|>")
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos not in stops:
        stops.append(eos)
    lines = ["# ollama create NAME -f THIS_FILE   (written by codeprune export)",
             f"FROM ./{gguf_name}"]
    if "<|im_start|>" in template:
        lines.append(f'TEMPLATE """{_CHATML}"""')
    elif template:
        lines.append("# chat template: ollama reads it from the GGUF (tokenizer.chat_template)")
    else:
        lines += ["# a base model: the prompt goes in as it is", 'TEMPLATE """{{ .Prompt }}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"
