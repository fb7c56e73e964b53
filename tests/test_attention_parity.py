"""benchmarks/attention_parity.py, the GPU check's comparison of attention implementations on padding-free rows, run
on the CPU with the implementations a CPU trains with (sdpa, eager): same rows, same loss, and a difference is flagged."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import attention_parity  # noqa: E402


def parity(monkeypatch, *argv: str) -> None:
    monkeypatch.setattr(sys, "argv", ["attention_parity.py", *argv])
    attention_parity.main()


def test_sdpa_and_eager_give_the_same_loss_on_the_same_padding_free_rows(tiny_model, tmp_path, monkeypatch, capsys):
    for name in ("sdpa", "eager"):
        parity(monkeypatch, "--attention", name, "--model", str(tiny_model), "--device", "cpu", "--steps", "3",
               "--min_tokens", "64", "--max_tokens", "256", "--no_4bit", "--json", str(tmp_path / f"{name}.json"))  # fmt: skip
    runs = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in ("sdpa", "eager")}
    tokens = [step["tokens"] for step in runs["sdpa"]["steps"]]
    assert tokens == [step["tokens"] for step in runs["eager"]["steps"]] and len(set(tokens)) == 3  # new length each
    capsys.readouterr()
    parity(monkeypatch, "--summarise", str(tmp_path / "sdpa.json"), str(tmp_path / "eager.json"))
    eager = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| eager |"))
    cells = [cell.strip() for cell in eager.strip("|").split("|")]
    assert float(cells[2]) < 1e-5 and float(cells[3]) < 1e-4  # loss and gradient norm
    assert cells[-1] in ("yes", "no: equal, not faster")


def test_a_loss_that_differs_from_sdpa_fails_the_check(tmp_path, monkeypatch, capsys):
    step = {"tokens": 100, "loss": 2.0, "grad_norm": 1.0, "seconds": 1.0}
    common = {"peak_gib": None, "unique_graphs": 3, "recompiles": 2}
    (tmp_path / "sdpa.json").write_text(json.dumps({"attention": "sdpa", "steps": [step, step], **common}))
    leaky = {**step, "loss": 2.1, "seconds": 0.5}  # e.g. examples of a row seeing each other
    (tmp_path / "flex.json").write_text(json.dumps({"attention": "flex_attention", "steps": [leaky, leaky], **common}))
    with pytest.raises(SystemExit) as stop:
        parity(monkeypatch, "--summarise", str(tmp_path / "sdpa.json"), str(tmp_path / "flex.json"))
    assert stop.value.code == 1
    assert "| flex_attention | 2 | 5.00e-02 | 0.00e+00 |" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU flex_attention loads as asked")
def test_flex_falling_back_to_sdpa_on_a_cpu_is_not_compared_with_sdpa(tiny_model, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="asked for flex_attention, transformers loaded sdpa"):
        parity(monkeypatch, "--attention", "flex_attention", "--model", str(tiny_model), "--device", "cpu",
               "--steps", "1", "--json", str(tmp_path / "flex.json"))  # fmt: skip
