"""Export a trained LoRA adapter as one GGUF file (llama.cpp, Ollama, LM Studio), checked against the merged model.

sftmix-trl export --adapter_path outputs/demo/sft_qlora --output_dir outputs/demo/gguf [--gguf q8_0|f16|bf16|q4_k_m]
python recipes/export.py --adapter_path ADAPTER --output_dir OUT [--llama_cpp_dir LLAMA_CPP] [--eval_data FILE]

See sftmix_trl/commands/export.py and docs/serving.md.
"""

from sftmix_trl.commands.export import ARGUMENTS, main, run  # noqa: F401  (`main` and `ARGUMENTS`: for tests and imports)

if __name__ == "__main__":
    run()
