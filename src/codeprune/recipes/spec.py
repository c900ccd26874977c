"""Recipes: pruning stages run in order, to a target fraction of all parameters.

A recipe is a YAML file (or a built-in name: ``flab``, ``shortgpt``; see
``codeprune/recipes/``) listing stages; Flab-Pruner (Yang et al. 2024) is the
built-in ``flab``: vocabulary, then layers, then FFN width.

    name: flab
    target: 0.22                  # default for --target (fraction of all parameters)
    stages:
      - stage: vocab              # tokens the calibration corpus never uses
        min_count: 1
        share: 0.9                # up to 90% of the target: free on the calibration language
      - stage: layers             # greedy, re-scored after every removal
        metric: kl
        share: 0.05               # layers and FFN share the rest equally
      - stage: ffn                # the same FFN width removed in every layer
        method: wanda-sp
        share: 0.05

Stages (every key besides ``stage`` is an option of that stage):

``vocab``    ``min_count`` (1), ``corpus`` (a source or a list; ``code`` = every
             language corpus present; default: the run's calibration source),
             ``max_files`` (count on at most this many files per corpus), ``share``.
             Tokens are counted on the *calibration split* of each corpus (never
             its held-out files). Without ``share`` it removes every token used
             fewer than ``min_count`` times; with one it removes at most its
             budget (rarest first, see ``methods.vocab.select_vocab``) and never a token
             used ``min_count`` times or more.
``layers``   ``metric`` (kl, bi, bi-last), ``n`` (layers to remove) or ``share``,
             ``samples`` / ``tokens`` (calibration windows and tokens per window
             the greedy search scores on; default all), ``batch_size``.
``ffn``      ``method`` (a structured method: wanda-sp, the default, flap,
             magnitude-sp, taylor), ``ratio`` (fraction of decoder parameters) or
             ``share``, and that method's options. Uniform by default: every layer
             keeps the same width, the config stays vanilla.
``heads``    the same for attention heads only (``units: heads``).
a structured method name (flap, wanda-sp, magnitude-sp, taylor): heads and FFN
             channels, ``ratio`` or ``share`` and the method's options.
an unstructured method name (magnitude, wanda, sparsegpt): ``sparsity``,
             ``pattern`` and the method's options (sparsegpt: ``block_size``, ``damp``).
             Zeroed weights are not removed parameters: such a stage
             never counts toward the target (the report gives its sparsity).

How ``--target`` is split. Let P be the dense model's parameter count (tied
embeddings once) and G = round(target * P) the parameters to remove. Stages run
in order; a stage with a ``share`` gets the budget

    B_k = (G - removed so far) * share_k / (sum of the shares of stage k and the later ones)

so shares are relative weights, a stage that removes less than its budget
(vocabulary when few tokens are unused, layers when rounding down) leaves the
difference to the stages after it in proportion to their shares, and the last
stage with a share takes exactly what is left. A ``layers`` stage removes
round(B_k / parameters per layer) whole layers; a structured stage gets the
ratio B_k / (decoder parameters now). A recipe whose last budgeted stage is
fine-grained (ffn, heads, a structured method) lands within a fraction of a
point of the target; the report says by how much (``target_error``) either way.
Stages with a fixed amount (``n``, ``ratio``, a vocab stage without ``share``)
remove what they remove, and the budgeted ones share the rest. A target the
stages cannot remove (a layers stage keeps one layer, a structured stage one
attention unit and one FFN channel per layer, a vocab stage the special tokens
and the byte alphabet) is refused before calibration with the largest target
they can take (``runner.check_reach``); a structured stage whose budget still
outruns it at run time removes its most and its record says ``capped``.

After a ``vocab`` stage, the calibration windows are rewritten for the pruned
tokenizer (same bytes, ``methods.vocab.remap_ids``, cut back to the window length) and
perplexity is measured on the original held-out windows per *original* token
(``evaluation.perplexity.perplexity_remapped``), so every figure compares with the
dense model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from codeprune.errors import ConfigError
from codeprune.methods import METHODS, is_structured, make_pruner, option_default
from codeprune.methods.contract import check_placement
from codeprune.methods.depth import LAYER_METRICS
from codeprune.options import opt, option_names

BUILTIN_DIR = Path(__file__).parent  # the built-in recipes: flab.yaml, shortgpt.yaml


@dataclass
class VocabStageOptions:
    """The keys of a ``vocab`` stage (the runner reads them from ``Stage.options``)."""

    min_count: int = opt(1, "keep the tokens used at least this often on the calibration corpus")
    corpus: str | list | None = opt(None, "a source or a list; code = every language corpus present "
                                    "(default: the run's calibration source)")
    max_files: int | None = opt(None, "count on at most this many files per corpus")
    share: float | None = opt(None, "relative weight of the stage in the split of --target")


@dataclass
class LayerStageOptions:
    """The keys of a ``layers`` stage."""

    metric: str = opt("kl", "kl, bi or bi-last (methods/depth.py)")
    n: int | None = opt(None, "layers to remove (or give share)")
    share: float | None = opt(None, "relative weight of the stage in the split of --target")
    samples: int | None = opt(None, "calibration windows the greedy search scores on (default all)")
    tokens: int | None = opt(None, "tokens per window the search scores on (default all)")
    batch_size: int | None = opt(None, "windows per forward (default the run's)")


LAYER_KEYS = option_names(LayerStageOptions)


VOCAB_KEYS = option_names(VocabStageOptions)


STAGE_KEYS = {"share", "method"}  # keys of a method stage that are not the method's options


def method_keys(method: str) -> set[str]:
    """The options a stage running ``method`` may give: its config dataclass's fields."""
    return option_names(METHODS[method].config_class)


@dataclass
class Stage:
    kind: str  # vocab | layers | ffn | heads | a method name
    options: dict = field(default_factory=dict)

    @property
    def share(self) -> float | None:
        return self.options.get("share")

    @property
    def method(self) -> str | None:
        if self.kind in ("ffn", "heads"):
            return self.options.get("method", "wanda-sp")
        return None if self.kind in ("vocab", "layers") else self.kind

    def describe(self) -> dict:
        return {"stage": self.kind, **self.options}


@dataclass
class Recipe:
    name: str
    stages: list[Stage]
    description: str = ""
    target: float | None = None
    source: str = ""

    @property
    def budgeted(self) -> list[int]:
        return [i for i, s in enumerate(self.stages) if s.share is not None]

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "description": self.description,
                "target": self.target, "stages": [s.describe() for s in self.stages]}


def builtin_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.yaml"))}


def load_recipe(spec: str | Path) -> Recipe:
    """A built-in recipe by name, or a YAML file; ConfigError on anything malformed."""
    import yaml

    path = builtin_recipes().get(str(spec)) or Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"recipe '{spec}' is neither a built-in ({', '.join(builtin_recipes())}) "
                          "nor a YAML file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    source = "built-in" if path.parent == BUILTIN_DIR else str(path)
    return parse_recipe(data, source=source, default_name=path.stem)


def parse_recipe(data, *, source: str = "", default_name: str = "recipe") -> Recipe:
    where = f"recipe {source or default_name}"
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list) or not data["stages"]:
        raise ConfigError(f"{where}: needs a non-empty 'stages' list")
    unknown = set(data) - {"name", "description", "target", "stages"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    stages = []
    for k, raw in enumerate(data["stages"]):
        if not isinstance(raw, dict) or "stage" not in raw:
            raise ConfigError(f"{where}, stage {k + 1}: a mapping with a 'stage' key is needed")
        options = {key: value for key, value in raw.items() if key != "stage"}
        stage = Stage(str(raw["stage"]), options)
        check_stage(stage, f"{where}, stage {k + 1} ({stage.kind})")
        stages.append(stage)
    if sum(s.kind == "vocab" for s in stages) > 1:
        raise ConfigError(f"{where}: at most one vocab stage")
    target = data.get("target")
    if target is not None:
        check_target(target)
    return Recipe(str(data.get("name") or default_name), stages, str(data.get("description") or ""),
                  target, source)


def check_target(target) -> float:
    if not isinstance(target, (int, float)) or isinstance(target, bool) or not 0 < target < 1:
        raise ConfigError(f"target must be a fraction of all parameters in (0, 1), got {target!r}")
    return float(target)


def _number(where: str, key: str, value, *, integer: bool = False, low: float = 0.0,
            high: float | None = None, closed_low: bool = False):
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    ok = ok and not isinstance(value, bool) and (value >= low if closed_low else value > low)
    ok = ok and (high is None or value < high)
    if not ok:
        kind = "an integer" if integer else "a number"
        bound = f">= {low:g}" if closed_low else f"> {low:g}"
        raise ConfigError(f"{where}: '{key}' must be {kind} {bound}"
                          + (f" and < {high:g}" if high is not None else "") + f", got {value!r}")
    return value


def check_stage(stage: Stage, where: str) -> None:
    """Raise ConfigError for unknown stages, unknown keys and bad values (before any work)."""
    o = stage.options
    if "share" in o:
        _number(where, "share", o["share"])
    if stage.kind == "vocab":
        _unknown(where, o, VOCAB_KEYS)
        _number(where, "min_count", o.get("min_count", 1), integer=True, low=1, closed_low=True)
        if o.get("max_files") is not None:
            _number(where, "max_files", o["max_files"], integer=True, low=1, closed_low=True)
        corpus = o.get("corpus")
        if corpus is not None and not (isinstance(corpus, str) or (
                isinstance(corpus, list) and corpus and all(isinstance(c, str) for c in corpus))):
            raise ConfigError(f"{where}: 'corpus' must be a source or a list of sources")
        return
    if stage.kind == "layers":
        _unknown(where, o, LAYER_KEYS)
        if o.get("metric", "kl") not in LAYER_METRICS:
            raise ConfigError(f"{where}: unknown metric '{o['metric']}': choose {', '.join(LAYER_METRICS)}")
        if ("n" in o) == ("share" in o):
            raise ConfigError(f"{where}: give exactly one of 'n' (layers to remove) and 'share'")
        if "n" in o:
            _number(where, "n", o["n"], integer=True, low=1, closed_low=True)
        for key in ("samples", "tokens", "batch_size"):
            if key in o:
                _number(where, key, o[key], integer=True, low=1 if key != "tokens" else 2, closed_low=True)
        return
    method = stage.method
    if method not in METHODS:
        raise ConfigError(f"{where}: unknown stage '{stage.kind}': choose vocab, layers, ffn, heads or a "
                          f"method ({', '.join(sorted(METHODS))})")
    if is_structured(method):
        allowed = method_keys(method) | {"share"}
        if stage.kind in ("ffn", "heads"):
            allowed = (allowed - {"units"}) | {"method"}  # the stage kind sets the units
        _unknown(where, o, allowed)
        if ("ratio" in o) == ("share" in o):
            raise ConfigError(f"{where}: give exactly one of 'ratio' (of decoder parameters) and 'share'")
        stage_method(stage)  # validates the options
        return
    if stage.kind in ("ffn", "heads"):
        raise ConfigError(f"{where}: '{method}' is unstructured; an {stage.kind} stage needs a structured "
                          "method (wanda-sp, flap, magnitude-sp, taylor)")
    _unknown(where, o, method_keys(method))
    stage_method(stage)  # validates the options


def _unknown(where: str, options: dict, allowed: set[str]) -> None:
    bad = set(options) - allowed
    if bad:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(sorted(bad))} "
                          f"(allowed: {', '.join(sorted(allowed))})")


def structured_options(stage: Stage, ratio: float) -> dict:
    """The structured pruner's options for ``stage`` at ``ratio`` of the decoder."""
    options = {k: v for k, v in stage.options.items() if k not in STAGE_KEYS}
    if stage.kind in ("ffn", "heads"):
        options["units"] = stage.kind
        options.setdefault("structure", "uniform")  # one width everywhere: a vanilla config
        options.setdefault("compensation", False)  # biases Qwen2 cannot store plainly
    return {**options, "ratio": ratio}


def stage_method(stage: Stage, ratio: float | None = None):
    """The configured method of a method / ffn / heads stage (``ratio``: what a structured stage
    removes, from its budget or its own ``ratio``)."""
    if is_structured(stage.method):
        if ratio is None:
            ratio = stage.options.get("ratio", option_default(stage.method, "ratio"))
        return make_pruner(stage.method, **structured_options(stage, ratio))
    options = {k: v for k, v in stage.options.items() if k not in ("share", "method")}
    return make_pruner(stage.method, **options)


def stage_uses_data(stage: Stage) -> bool:
    """Whether ``stage`` reads the calibration windows (vocab and layers stages always do)."""
    return stage.kind in ("vocab", "layers") or stage_method(stage).uses_data


def check_offload(recipe: Recipe, offload: bool) -> None:
    """With ``offload`` (one layer at a time on the device), refuse the stages that need the whole
    model on one device: the layer search (it compares full forward passes), the vocab stage (the
    perplexity after it scores remapped windows on one device) and gradient methods."""
    if not offload:
        return
    for stage in recipe.stages:
        if stage.kind in ("layers", "vocab"):
            raise ConfigError(f"a {stage.kind} stage runs the whole model on one device: drop --offload")
        check_placement(stage_method(stage), offload)


def check_budget(recipe: Recipe, target: float | None) -> None:
    """A target needs a stage with a share, and a stage with a share needs a target."""
    if recipe.budgeted and target is None:
        raise ConfigError(f"recipe '{recipe.name}' splits a target across its stages: give --target")
    if target is not None and not recipe.budgeted:
        raise ConfigError(f"recipe '{recipe.name}' has no stage with a 'share': --target cannot be split "
                          "(give shares, or drop --target)")
