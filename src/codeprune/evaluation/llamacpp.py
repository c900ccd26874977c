"""llama.cpp as a runtime: perplexity, logits, greedy tokens and speed of a GGUF file.

    with LlamaCpp("runs/q-flap-20.gguf") as rt:
        rt.perplexity(windows)              # the same protocol as evaluation/perplexity.py
        rt.speed(prompt_len=128, new_tokens=32)   # prefill / decode tokens/s, batch 1

Runs through llama-cpp-python (the ``llama_cpp`` package, built from source by
``make install``: the registry has no prebuilt Linux wheel), on the CPU with one thread
per core unless told otherwise, so the figures are the ones a llama.cpp / ollama user
gets on the same machine. Windows are fed as token ids, so a GGUF and the transformers
checkpoint it came from are scored on exactly the same tokens.

A file llama.cpp cannot load is a ``CorruptModelError`` (one line); a missing
``llama_cpp`` package is a ``ConfigError`` saying how to install it.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from codeprune.data.calibration import TokenWindows
from codeprune.errors import ConfigError, CorruptModelError
from codeprune.evaluation.perplexity import NonFiniteOutputError

INSTALL_HINT = "pip install llama-cpp-python (make install builds it; a C++ compiler and cmake are needed)"


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def version() -> str | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    return getattr(llama_cpp, "__version__", None)


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class LlamaCpp:
    """One GGUF file loaded in llama.cpp with a context of ``n_ctx`` tokens."""

    def __init__(self, path: str | Path, *, n_ctx: int = 2048, threads: int | None = None):
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise ConfigError(f"the llama.cpp runtime needs llama-cpp-python: {INSTALL_HINT}") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise CorruptModelError(f"not a GGUF file: {path}")
        self.threads = threads or default_threads()
        self.n_ctx = n_ctx
        self.llm = self._open(n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512), logits_all=True)

    def _open(self, **options):
        """A llama_cpp.Llama on this file (one per context), or CorruptModelError in one line."""
        from llama_cpp import Llama

        try:
            return Llama(model_path=str(self.path), n_threads=self.threads, n_threads_batch=self.threads,
                         verbose=False, seed=0, **options)
        except (ValueError, RuntimeError) as e:
            raise CorruptModelError(f"llama.cpp cannot load {self.path}: {str(e).splitlines()[0]}") from None

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.close()

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def n_vocab(self) -> int:
        return self.llm.n_vocab()

    @property
    def n_params(self) -> int:
        import llama_cpp

        return int(llama_cpp.llama_model_n_params(self.llm.model))

    def metadata(self) -> dict[str, str]:
        return dict(self.llm.metadata)

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        """llama.cpp's own tokenization of ``text`` (no BOS added)."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special))

    def logits(self, ids) -> np.ndarray:
        """(len(ids), n_vocab) float32 next-token logits of one sequence, from an empty cache."""
        ids = [int(t) for t in ids]
        if len(ids) > self.n_ctx:
            raise ConfigError(f"{len(ids)} tokens do not fit the llama.cpp context of {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[:len(ids)], dtype=np.float32)

    def greedy(self, ids, new_tokens: int) -> list[int]:
        """``new_tokens`` greedy continuation tokens of ``ids``."""
        ids = [int(t) for t in ids]
        if len(ids) + new_tokens > self.n_ctx:
            raise ConfigError(f"{len(ids)} + {new_tokens} tokens do not fit the llama.cpp context "
                              f"of {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(ids)
        out = []
        for _ in range(new_tokens):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(token)
            self.llm.eval([token])
        return out

    def perplexity(self, windows: TokenWindows, *, remap=None, name: str | None = None,
                   desc: str = "perplexity (llama.cpp)") -> dict:
        """Held-out perplexity with evaluation/perplexity.py's protocol (each window alone,
        predictions 2..L, token-weighted). ``remap`` (a vocabulary-pruned model) rewrites each
        window for the model's tokenizer; the NLL is then spread over the original tokens."""
        total_nll, model_tokens = 0.0, 0
        for row in tqdm(windows.input_ids.tolist(), desc=desc, leave=False):
            ids = remap(row) if remap is not None else row
            logits = self.logits(ids)[:-1].astype(np.float64)
            target = np.asarray(ids[1:])
            top = logits.max(axis=1)
            lse = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
            total_nll += float((lse - logits[np.arange(len(target)), target]).sum())
            model_tokens += len(target)
            if not math.isfinite(total_nll):
                raise NonFiniteOutputError(f"model '{name or self.path}' gives non-finite logits (nan/inf) "
                                           f"in llama.cpp on '{windows.source}'")
        tokens = windows.samples * (windows.seq_len - 1) if remap is not None else model_tokens
        nll = total_nll / tokens
        out = {"ppl": math.exp(nll), "nll": nll, "tokens": tokens, "windows": windows.samples,
               "seq_len": windows.seq_len, "runtime": "llama.cpp"}
        if remap is not None:
            out.update(model_tokens=model_tokens, per="original token")
        return out

    def speed(self, *, prompt_len: int = 128, new_tokens: int = 32, repeats: int = 3, seed: int = 0) -> dict:
        """Prefill and decode tokens/s at batch 1 with ``self.threads`` threads: the best of
        ``repeats`` runs (after one warm-up) of a ``prompt_len``-token random prompt, then
        ``new_tokens`` greedy single-token steps from its KV cache. Runs in a second context
        that computes the last position's logits only, as llama.cpp does when it serves."""
        import llama_cpp

        rng = np.random.default_rng(seed)
        ids = rng.integers(0, self.n_vocab, prompt_len).tolist()
        llm = self._open(n_ctx=prompt_len + new_tokens + 8, n_batch=max(prompt_len, 8))

        def last_token() -> int:
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(self.n_vocab,))
            return int(logits.argmax())

        try:
            llm.eval(ids[:8])  # warm-up: buffers, threads
            best_prefill = best_decode = math.inf
            for _ in range(repeats):
                llm.reset()
                start = time.perf_counter()
                llm.eval(ids)
                token = last_token()
                best_prefill = min(best_prefill, time.perf_counter() - start)
                start = time.perf_counter()
                for _ in range(new_tokens):
                    llm.eval([token])
                    token = last_token()
                best_decode = min(best_decode, time.perf_counter() - start)
        finally:
            llm.close()
        return {"prefill_tok_s": prompt_len / best_prefill, "decode_tok_s": new_tokens / best_decode,
                "prompt_len": prompt_len, "new_tokens": new_tokens, "batch_size": 1,
                "threads": self.threads, "runtime": "llama.cpp", "llama_cpp_python": version()}
