"""The report.json schema: one typed record per report kind, versioned.

    from codeprune.reporting.schema import PruneReport, report_from_dict
    report = report_from_dict(json.loads(Path("runs/wanda50/report.json").read_text()))
    report.kind, report.sparsity_actual, report.to_dict()

Every report starts with the same header: ``schema`` (``SCHEMA``), ``kind``
("prune", "eval", "recover", "sweep"), ``model`` (as asked for; a local path as
``provenance.display_name`` shows it), ``source`` (where the weights came from,
without local paths), ``provenance`` (versions, command line, time) and ``notes``.
The fields after it are the kind's, under the report.json names the README and
docs/recipes.md / docs/recovery.md document. A prune report is one of three
shapes (``pruning``: "unstructured", "structured", "recipe"); fields of the
other shapes are optional and left out of report.json when None. A language
sweep writes one prune report per calibration language (``calibration_language``,
``perplexity`` on every evaluation language) and a ``sweep`` summary (sweep.json).

``from_dict`` refuses what this codeprune cannot read with a ``CorruptModelError``
that says why: another schema version, an unknown kind, a missing or unknown field.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

from codeprune.errors import CorruptModelError
from codeprune.reporting.provenance import provenance

SCHEMA = "codeprune-report/2"


def _opt(default=None, *, key: str | None = None):
    """An optional field: left out of report.json when None."""
    return field(default=default, metadata={"omit_none": True, "key": key})


def _sub(record, *, shape: str = "one", omit: bool = True):
    """A nested record (``shape``: "one", "list", or "map" of str -> record), None by default."""
    return field(default=None, metadata={"record": record, "shape": shape, "omit_none": omit})


def _dump(value):
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_dump(v) for v in value]
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    return value


class Record:
    """to_dict / from_dict for the dataclasses below (JSON names from the ``key`` metadata)."""

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.metadata.get("omit_none"):
                continue
            out[f.metadata.get("key") or f.name] = _dump(value)
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "report"):
        if not isinstance(data, dict):
            raise CorruptModelError(f"{where}: expected a JSON object, got {type(data).__name__}")
        known = {f.metadata.get("key") or f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise CorruptModelError(f"{where}: unknown field(s) {', '.join(unknown)} for schema {SCHEMA}")
        kwargs = {}
        for key, f in known.items():
            if key in data:
                kwargs[f.name] = _load(f, data[key], f"{where}.{key}")
            elif f.default is MISSING and f.default_factory is MISSING:
                raise CorruptModelError(f"{where}: missing field '{key}'")
        return cls(**kwargs)


def _load(f, value, where: str):
    record = f.metadata.get("record")
    if record is None or value is None:
        return value
    shape = f.metadata["shape"]
    if shape == "list":
        if not isinstance(value, list):
            raise CorruptModelError(f"{where}: expected a list")
        return [record.from_dict(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if shape == "map":
        if not isinstance(value, dict):
            raise CorruptModelError(f"{where}: expected an object")
        return {k: record.from_dict(v, f"{where}.{k}") for k, v in value.items()}
    return record.from_dict(value, where)


# -- sections -------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class Provenance(Record):
    """Versions and the command line (reporting/provenance.py)."""

    codeprune: str
    torch: str | None = None
    transformers: str | None = None
    python: str | None = None
    command: str | None = None
    created: str | None = None

    @classmethod
    def now(cls) -> Provenance:
        return cls(**provenance())


@dataclass(kw_only=True)
class Source(Record):
    """Where the weights came from (``provenance.sanitise_source``; models/loading.py ``origin``):
    kind alias, gguf, folder, hub, and what is known of the source model."""

    kind: str
    name: str | None
    base_model: str | None = _opt()  # a hub id
    license: str | None = _opt()
    model_type: str | None = _opt()
    dtype: str | None = _opt()  # the source's own precision
    upstream: str | None = _opt()
    quantization: str | None = _opt()
    sha256: str | None = _opt()
    note: str | None = _opt()


@dataclass(kw_only=True)
class Calibration(Record):
    """The calibration windows (data.calibration.TokenWindows.describe) and the text field."""

    source: str
    split: str
    samples: int
    seq_len: int
    seed: int | None
    documents: int
    skipped_files: dict
    text_field: str = "text"


@dataclass(kw_only=True)
class PerplexityScore(Record):
    """Held-out perplexity on one source (evaluation/perplexity.py) and how it was measured."""

    ppl: float
    nll: float
    tokens: int
    windows: int
    seq_len: int
    language: str | None = None
    source: str | None = _opt()  # sweep reports: the evaluation language's source spec
    protocol: str
    model_tokens: int | None = _opt()  # scored per the tokens of another tokenizer (--ppl-tokenizer)
    per: str | None = _opt()


@dataclass(kw_only=True)
class Efficiency(Record):
    """Size, speed and memory of a model (evaluation/efficiency.py; README "Efficiency")."""

    params_total: int
    params_nonzero: int
    bytes_in_memory: int
    disk_bytes: int | None
    macs_per_token: int
    macs_per_token_nonzero: int
    macs_context: int
    speed: dict  # {"batch_N": {"prefill_tok_s", "decode_tok_s", ...}}
    peak_memory_mb: float
    energy: dict | None
    device: str


@dataclass(kw_only=True)
class LlamaCppRun(Record):
    """A GGUF file run in llama.cpp (evaluation/llamacpp.py; README "Deploying with llama.cpp")."""

    file_bytes: int
    architecture: str | None
    file_type: str | None
    threads: int
    speed: dict  # {"prefill_tok_s", "decode_tok_s", "prompt_len", "new_tokens", "batch_size", ...}
    llama_cpp_python: str | None


@dataclass(kw_only=True)
class HumanEval(Record):
    """pass@k and every program's outcome (evaluation/humaneval.py; README "--humaneval")."""

    pass_at_1: float = field(metadata={"key": "pass@1"})
    pass_at_k: dict = field(metadata={"key": "pass@k"})
    n_problems: int
    samples_per_problem: int | str
    statuses: dict
    results: list
    per_problem: dict
    sandbox: dict
    config: dict


@dataclass(kw_only=True)
class RecoverData(Record):
    spec: str
    examples: int
    train: int
    eval: int
    dropped_no_answer_within_seq_len: int
    chat_template: bool
    kind: str = "instructions"  # or "code": windows of a code source, loss on every token
    train_tokens: int | None = _opt()  # tokens in the training set (one epoch)


@dataclass(kw_only=True)
class LoraSettings(Record):
    r: int
    alpha: float
    dropout: float
    targets: list
    trainable_params: int


@dataclass(kw_only=True)
class TrainingSettings(Record):
    epochs: float
    max_steps: int
    lr: float
    batch_size: int
    grad_accum: int
    seq_len: int
    processes: int
    resumed_from: str | None
    mode: str = "lora"  # or "full": every weight of the pruned model trained
    trainable_params: int | None = _opt()
    objective: str = "ce"  # or "kd": distillation from a teacher (RecoverReport.kd)


@dataclass(kw_only=True)
class KDSettings(Record):
    teacher: str
    temperature: float
    alpha: float  # weight of the data's cross-entropy
    restricted_vocab: int | None  # the student's kept tokens when its vocabulary was pruned
    teacher_params: int
    teacher_logits: str  # "online": computed at every step
    teacher_dtype: str | None = _opt()


# -- reports --------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class Report(Record):
    """The header every report starts with."""

    KIND: ClassVar[str] = ""
    schema: str = SCHEMA
    kind: str = ""
    model: str | None
    source: Source | None = _sub(Source, omit=False)
    provenance: Provenance = field(default_factory=Provenance.now, metadata={"record": Provenance,
                                                                              "shape": "one"})
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.kind = self.kind or self.KIND
        if self.kind != self.KIND:
            raise CorruptModelError(f"a {type(self).__name__} has kind '{self.KIND}', not '{self.kind}'")


@dataclass(kw_only=True)
class PruneReport(Report):
    """One pruning run: a method, a recipe, or one calibration language of a sweep."""

    KIND: ClassVar[str] = "prune"
    method: str
    pruning: str  # unstructured, structured, recipe
    params_total: int
    params_nonzero: int
    params_dense: int | None = None
    # unstructured and N:M
    pattern: str | None = _opt()
    sparsity_target: float | None = _opt()
    sparsity_actual: float | None = _opt()
    per_layer: dict | None = _opt()  # module name -> sparsity
    # structured
    structure: str | None = _opt()
    compensation: bool | None = _opt()
    ratio_target: float | None = _opt()
    ratio_actual_decoder: float | None = _opt()
    params_decoder_dense: int | None = _opt()
    params_decoder: int | None = _opt()
    gradient_pass: dict | None = _opt()
    # recipes
    recipe: dict | None = _opt()
    target: float | None = _opt()
    target_error: float | None = _opt()
    stages: list | None = _opt()  # one record per stage (recipes/runner.py)
    dense_shape: dict | None = _opt()
    vocab_size: int | None = _opt()
    num_layers: int | None = _opt()
    # structured and recipes: the shape of the result
    ratio_actual_total: float | None = _opt()
    heads_per_layer: list | None = _opt()
    kv_heads_per_layer: list | None = _opt()
    ffn_per_layer: list | None = _opt()
    export: str | None = _opt()  # plain, trust_remote_code
    structure_notes: list | None = _opt()
    method_options: dict | None = _opt()
    # calibration and perplexity
    calibration: Calibration | None = _sub(Calibration, omit=False)  # None: the method uses no data
    calibration_language: str | None = _opt()  # sweep members
    ppl_dense: float | None = None
    ppl_pruned: float | None = None
    ppl_protocol: str | None = None
    perplexity: dict[str, PerplexityScore] | None = _sub(PerplexityScore, shape="map")  # sweep: per language
    perplexity_dense: dict | None = _opt()
    # cost and efficiency
    seconds_prune: float | None = None
    peak_rss_mb: float | None = _opt()
    device: str | None = None
    energy_prune: dict | None = _opt()
    efficiency: Efficiency | None = _sub(Efficiency)
    tokens_per_s_dense: dict | None = _opt()
    tokens_per_s_pruned: dict | None = _opt()


@dataclass(kw_only=True)
class EvalReport(Report):
    """One ``codeprune eval`` run (the model fields are None when only completions were scored)."""

    KIND: ClassVar[str] = "eval"
    sparsity: float | None = _opt()  # decoder Linear sparsity
    params_total: int | None = _opt()
    params_nonzero: int | None = _opt()
    perplexity: dict[str, PerplexityScore] | None = _sub(PerplexityScore, shape="map")  # by source spec
    humaneval: HumanEval | None = _sub(HumanEval)
    efficiency: Efficiency | None = _sub(Efficiency)
    runtime: str | None = _opt()  # "llama.cpp" for a GGUF run there (default: transformers)
    llama_cpp: LlamaCppRun | None = _sub(LlamaCppRun)


@dataclass(kw_only=True)
class RecoverReport(Report):
    """One ``codeprune recover`` run (docs/recovery.md "Output")."""

    KIND: ClassVar[str] = "recover"
    data: RecoverData = field(metadata={"record": RecoverData, "shape": "one"})
    lora: LoraSettings | None = _sub(LoraSettings, omit=False)  # None: full fine-tuning
    training: TrainingSettings = field(metadata={"record": TrainingSettings, "shape": "one"})
    kd: KDSettings | None = _sub(KDSettings)
    steps: int
    samples_seen: int
    tokens_seen: int | None = _opt()
    seconds: float
    tokens_per_second: float | None = _opt()
    train_loss: float | None
    loss_curve: dict  # {"train": [[step, loss]], "eval": [[step, loss]]}
    eval_loss_before: float | None
    eval_loss_after: float | None
    ppl_before: float | None
    ppl_after: float | None
    ppl_protocol: str | None
    sparsity_before: float
    sparsity_after: float
    masks_kept: int
    params_total: int
    export: str
    device: str


@dataclass(kw_only=True)
class SweepReport(Report):
    """sweep.json: one language sweep's settings and its perplexity matrix."""

    KIND: ClassVar[str] = "sweep"
    method: str
    pattern: str
    sparsity: float
    calib_languages: dict  # language -> source spec
    eval_languages: dict
    samples: int
    seq_len: int
    seed: int
    eval_windows: int
    ppl_dense: dict = field(default_factory=dict)  # eval language -> dense ppl
    ppl_matrix: dict = field(default_factory=dict)  # calibration language -> eval language -> ppl
    members: list = field(default_factory=list)  # the member folders (one per calibration language)


REPORTS: dict[str, type[Report]] = {r.KIND: r for r in (PruneReport, EvalReport, RecoverReport, SweepReport)}


def report_from_dict(data: Any, where: str = "report") -> Report:
    """The typed report of a parsed report.json / sweep.json; CorruptModelError when this
    codeprune cannot read it (see the module docstring)."""
    if not isinstance(data, dict):
        raise CorruptModelError(f"{where} is not a codeprune report (not a JSON object)")
    schema = data.get("schema")
    if schema is None:
        raise CorruptModelError(f"{where} has no 'schema' field: not a codeprune report, or one written "
                                f"before {SCHEMA} (run the command again with this codeprune)")
    if schema != SCHEMA:
        raise CorruptModelError(f"{where} has schema '{schema}'; this codeprune reads {SCHEMA}")
    kind = data.get("kind")
    if kind not in REPORTS:
        raise CorruptModelError(f"{where} has kind '{kind}'; known: {', '.join(REPORTS)}")
    return REPORTS[kind].from_dict(data, where)
