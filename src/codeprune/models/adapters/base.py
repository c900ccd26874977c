"""Architecture adapters: the only place in codeprune that knows module names.

An adapter wraps a Hugging Face causal LM and *returns modules and sizes*; it
never runs a forward of its own (transformers' ``DecoderLayer.forward`` is used
as it is, so adapters do not drift with transformers releases).

    >>> adapter = get_adapter(model)
    >>> for i, layer in enumerate(adapter.layers()):
    ...     linears = adapter.linears(layer)   # {"q_proj": Linear, ..., "down_proj": Linear}

Adding a family whose layout matches Llama is one line in ``ADAPTERS``; see
docs/adding-an-architecture.md.
"""

from __future__ import annotations

from torch import nn

# Canonical sublayer names, in the order a decoder layer executes them. The
# engine relies on this order: the last entry is the last Linear a layer runs.
SUBLAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# Sublayers that read the same input tensor (one set of input statistics serves the group).
INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


class DecoderAdapter:
    """Adapter for the Llama layout: ``model.model.{embed_tokens,layers,norm,rotary_emb}``,
    each layer with ``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj`` and
    ``input_layernorm`` / ``post_attention_layernorm``; ``model.lm_head``."""

    model_types: tuple[str, ...] = ()

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

    def attention_inputs(self, layer: nn.Module) -> list[nn.Linear]:
        a = layer.self_attn
        return [a.q_proj, a.k_proj, a.v_proj]

    def attention_output(self, layer: nn.Module) -> nn.Linear:
        return layer.self_attn.o_proj

    def mlp_inputs(self, layer: nn.Module) -> list[nn.Linear]:
        return [layer.mlp.gate_proj, layer.mlp.up_proj]

    def mlp_output(self, layer: nn.Module) -> nn.Linear:
        return layer.mlp.down_proj

    def linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """The prunable Linears of one layer, keyed by canonical name, in execution order."""
        mods = [*self.attention_inputs(layer), self.attention_output(layer),
                *self.mlp_inputs(layer), self.mlp_output(layer)]
        return dict(zip(SUBLAYERS, mods, strict=True))

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

    # -- bias slots ----------------------------------------------------------
    # Config flags that give sublayers a bias in the vanilla architecture:
    # {flag: sublayers it switches on}. Structured pruning's bias compensation uses
    # them so a compensated model still loads as the plain architecture; a bias the
    # family has no flag for needs the modeling file written beside the weights.
    bias_flags: dict[str, tuple[str, ...]] = {}

    def attention_module(self, layer: nn.Module) -> nn.Module:
        """The module whose forward holds ``num_key_value_groups`` (updated by surgery)."""
        return layer.self_attn
