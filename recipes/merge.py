"""Merge a saved LoRA adapter into its (unquantised) base: a standalone model folder, served without PEFT.

sftmix-trl merge --adapter_path outputs/demo/sftmix_qlora --output_dir outputs/demo/merged [--dtype bfloat16]
python recipes/merge.py --adapter_path ADAPTER [--model_name_or_path BASE] --output_dir OUT [--push_to_hub true ...]

Writes model.safetensors (or shards), config.json, generation_config.json, the tokenizer with the base's own chat
template (no `{% generation %}` markers) and a README.md model card naming the base, the adapter and the method.
"""

from sftmix_trl.commands.merge import ARGUMENTS, main, run  # noqa: F401  (`main` and `ARGUMENTS`: for tests and imports)

if __name__ == "__main__":
    run()
