"""Evaluate a base model, or a base + saved LoRA adapter, through lm-eval-harness: this package's IFEval and medical
multiple choice on local files, any lm-eval task by name, and held-out response perplexity.

python recipes/evaluate.py --model_name_or_path BASE [--adapter_path ADAPTER] --tasks ifeval pubmedqa ... [--key value]
python recipes/evaluate.py --config my_eval.yaml [--key value ...]
accelerate launch recipes/evaluate.py --config my_eval.yaml     # several processes share the items
sftmix-trl evaluate --config my_eval.yaml                        # an installed package, no clone

IFEval's rules need NLTK's punkt_tab: set NLTK_DATA (the shared data's nltk_data/ has it).

Writes eval_results.json (every figure, the model, adapter and configuration it came from, package versions),
eval_results.md and samples_<task>.jsonl into `output_dir`.
"""

from sftmix_trl.commands.evaluate import ARGUMENTS, main, run  # noqa: F401  (`main` and `ARGUMENTS`: for tests and imports)

if __name__ == "__main__":
    run()
