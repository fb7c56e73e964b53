"""`sftmix-trl generate`: greedy replies through the chat template, batched like one prompt at a time, printed."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from test_evaluation import make_adapter

from sftmix_trl.after_training.generate import (
    GenerateArguments,
    GenerateError,
    generate,
    generate_replies,
    read_prompts,
)
from sftmix_trl.configs import ModelArguments
from sftmix_trl.model import load_tokenizer

PROMPTS = ["Name a colour.", "What helps a sore throat when it has lasted for a week?", "Hi"]


def test_batched_greedy_replies_equal_one_prompt_at_a_time(tiny_model):
    from transformers import LlamaForCausalLM

    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(tiny_model)))
    model = LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float64).eval()
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    batched = generate_replies(model, tokenizer, conversations, max_new_tokens=12, batch_size=3)
    assert tokenizer.padding_side == "right"  # restored
    for conversation, reply in zip(conversations, batched):
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
        with torch.no_grad():
            alone = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_token_id)
        assert reply == tokenizer.decode(alone[0, ids.shape[1] :], skip_special_tokens=True)
    assert any(batched)


def test_prompts_come_from_the_command_line_and_a_file(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\nsecond\n")
    assert read_prompts(GenerateArguments(prompt=["zero"], prompts_file=str(tmp_path / "p.txt"))) == [
        "zero",
        "first",
        "second",
    ]
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"text": "b"}) + "\n")
    with pytest.raises(GenerateError, match=r"p\.jsonl, record 2: missing field 'prompt'"):
        read_prompts(GenerateArguments(prompts_file=str(tmp_path / "p.jsonl")))
    with pytest.raises(GenerateError, match="nothing to answer"):
        GenerateArguments()


def test_generate_with_an_adapter_uses_the_base_it_records(tiny_model, tmp_path, capsys):
    adapter = make_adapter(tiny_model, tmp_path / "adapter")
    args = GenerateArguments(
        adapter_path=str(adapter), prompt=PROMPTS[:2], max_new_tokens=6, output_file=str(tmp_path / "r.jsonl")
    )
    records = generate(args, ModelArguments(load_in_4bit=False))
    assert [r["prompt"] for r in records] == PROMPTS[:2]
    printed = capsys.readouterr().out
    assert all(f"### {p}\n{r['reply']}\n" in printed for p, r in zip(PROMPTS, records))
    assert [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()] == records


def test_generate_command_prints_the_replies(tiny_model):
    cmd = [sys.executable, "-m", "sftmix_trl.cli", "generate", "--model_name_or_path", str(tiny_model),
           "--load_in_4bit", "false", "--prompt", "Name a colour.", "--max_new_tokens", "4"]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "### Name a colour.\n" in result.stdout
