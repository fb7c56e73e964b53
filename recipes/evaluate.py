"""Evaluation through lm-eval-harness and held-out response perplexity (`sftmix-trl evaluate` as a script).

python recipes/evaluate.py --model_name_or_path BASE [--adapter_path ADAPTER] --tasks ifeval pubmedqa ... [--key value]
accelerate launch recipes/evaluate.py --config my_eval.yaml     # several processes share the items

What it reads, does and writes: sftmix_trl/commands/evaluate.py.
"""

from sftmix_trl.commands.evaluate import ARGUMENTS, main, run  # noqa: F401  (`main` and `ARGUMENTS`: for tests and imports)

if __name__ == "__main__":
    run()
