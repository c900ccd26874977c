"""Architecture adapters: the only place in codeprune that knows module names.

An adapter wraps a Hugging Face causal LM and *returns modules and sizes*; it
never runs a decoder layer of its own (transformers' ``DecoderLayer.forward`` is
used as it is, so adapters do not drift with transformers releases). What the
rest of codeprune needs to know about a family is declared here as data:

    roles               which canonical Linears read the same input, in execution order
    module_paths        canonical name -> the module's path inside a decoder layer
    transformers_family (module, class prefix) of the family in transformers, for the
                        class that loads per-layer checkpoints (models/pruned_modeling.py)
    bias_flags          config flags that give Linears a bias in the plain architecture

and three computations run through it: ``logits(hidden)`` (final norm, lm_head,
logit soft-capping), ``linears(layer)`` and ``lora_target_modules(names)``.

    >>> adapter = get_adapter(model)
    >>> for i, layer in enumerate(adapter.layers()):
    ...     linears = adapter.linears(layer)   # {"q_proj": Linear, ..., "down_proj": Linear}

docs/adding-an-architecture.md says how to add a family.
"""

from __future__ import annotations

import torch
from torch import nn

from codeprune.errors import ConfigError

# The Llama layout: role -> canonical sublayer names. Each role's Linears read the
# same input tensor (one set of input statistics serves the group); roles are listed
# in the order a decoder layer runs them, and the engine relies on that order.
LLAMA_ROLES: dict[str, tuple[str, ...]] = {
    "attention_inputs": ("q_proj", "k_proj", "v_proj"),
    "attention_output": ("o_proj",),
    "mlp_inputs": ("gate_proj", "up_proj"),
    "mlp_output": ("down_proj",),
}
LLAMA_PATHS: dict[str, str] = {
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "down_proj": "mlp.down_proj",
}


class DecoderAdapter:
    """Adapter for the Llama layout: ``model.model.{embed_tokens,layers,norm,rotary_emb}``,
    each layer with ``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj`` and
    ``input_layernorm`` / ``post_attention_layernorm``; ``model.lm_head``.

    Subclasses declare ``model_types`` and ``transformers_family``, and override
    ``roles`` / ``module_paths`` when their Linears are named or grouped differently.
    ``sublayer_names`` and ``input_groups`` are derived from ``roles``."""

    model_types: tuple[str, ...] = ()
    transformers_family: tuple[str, str] | None = None  # e.g. ("llama", "Llama")
    roles: dict[str, tuple[str, ...]] = LLAMA_ROLES
    module_paths: dict[str, str] = LLAMA_PATHS
    # Config flags that give sublayers a bias in the vanilla architecture:
    # {flag: sublayers it switches on}. Structured pruning's bias compensation uses
    # them so a compensated model still loads as the plain architecture; a bias the
    # family has no flag for needs the modeling file written beside the weights.
    bias_flags: dict[str, tuple[str, ...]] = {}
    # GGUF export (models/gguf_export.py): llama.cpp's architecture for this family when every
    # layer has the same sizes, and whether that architecture's rotary embedding pairs
    # interleaved dimensions (llama.cpp's "norm" rope: the q/k rows are permuted on export;
    # False for "neox" rope, which pairs halves as transformers does); per-layer norms inside
    # attention, canonical GGUF suffix -> module path in a layer (Qwen3's q_norm / k_norm)
    gguf_arch: str | None = None
    gguf_interleaved_rope: bool = True
    gguf_layer_norms: dict[str, str] = {}
    # the family architecture sizes q as the hidden size (llama.cpp's qwen2): a result with
    # heads x head_dim != hidden goes to llama.cpp's llama architecture instead
    gguf_fixed_width: bool = False

    # derived from roles (set by _derive)
    sublayer_names: tuple[str, ...] = ()
    input_groups: tuple[tuple[str, ...], ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._derive()

    @classmethod
    def _derive(cls) -> None:
        cls.input_groups = tuple(tuple(names) for names in cls.roles.values())
        cls.sublayer_names = tuple(n for names in cls.input_groups for n in names)
        missing = set(cls.sublayer_names) - set(cls.module_paths)
        if missing:
            raise TypeError(f"{cls.__name__}.module_paths lacks {sorted(missing)}")

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # -- modules -------------------------------------------------------------
    @property
    def decoder(self) -> nn.Module:
        return self.model.model

    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    def set_layers(self, layers: nn.ModuleList) -> None:
        """Replace the decoder's layer list (layer removal, and scoring with layers left out)."""
        self.decoder.layers = layers

    def embed_tokens(self) -> nn.Embedding:
        return self.decoder.embed_tokens

    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    def final_norm(self) -> nn.Module:
        return self.decoder.norm

    def rotary_emb(self) -> nn.Module | None:
        return getattr(self.decoder, "rotary_emb", None)

    def outside_layers(self) -> list[nn.Module]:
        """Modules that run before/after the decoder layers (moved to the device
        together when the engine captures the first layer's inputs)."""
        mods = [self.embed_tokens(), self.final_norm(), self.lm_head(), self.rotary_emb()]
        return [m for m in mods if m is not None]

    def input_norm(self, layer: nn.Module) -> nn.Module:
        return layer.input_layernorm

    def post_attention_norm(self, layer: nn.Module) -> nn.Module:
        return layer.post_attention_layernorm

    def attention_module(self, layer: nn.Module) -> nn.Module:
        """The module whose forward holds ``num_key_value_groups`` (updated by surgery)."""
        return layer.self_attn

    def linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """The prunable Linears of one layer, keyed by canonical name, in execution order."""
        return {name: layer.get_submodule(self.module_paths[name]) for name in self.sublayer_names}

    def role_linears(self, layer: nn.Module, role: str) -> list[nn.Linear]:
        """The Linears of one role ("attention_inputs", "attention_output", "mlp_inputs",
        "mlp_output") of one layer, in execution order."""
        return [layer.get_submodule(self.module_paths[name]) for name in self.roles[role]]

    # -- computations --------------------------------------------------------
    def logits(self, hidden: torch.Tensor, *, normed: bool = False) -> torch.Tensor:
        """Next-token logits from the last decoder layer's output ``hidden`` (..., D), as
        the model's own forward computes them: final norm (skipped when ``normed``:
        the decoder's ``last_hidden_state`` has it), lm_head, then the family's logit
        soft-capping ``cap * tanh(logits / cap)`` when the config sets
        ``final_logit_softcapping`` (Gemma 2/3). Per token, so slices of tokens may be
        passed one at a time."""
        if not normed:
            hidden = self.final_norm()(hidden)
        logits = self.lm_head()(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def lora_target_modules(self, names) -> list[str]:
        """The module-name suffixes peft's ``target_modules`` needs for the canonical
        sublayers ``names`` (e.g. "q_proj" -> "self_attn.q_proj"); canonical names that
        share one fused module give it once."""
        unknown = [n for n in names if n not in self.module_paths]
        if unknown:
            raise ConfigError(f"LoRA targets {unknown} are not sublayers of {type(self).__name__}: "
                              f"choose among {', '.join(self.sublayer_names)}")
        return list(dict.fromkeys(self.module_paths[n] for n in names))

    # -- sizes ---------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers())

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def intermediate_size(self) -> int:
        return self.config.intermediate_size

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.num_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.hidden_size // self.num_heads

    @property
    def norm_eps(self) -> float:
        return float(self.config.rms_norm_eps)

    @property
    def context_length(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", None) or 2048)

    def rope(self) -> tuple[str, float]:
        """(rope type, theta): transformers 5's ``rope_parameters``, or the older config fields."""
        params = getattr(self.config, "rope_parameters", None) or getattr(self.config, "rope_scaling", None)
        params = params if isinstance(params, dict) else {}
        theta = params.get("rope_theta") or getattr(self.config, "rope_theta", None) or 10000.0
        return str(params.get("rope_type", params.get("type")) or "default"), float(theta)

    @property
    def sliding_window(self) -> int | None:
        """The attention window when the model attends to fewer tokens than its context."""
        window = getattr(self.config, "sliding_window", None)
        used = getattr(self.config, "use_sliding_window", True)
        return window if window and used and window < self.context_length else None

    @property
    def vocab_size(self) -> int:
        return self.embed_tokens().weight.shape[0]

    @property
    def tied_embeddings(self) -> bool:
        return self.lm_head().weight is self.embed_tokens().weight

    # -- per-layer sizes (structured pruning makes layers differ) -------------
    def layer_sizes(self, layer: nn.Module) -> dict[str, int]:
        """{"heads", "kv_heads", "intermediate"} of one layer, read from its weights
        (the config's global values no longer describe a structurally pruned layer)."""
        lin = self.linears(layer)
        return {"heads": lin["q_proj"].out_features // self.head_dim,
                "kv_heads": lin["k_proj"].out_features // self.head_dim,
                "intermediate": lin["gate_proj"].out_features}


DecoderAdapter._derive()
