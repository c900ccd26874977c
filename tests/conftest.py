"""Shared fixtures: tiny random models built from a config, a tiny tokenizer, the offline 135M model.

Fast tests never touch a hub: HF_HUB_OFFLINE is forced on here. Tests marked
``slow`` use the offline smollm2-135m model (installed by `make install`).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("CODEPRUNE_ENERGY", "0")  # codecarbon costs ~3 s a tracker; one test turns it on

import pytest  # noqa: E402
import torch  # noqa: E402

from codeprune.models.adapters import get_adapter
from codeprune.models.loading import LoadedModel

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
ARCHS = ["llama", "qwen2", "mistral", "qwen3"]  # one tiny model per adapter (test_adapters checks the set)


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n", "import os\nprint(os.sep)\n"] * 20
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def default_signals() -> None:
    """``preexec_fn`` of a child that a test signals: SIGINT, SIGTERM and SIGHUP at their defaults,
    as in a terminal. A suite started in the background (``cmd &``, ``nohup``) passes SIG_IGN
    on, and codeprune rightly keeps an ignored signal ignored."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return _tokenizer()


def make_tiny(model_type: str = "llama", seed: int = 0, tokenizer=None, **overrides) -> LoadedModel:
    """A random 2-layer model of ``model_type`` with a 320-token BPE tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = tokenizer or _tokenizer()
    kwargs = {**TINY, "vocab_size": len(tokenizer), **overrides}
    if model_type == "qwen3":
        kwargs.setdefault("head_dim", 16)
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return LoadedModel(model, tokenizer, get_adapter(model), f"tiny-{model_type}", {"kind": "test"})


@pytest.fixture
def tiny_llama(tiny_tokenizer):
    return make_tiny("llama", tokenizer=tiny_tokenizer)


@pytest.fixture(params=ARCHS)
def tiny_any(request, tiny_tokenizer):
    return make_tiny(request.param, tokenizer=tiny_tokenizer)


@pytest.fixture
def random_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 250, (6, 24), generator=g)


@pytest.fixture(scope="session")
def smollm2():
    """The offline 135M model (skips with the install command when its package is absent)."""
    from codeprune.models.loading import load_model
    from codeprune.models.offline import OFFLINE_MODELS, is_installed

    spec = OFFLINE_MODELS["smollm2-135m"]
    if not is_installed(spec):  # `make install` installs it; a bare pytest run may not have it
        pytest.skip(f"smollm2-135m not installed: {spec.pip_command}")
    return load_model("smollm2-135m")


@pytest.fixture
def stdlib_dir(tmp_path):
    """A calibration folder of 40 real standard-library modules (a fast python:DIR source)."""
    from codeprune.data.sources import python_stdlib_dir

    src = tmp_path / "code"
    src.mkdir()
    for path in sorted(python_stdlib_dir().glob("*.py"))[:40]:
        (src / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    return src
