"""Distillation recovery: the KD loss by hand, KL to the teacher going down, zeros kept with LoRA
and full fine-tuning, vocabulary-pruned students, code data, bad input."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from codeprune.cli import main
from codeprune.data.prompts import IGNORE
from codeprune.errors import ConfigError
from codeprune.methods import make_pruner
from codeprune.methods.structured.prune import prune_structured_
from codeprune.methods.unstructured.base import prune_model_
from codeprune.methods.vocab import count_tokens, prune_vocab_, select_vocab
from codeprune.models.checkpoint import save_checkpoint
from codeprune.models.dtypes import fast_bfloat16
from codeprune.options import count
from codeprune.workflows.kd import kd_loss, vocabulary_map
from codeprune.workflows.recover import data_kind, recover

from ..conftest import _tokenizer, make_tiny

SHARP = dict(initializer_range=0.2)  # peaked next-token distributions: a pruned copy differs clearly


def code_dir(tmp_path, files=30):
    folder = tmp_path / "code"
    folder.mkdir()
    for k in range(files):
        body = "".join(f"def f{k}_{j}(x):\n    return x + {j}\n\nclass A{j}:\n    pass\n" for j in range(12))
        (folder / f"m{k}.py").write_text(f"import os\n\n{body}")
    return f"python:{folder}"


# -- the loss ---------------------------------------------------------------------------------------

def _by_hand(s, t, labels, temperature, alpha, kept=None):
    """The definition, position by position, in float64."""
    total, n = 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1] - 1):
            target = int(labels[b, i + 1])
            if target == IGNORE:
                continue
            n += 1
            zs, zt = s[b, i].double(), t[b, i].double()
            if kept is not None:
                zt = zt[kept]
            ps = torch.softmax(zs / temperature, -1)
            pt = torch.softmax(zt / temperature, -1)
            kl = sum(float(pt[v] * (math.log(pt[v]) - math.log(ps[v]))) for v in range(len(pt)))
            ce = -math.log(float(torch.softmax(zs, -1)[target]))
            total += (1 - alpha) * temperature ** 2 * kl + alpha * ce
    return total / n


def test_kd_loss_equals_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g) * 3, torch.randn(2, 5, 7, generator=g) * 3
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[0, :3] = IGNORE  # a prompt: no loss on its positions
    for temperature, alpha in ((1.0, 0.0), (2.0, 0.0), (2.0, 0.3), (0.5, 1.0)):
        got = kd_loss(s, t, labels, temperature=temperature, alpha=alpha)
        assert got.item() == pytest.approx(_by_hand(s, t, labels, temperature, alpha), rel=1e-5)


def test_kd_loss_on_a_restricted_vocabulary():
    g = torch.Generator().manual_seed(1)
    kept = torch.tensor([0, 2, 3, 6, 9])  # the teacher id of each of the student's 5 tokens
    s, t = torch.randn(1, 6, 5, generator=g) * 2, torch.randn(1, 6, 11, generator=g) * 2
    labels = torch.randint(0, 5, (1, 6), generator=g)
    got = kd_loss(s, t, labels, temperature=1.5, alpha=0.2, kept=kept)
    assert got.item() == pytest.approx(_by_hand(s, t, labels, 1.5, 0.2, kept), rel=1e-5)
    # the student that reproduces the teacher's restricted logits has no KL left
    assert kd_loss(t[..., kept], t, labels, kept=kept).item() == pytest.approx(0, abs=1e-6)


def test_kd_loss_is_zero_when_the_student_is_the_teacher_and_averages_over_the_step():
    g = torch.Generator().manual_seed(2)
    t = torch.randn(3, 8, 9, generator=g)
    labels = torch.randint(0, 9, (3, 8), generator=g)
    assert kd_loss(t.clone(), t, labels, temperature=3.0).item() == pytest.approx(0, abs=1e-6)
    s = torch.randn(3, 8, 9, generator=g)
    mean = kd_loss(s, t, labels)
    # num_items: the trained positions of the whole optimizer step (gradient accumulation)
    assert kd_loss(s, t, labels, num_items=3 * 7 * 2).item() == pytest.approx(mean.item() / 2, rel=1e-6)


def test_kd_loss_refuses_another_vocabulary():
    with pytest.raises(ConfigError, match="share the student's vocabulary"):
        kd_loss(torch.zeros(1, 3, 5), torch.zeros(1, 3, 6), torch.zeros(1, 3, dtype=torch.long))


def _keep(lm) -> list[int]:
    """Flab-Pruner's vocabulary stage on a small code text: the tokens it uses, specials, bytes."""
    text = ["def f(x):\n    return x + 1\n"] * 3
    keep = select_vocab(lm.tokenizer, count_tokens(lm.tokenizer, text))
    assert len(keep) < len(lm.tokenizer)
    return keep


def test_vocabulary_map_of_a_pruned_student():
    tok = _tokenizer()
    student = make_tiny("llama", tokenizer=_tokenizer())
    keep = _keep(student)
    prune_vocab_(student, keep)
    kept = vocabulary_map(tok, student.tokenizer, len(student.tokenizer), len(tok))
    assert kept.tolist() == keep  # student id i is the teacher's keep[i]
    assert vocabulary_map(tok, _tokenizer(), len(tok), len(tok)) is None
    with pytest.raises(ConfigError):
        vocabulary_map(tok, _tokenizer(), len(tok), len(tok) + 8)


# -- recovery with a teacher -------------------------------------------------------------------------

QUICK = dict(kd=True, tokens=3000, seq_len=48, batch_size=4, grad_accum=1, eval_fraction=0.2, eval_steps=100,
             teacher_dtype="float32")


def _structured_pair(tmp_path):
    teacher = make_tiny("llama", **SHARP)
    t_dir = save_checkpoint(teacher, tmp_path / "teacher")
    student = make_tiny("llama", **SHARP)
    x = torch.randint(0, 250, (4, 32), generator=torch.Generator().manual_seed(0))
    prune_structured_(student, make_pruner("flap", ratio=0.3, structure="uniform"), x)
    return t_dir, save_checkpoint(student, tmp_path / "student")


def test_kd_lowers_the_held_out_kl_to_the_teacher(tmp_path):
    t_dir, s_dir = _structured_pair(tmp_path)
    res = recover(s_dir, code_dir(tmp_path), out=tmp_path / "kd", teacher=t_dir, max_steps=15, lr=1e-2,
                  device="cpu", eval_ppl=None, **QUICK)
    r = res.report
    # alpha 0: the evaluation loss is T^2 x the mean KL(teacher || student) on held-out windows
    assert r["eval_loss_after"] < 0.8 * r["eval_loss_before"]
    assert r["kd"]["teacher"] and r["kd"]["alpha"] == 0 and r["kd"]["restricted_vocab"] is None
    assert r["kd"]["teacher_dtype"] == "float32"
    assert r["training"]["objective"] == "kd" and r["data"]["kind"] == "code"
    assert r["tokens_seen"] == 15 * 4 * 48 and r["tokens_per_second"] > 0
    assert "distillation loss" in (res.out / "report.md").read_text()


@pytest.mark.parametrize("full", [False, True])
def test_unstructured_zeros_survive_kd(tmp_path, full):
    teacher = make_tiny("llama")
    t_dir = save_checkpoint(teacher, tmp_path / "teacher")
    lm = make_tiny("llama")
    x = torch.randint(0, 250, (4, 32), generator=torch.Generator().manual_seed(0))
    prune_model_(lm, make_pruner("wanda", sparsity=0.5, pattern="2:4"), x)
    zeros = {n: (p == 0) for n, p in lm.model.named_parameters() if n.endswith("proj.weight")}
    s_dir = save_checkpoint(lm, tmp_path / "student")
    res = recover(s_dir, code_dir(tmp_path), out=tmp_path / "kd", teacher=t_dir, max_steps=4, lr=5e-3,
                  full=full, device="cpu", eval_ppl=None, **QUICK)
    merged = dict(AutoModelForCausalLM.from_pretrained(res.out).named_parameters())
    for name, z in zeros.items():
        assert torch.equal(merged[name] == 0, z), name
    changed = [n for n in zeros if not torch.equal(merged[n], dict(lm.model.named_parameters())[n])]
    assert changed  # it did train
    assert res.report["sparsity_after"] == pytest.approx(0.5)
    assert (res.report["lora"] is None) == full and (res.out / "adapter").is_dir() != full
    if full:
        assert res.report["training"]["mode"] == "full"
        assert res.report["training"]["trainable_params"] == sum(p.numel() for p in lm.model.parameters())


def test_a_vocabulary_pruned_student_learns_the_restricted_distribution(tmp_path):
    t_dir = save_checkpoint(make_tiny("llama", **SHARP), tmp_path / "teacher")
    data = code_dir(tmp_path)
    for seed in (0, 1):  # 0: the teacher's own weights with a pruned vocabulary
        student = make_tiny("llama", seed=seed, **SHARP)
        keep = _keep(student)
        prune_vocab_(student, keep)
        s_dir = save_checkpoint(student, tmp_path / f"student{seed}")
        res = recover(s_dir, data, out=tmp_path / f"kd{seed}", teacher=t_dir, max_steps=12, lr=1e-2,
                      device="cpu", eval_ppl=None, **QUICK)
        r = res.report
        assert r["kd"]["restricted_vocab"] == len(keep)
        if seed == 0:  # ids mapped, teacher restricted and renormalised: nothing left to learn
            assert r["eval_loss_before"] == pytest.approx(0, abs=1e-5)
        else:
            assert r["eval_loss_after"] < 0.85 * r["eval_loss_before"]


def test_a_teacher_of_another_family_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"<unk>": 0, "zz": 1, "yy": 2}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    other = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="<unk>")
    t_dir = save_checkpoint(make_tiny("llama", tokenizer=other), tmp_path / "teacher")
    s_dir = save_checkpoint(make_tiny("llama"), tmp_path / "student")
    with pytest.raises(ConfigError, match="not a pruned version"):
        recover(s_dir, code_dir(tmp_path), out=tmp_path / "kd", teacher=t_dir, device="cpu", eval_ppl=None,
                **QUICK)
    assert not (tmp_path / "kd").exists()


def test_cli_kd_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    s_dir = str(save_checkpoint(make_tiny("llama"), tmp_path / "student"))
    data = code_dir(tmp_path)
    cases = [
        (["--kd"], "give --teacher"),
        (["--teacher", s_dir], "add --kd"),
        (["--teacher", s_dir, "--kd", "--kd-alpha", "1.5"], "kd alpha"),
        (["--teacher", s_dir, "--kd", "--kd-temperature", "0"], "kd temperature"),
        (["--teacher", s_dir, "--kd", "--teacher-dtype", "int8"], "unknown dtype"),
        (["--teacher", str(tmp_path / "nope"), "--kd"], "nope"),
    ]
    with pytest.raises(SystemExit) as exc:  # argparse's usage error, one line (cli/parser.py)
        main(["recover", "--model", s_dir, "--data", data, "--out", str(tmp_path / "o"), "--tokens", "lots"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "--tokens" in err and len(err.splitlines()) == 1
    for extra, message in cases:
        code = main(["recover", "--model", s_dir, "--data", data, "--out", str(tmp_path / "o"), *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1, (extra, err)
        assert not (tmp_path / "o").exists()


def test_cli_kd_on_code(tmp_path, capsys):
    t_dir = str(save_checkpoint(make_tiny("llama"), tmp_path / "teacher"))
    s_dir = str(save_checkpoint(make_tiny("llama", seed=1), tmp_path / "student"))
    code = main(["recover", "--model", s_dir, "--teacher", t_dir, "--kd", "--kd-alpha", "0.5",
                 "--kd-temperature", "2", "--data", code_dir(tmp_path), "--tokens", "2k", "--seq-len", "48",
                 "--max-steps", "2", "--eval-data", "none", "--device", "cpu", "--out", str(tmp_path / "o"),
                 "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kd"]["temperature"] == 2 and report["kd"]["alpha"] == 0.5
    assert report["kd"]["teacher_dtype"] == ("bfloat16" if fast_bfloat16("cpu") else "float32")  # auto
    assert report["data"]["train_tokens"] == math.ceil(2000 / 48) * 48


def test_data_kind(tmp_path):
    instr = tmp_path / "i.jsonl"
    instr.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    text = tmp_path / "t.jsonl"
    text.write_text(json.dumps({"text": "def f(): pass"}) + "\n")
    assert data_kind(str(instr)) == "instructions" and data_kind(str(text)) == "code"
    assert data_kind("python-stdlib") == "code" and data_kind("code-ppl") == "code"
    assert data_kind("hf:org/set:train") == "instructions"
    assert data_kind(str(instr), "code") == "code"


def test_counts():
    assert count("200k") == 200_000 and count("1.5M") == 1_500_000 and count("2_000") == 2000
    for bad in ("lots", "1.5", "k"):
        with pytest.raises(ValueError):
            count(bad)


def test_full_fine_tuning_of_a_model_with_tied_embeddings(tmp_path):
    lm = make_tiny("qwen2", tie_word_embeddings=True)
    s_dir = save_checkpoint(lm, tmp_path / "student")
    res = recover(s_dir, code_dir(tmp_path), out=tmp_path / "full", full=True, max_steps=3, lr=1e-3,
                  tokens=2000, seq_len=48, batch_size=4, eval_fraction=0, device="cpu", eval_ppl=None)
    out = AutoModelForCausalLM.from_pretrained(res.out)
    assert out.config.tie_word_embeddings
    assert out.lm_head.weight.data_ptr() == out.model.embed_tokens.weight.data_ptr()
    before = dict(lm.model.named_parameters())
    assert not torch.equal(out.model.embed_tokens.weight, before["model.embed_tokens.weight"])  # trained
    assert res.report["training"]["objective"] == "ce" and res.report["lora"] is None
