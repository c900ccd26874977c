"""LoRA recovery: response-only labels, loss goes down, merge (plain, per-layer, sparse), resume."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

import codeprune
from codeprune.cli import main
from codeprune.data.instructions import Example
from codeprune.data.prompts import IGNORE, encode, encode_all
from codeprune.errors import ConfigError, CorpusError, OutputExistsError
from codeprune.methods import make_pruner
from codeprune.methods.structured.prune import prune_structured_
from codeprune.methods.unstructured.base import prune_model_
from codeprune.models.checkpoint import save_checkpoint
from codeprune.workflows.recover import RecoverConfig, recover, sparse_masks

from ..conftest import _tokenizer, make_tiny

QUICK = dict(max_steps=4, batch_size=4, grad_accum=1, seq_len=96, lr=5e-3, eval_fraction=0.2)


def write_data(path, n=40):
    rows = [{"instruction": f"Write function number {k} that adds one.", "input": "",
             "output": "def f(x):\n    return x + 1\n"} for k in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def tiny_folder(tmp_path, lm=None, name="tiny"):
    return str(save_checkpoint(lm or make_tiny("llama"), tmp_path / name))


def test_labels_cover_only_the_response_plain_layout():
    tok = _tokenizer()
    msgs = [{"role": "user", "content": "Add one."}, {"role": "assistant", "content": "return x + 1"}]
    enc = encode(tok, msgs, 512)
    trained = [t for t, lab in zip(enc["input_ids"], enc["labels"], strict=True) if lab != IGNORE]
    assert tok.decode(trained) == "return x + 1" + tok.eos_token
    prompt = [t for t, lab in zip(enc["input_ids"], enc["labels"], strict=True) if lab == IGNORE]
    assert "Add one." in tok.decode(prompt) and "### Response:" in tok.decode(prompt)


def test_labels_cover_only_the_assistant_turns_with_a_chat_template():
    tok = _tokenizer()
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "More"}, {"role": "assistant", "content": "Sure"}]
    enc = encode(tok, msgs, 512)
    assert tok.decode(enc["input_ids"]) == tok.apply_chat_template(msgs, tokenize=False)
    spans, current = [], []
    for t, lab in zip(enc["input_ids"], enc["labels"], strict=True):
        if lab != IGNORE:
            current.append(t)
        elif current:
            spans.append(tok.decode(current))
            current = []
    spans.append(tok.decode(current)) if current else None
    assert spans == ["Hello<|end|>\n", "Sure<|end|>\n"]


def test_truncation_drops_examples_without_an_answer_token():
    tok = _tokenizer()
    long = Example([{"role": "user", "content": "x " * 400}, {"role": "assistant", "content": "y"}], "a")
    short = Example([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "b")
    kept, dropped = encode_all(tok, [long, short], 64)
    assert dropped == 1 and len(kept) == 1 and len(kept[0]["input_ids"]) <= 64


def test_recovery_lowers_the_held_out_loss_and_merges_into_a_plain_checkpoint(tmp_path):
    folder = tiny_folder(tmp_path)
    data = write_data(tmp_path / "d.jsonl")
    res = recover(folder, data, out=tmp_path / "rec", config=RecoverConfig(**{**QUICK, "max_steps": 12}),
                  device="cpu", eval_ppl=None)
    r = res.report
    assert r["eval_loss_after"] < r["eval_loss_before"] - 0.5
    assert r["steps"] == 12 and r["data"]["train"] + r["data"]["eval"] == 40
    assert r["loss_curve"]["train"] and r["loss_curve"]["eval"][0] == [0, r["eval_loss_before"]]
    assert r["export"] == "plain" and r["lora"]["r"] == 8 and r["lora"]["alpha"] == 16
    assert (res.out / "report.md").is_file() and (res.out / "loss.png").is_file()
    assert (res.out / "adapter" / "adapter_config.json").is_file()
    assert not list(res.out.rglob("*.bin")) and not list(res.out.rglob("*.pt"))  # no pickles
    assert not (tmp_path / "rec.checkpoints").exists()
    plain = AutoModelForCausalLM.from_pretrained(res.out)  # no peft, no remote code
    assert not any("lora" in n for n, _ in plain.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(folder)
    changed = [n for (n, p), (_, q) in zip(plain.named_parameters(), base.named_parameters(), strict=True)
               if not torch.equal(p, q)]
    assert changed and all(n.endswith("proj.weight") for n in changed)


def test_a_sparse_model_keeps_exactly_its_zeros(tmp_path):
    lm = make_tiny("llama")
    x = torch.randint(0, 250, (4, 32), generator=torch.Generator().manual_seed(0))
    prune_model_(lm, make_pruner("wanda", sparsity=0.5), x)
    zeros_before = {n: (p == 0) for n, p in lm.model.named_parameters() if n.endswith("proj.weight")}
    folder = tiny_folder(tmp_path, lm)
    res = recover(folder, write_data(tmp_path / "d.jsonl"), out=tmp_path / "rec",
                  config=RecoverConfig(**QUICK), device="cpu", eval_ppl=None)
    merged = dict(AutoModelForCausalLM.from_pretrained(res.out).named_parameters())
    for name, zeros in zeros_before.items():
        assert torch.equal(merged[name] == 0, zeros), name
    assert res.report["sparsity_before"] == res.report["sparsity_after"] == pytest.approx(0.5)
    assert res.report["masks_kept"] == 14


def test_masks_only_for_sparse_linears():
    lm = make_tiny("llama")
    assert sparse_masks(lm) == {}
    assert len(sparse_masks(lm, "always")) == 14
    lin = lm.adapter.linears(lm.adapter.layers()[0])["up_proj"]
    with torch.no_grad():
        lin.weight[:, :10] = 0
    assert list(sparse_masks(lm)) == ["model.layers.0.mlp.up_proj"]


@pytest.mark.parametrize("report, masked", [
    (None, True),                                                    # no report: the zeros decide
    ({"kind": "prune", "pruning": "unstructured"}, True),
    ({"kind": "prune", "pruning": "structured"}, False),             # the source's zeros (a 4-bit GGUF's)
    ({"kind": "prune", "pruning": "recipe", "stages": [{"stage": "vocab"}, {"pruning": "structured"}]},
     False),
    ({"kind": "prune", "pruning": "recipe", "stages": [{"stage": "vocab"}, {"pruning": "unstructured"}]},
     True),
    ({"kind": "recover", "masks_kept": 0}, False),
    ({"kind": "recover", "masks_kept": 14}, True),
])
def test_the_checkpoints_report_says_whether_its_zeros_are_a_mask(tmp_path, report, masked):
    from codeprune.models.loading import load_model

    lm = make_tiny("llama")
    with torch.no_grad():
        lm.adapter.linears(lm.adapter.layers()[0])["up_proj"].weight[:, :10] = 0  # like quantization zeros
    folder = tiny_folder(tmp_path, lm)
    if report is not None:
        (tmp_path / "tiny" / "report.json").write_text(json.dumps(report))
    loaded = load_model(folder)
    assert list(sparse_masks(loaded)) == (["model.layers.0.mlp.up_proj"] if masked else [])
    assert list(sparse_masks(loaded, "always"))  # the user's word wins either way
    assert sparse_masks(loaded, "never") == {}


def test_a_per_layer_model_recovers_and_reloads(tmp_path):
    lm = make_tiny("qwen2", num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=4)
    x = torch.randint(0, 250, (4, 32), generator=torch.Generator().manual_seed(0))
    prune_structured_(lm, make_pruner("taylor", ratio=0.3, structure="adaptive", scope="0:1"), x)
    folder = tiny_folder(tmp_path, lm)
    res = recover(folder, write_data(tmp_path / "d.jsonl"), out=tmp_path / "rec",
                  config=RecoverConfig(**QUICK), device="cpu", eval_ppl=None)
    assert res.report["export"] == "trust_remote_code"
    again = codeprune.load(str(res.out))
    remote = AutoModelForCausalLM.from_pretrained(res.out, trust_remote_code=True)
    with torch.no_grad():
        torch.testing.assert_close(again.model(input_ids=x).logits, remote(input_ids=x).logits)

    def widths(m):
        return [m.adapter.linears(layer)["up_proj"].out_features for layer in m.adapter.layers()]

    assert widths(again) == widths(lm) and len(set(widths(lm))) > 1


class Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise KeyboardInterrupt


def test_an_interrupted_run_resumes_from_its_last_checkpoint(tmp_path):
    folder = tiny_folder(tmp_path)
    data = write_data(tmp_path / "d.jsonl")
    cfg = RecoverConfig(**{**QUICK, "save_steps": 2, "eval_steps": 2})
    with pytest.raises(KeyboardInterrupt):
        recover(folder, data, out=tmp_path / "rec", config=cfg, device="cpu", eval_ppl=None,
                callbacks=[Interrupt()])
    assert (tmp_path / "rec.checkpoints" / "checkpoint-2").is_dir()
    assert not (tmp_path / "rec").exists()
    with pytest.raises(ConfigError, match="other options"):
        recover(folder, data, out=tmp_path / "rec", config=RecoverConfig(**{**QUICK, "lr": 1e-4}),
                device="cpu", eval_ppl=None)
    res = recover(folder, data, out=tmp_path / "rec", config=cfg, device="cpu", eval_ppl=None)
    assert res.report["training"]["resumed_from"].endswith("checkpoint-2")
    assert res.report["steps"] == 4
    assert res.report["eval_loss_before"] is not None  # kept from the first attempt


def test_held_out_perplexity_before_and_after(tmp_path):
    folder = tiny_folder(tmp_path)
    res = recover(folder, write_data(tmp_path / "d.jsonl"), out=tmp_path / "rec",
                  config=RecoverConfig(**{**QUICK, "max_steps": 1}), device="cpu", eval_windows=2,
                  ppl_seq_len=64)
    r = res.report
    assert r["ppl_before"] > 1 and r["ppl_after"] > 1 and "held-out" in r["ppl_protocol"]


def test_bad_input(tmp_path):
    folder = tiny_folder(tmp_path)
    data = write_data(tmp_path / "d.jsonl")
    with pytest.raises(CorpusError):
        recover(folder, str(tmp_path / "missing.jsonl"), out=tmp_path / "a", device="cpu", eval_ppl=None)
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError):
        recover(folder, data, out=tmp_path / "exists", device="cpu", eval_ppl=None)
    for bad in (dict(lora_r=0), dict(lr=0), dict(epochs=0), dict(targets=("lm_head",)), dict(seq_len=4),
                dict(eval_fraction=1.0), dict(keep_mask="sometimes")):
        with pytest.raises(ConfigError):
            RecoverConfig(**bad)


def test_options_that_would_be_ignored_are_refused():
    with pytest.raises(ConfigError, match="--lora-r, --targets have no effect with --full"):
        RecoverConfig(full=True, lora_r=16, targets=("q_proj",))
    with pytest.raises(ConfigError, match="--kd-alpha has no effect without --kd"):
        RecoverConfig(kd_alpha=0.5)
    RecoverConfig(full=True, kd=True, kd_alpha=0.5, kd_temperature=1.0)  # each option where it applies
    RecoverConfig(lora_r=16, targets=list(("q_proj", "v_proj")))


def test_cli_recover(tmp_path, capsys):
    folder = tiny_folder(tmp_path)
    data = write_data(tmp_path / "d.jsonl")
    args = ["recover", "--model", folder, "--data", data, "--out", str(tmp_path / "rec"), "--max-steps", "2",
            "--batch-size", "4", "--grad-accum", "1", "--seq-len", "96", "--eval-data", "none",
            "--device", "cpu"]
    assert main(args + ["--json"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{"):out.rindex("}") + 1])
    assert report["kind"] == "recover" and report["steps"] == 2
    assert main(args) == 2  # the output exists now
    assert "exists" in capsys.readouterr().err
    assert main(["recover", "--model", folder, "--data", data, "--out", str(tmp_path / "r2"),
                 "--lora-r", "0"]) == 2


def test_a_template_that_refuses_a_conversation_falls_back_to_the_plain_layout():
    tok = _tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('no system role') }}{% endif %}{{ m['content'] }}{% endfor %}")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}]
    enc = encode(tok, msgs, 512)
    assert "### Instruction:" in tok.decode(enc["input_ids"])


def test_overwrite_starts_afresh(tmp_path):
    folder = tiny_folder(tmp_path)
    data = write_data(tmp_path / "d.jsonl")
    cfg = RecoverConfig(**{**QUICK, "max_steps": 2})
    recover(folder, data, out=tmp_path / "rec", config=cfg, device="cpu", eval_ppl=None,
            keep_checkpoints=True)
    assert (tmp_path / "rec.checkpoints").is_dir()
    res = recover(folder, data, out=tmp_path / "rec", config=cfg, device="cpu", eval_ppl=None, overwrite=True)
    assert res.report["training"]["resumed_from"] is None and res.report["steps"] == 2


def test_a_full_disk_while_training_is_one_error_and_resumable(tmp_path, monkeypatch):
    """torch.save reports a full disk as RuntimeError('... file write failed'): one typed error."""
    from codeprune.errors import OutputWriteError

    folder = tiny_folder(tmp_path)
    data = write_data(tmp_path / "d.jsonl")
    cfg = RecoverConfig(**{**QUICK, "save_steps": 2, "eval_steps": 2})

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing "
                           "file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OutputWriteError, match="cannot write the training checkpoints .* file write failed"):
        recover(folder, data, out=tmp_path / "rec", config=cfg, device="cpu", eval_ppl=None)
    assert not (tmp_path / "rec").exists()
