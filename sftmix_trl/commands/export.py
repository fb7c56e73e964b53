"""Export a trained LoRA adapter as one GGUF file (llama.cpp, Ollama, LM Studio), checked against the merged model.

sftmix-trl export --adapter_path outputs/demo/sft_qlora --output_dir outputs/demo/gguf [--gguf q8_0|f16|bf16|q4_k_m]
python recipes/export.py --adapter_path ADAPTER --output_dir OUT [--llama_cpp_dir LLAMA_CPP] [--eval_data FILE]

Merges as `merge` does, converts with llama.cpp's own converter (the k-quants through its quantiser), embeds the
run's chat template, then compares the GGUF with the merged model on held-out text. Writes the .gguf, README.md
(the card, with the check's figures), export_check.json and an Ollama Modelfile.
"""

from __future__ import annotations

from sftmix_trl.after_training.export import ExportArguments, export
from sftmix_trl.commands.evaluate import quiet_logging
from sftmix_trl.runs import launch

ARGUMENTS = (ExportArguments,)


def main(args: ExportArguments) -> None:
    quiet_logging()
    export(args)


def run() -> None:
    launch(main, ARGUMENTS)


if __name__ == "__main__":
    run()
