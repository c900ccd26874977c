"""Instruction examples as training sequences: the prompt rendering that recovery trains on.

    segs = prompt_segments(tokenizer, messages)    # [(text, trained)], cut at the assistant turns
    enc = encode(tokenizer, messages, seq_len=512) # {"input_ids", "labels"}: loss on the answers only

A conversation is rendered with the tokenizer's chat template when it has one
(and the template renders each turn as a prefix of the next), else with a plain
"### Instruction / ### Response" layout. ``codeprune recover`` trains on the
assistant tokens only (labels ``IGNORE`` elsewhere), and ``codeprune distill-data``
prompts models exactly the same way, so the answers it judges are the ones
recovery would train.
"""

from __future__ import annotations

import torch

IGNORE = -100  # the label of tokens outside the answers (the loss skips them)

# The instruct format of HumanEval (``codeprune eval --humaneval --prompt-format instruct``) and of
# completion-style instruction pairs (``codeprune instructions --style completion``): one source,
# so recovery trains exactly the format the model is evaluated in.
RESPONSE_PREFIX = "```python\n"  # instruct answers start with it (part of the evaluation prompt)
INSTRUCT_STOP = ("\n```",)  # the fence that closes the answer's code
INSTRUCTION = ("Complete the following Python function. Answer with the whole function "
               "in one ```python code block.\n\n```python\n{prompt}```")


def humaneval_messages(problem: str) -> list[dict]:
    """The user turn that asks for ``problem`` (signature + docstring) to be completed."""
    return [{"role": "user", "content": INSTRUCTION.format(prompt=problem)}]


def prompt_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """[(text, trained)]: the conversation cut at the assistant turns."""
    template = getattr(tokenizer, "chat_template", None)
    if template:
        segs, done = [], ""
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            try:
                prompt = tokenizer.apply_chat_template(messages[:k], tokenize=False,
                                                       add_generation_prompt=True)
                full = tokenizer.apply_chat_template(messages[:k + 1], tokenize=False)
            except Exception:  # the template refuses this conversation (roles, system turns): plain layout
                break
            if not (full.startswith(prompt) and prompt.startswith(done)):
                break  # a template that rewrites earlier turns: fall back to the plain layout
            segs += [(prompt[len(done):], False), (full[len(prompt):], True)]
            done = full
        else:
            return segs
    eos = tokenizer.eos_token or ""
    segs = []
    for m in messages:
        if m["role"] == "system":
            segs.append((m["content"].strip() + "\n\n", False))
        elif m["role"] == "user":
            segs.append((f"### Instruction:\n{m['content'].strip()}\n\n### Response:\n", False))
        else:
            segs.append((m["content"] + eos, True))
            segs.append(("\n\n", False))
    return segs


def encode(tokenizer, messages: list[dict], seq_len: int) -> dict | None:
    """{"input_ids", "labels"} with labels only on assistant tokens; None when truncation
    leaves no assistant token."""
    ids, labels = [], []
    segs = prompt_segments(tokenizer, messages)
    bos = tokenizer("", add_special_tokens=True)["input_ids"]
    if bos and not (tokenizer.bos_token and segs and segs[0][0].startswith(tokenizer.bos_token)):
        ids, labels = list(bos), [IGNORE] * len(bos)
    for text, trained in segs:
        t = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += t
        labels += t if trained else [IGNORE] * len(t)
    ids, labels = ids[:seq_len], labels[:seq_len]
    if all(x == IGNORE for x in labels[1:]):
        return None
    return {"input_ids": ids, "labels": labels}


class Collator:
    """Pads a batch to its longest example (labels with -100)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict:
        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            labels[i, :k] = torch.tensor(b["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def encode_all(tokenizer, examples: list, seq_len: int) -> tuple[list[dict], int]:
    """Encode instruction examples (``data.instructions.Example``: ``.messages``); (encoded, dropped)."""
    out, dropped = [], 0
    for ex in examples:
        enc = encode(tokenizer, ex.messages, seq_len)
        if enc is None:
            dropped += 1
        else:
            out.append(enc)
    return out, dropped
