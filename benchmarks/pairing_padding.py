"""Padding and mixed positions of each way to form micro-batches, on the real length distributions (no model).

    python benchmarks/pairing_padding.py               # the Alpaca and medical files, about a minute on a CPU

`throughput.py` trains on a 64-example pool, where a length sort has little to choose from. This counts what the
samplers do at the sizes users train on: every example of the two shared files (and random subsets of 256 and 1,024),
rendered with the demo model's tokenizer and chat template by TRL's own preparation, no truncation; micro-batches of
8 sequences (4 pairs); a seeded random confidence split into halves (the real split follows perplexity, which this
does not model), 5 seeds. Per sampler: padding (pad slots / computed tokens of a right-padded micro-batch) and the
mixed share (2 x sum over pairs of min(N_c, N_u) / response tokens: the share of response tokens the Mixup term sees).

  TRL NTP, random / group_by_length   transformers' random order and `get_length_grouped_indices` (NTP has no pairs)
  SFTMix, random pairs                `PairedSampler`
  SFTMix, length-aware pairs          `PairedSampler` with lengths (`train_sampling_strategy: group_by_length`):
                                      the halves paired rank by rank on response length
  (alternative) pairs on total length the same, paired on the whole sequence's length (not in the library: the
                                      question is whether it would be worth shipping for the padded path)

Written to benchmarks/results/pairing_padding.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402  (the data folder and file names of the throughput benchmark)

MICRO_BATCH = 8


def real_lengths(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, response tokens) of every example of a shared file, as TRL prepares it for the demo model."""
    from sftmix_trl.configs import ModelArguments, ScriptArguments, SFTConfig
    from sftmix_trl.data.checks import prepare_like_trl
    from sftmix_trl.data.load import load_datasets
    from sftmix_trl.demo_model import prepare_demo_model
    from sftmix_trl.model import load_tokenizer

    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(prepare_demo_model())))
    dataset = load_datasets(ScriptArguments(dataset_name=str(throughput.data_dir() / throughput.DATASETS[name])))[0]
    args = SFTConfig(output_dir="unused", max_length=None, report_to="none")
    prepared = prepare_like_trl(dataset, tokenizer, args).select_columns(["input_ids", "labels"])
    lengths = np.array([len(ids) for ids in prepared["input_ids"]])
    responses = np.array([sum(label != -100 for label in labels) for labels in prepared["labels"]])
    return lengths, responses


def padding(lengths: np.ndarray, order: np.ndarray) -> float:
    """Pad slots / computed tokens when `order` is cut into right-padded micro-batches."""
    batches = [lengths[order[i : i + MICRO_BATCH]] for i in range(0, len(order), MICRO_BATCH)]
    computed = sum(len(b) * b.max() for b in batches)
    return 1 - sum(b.sum() for b in batches) / computed


def mixed_share(responses: np.ndarray, pairs: np.ndarray) -> float:
    return 2 * np.minimum(responses[pairs[:, 0]], responses[pairs[:, 1]]).sum() / responses[pairs].sum()


def make_total_length_sampler():
    from sftmix_trl.sftmix.sampler import PairedSampler

    class TotalLengthPairs(PairedSampler):
        def _by_length(self, rows: torch.Tensor) -> torch.Tensor:
            key = self.lengths[rows] * (int(self.response_lengths.max()) + 1) + self.response_lengths[rows]
            return rows[torch.sort(key, descending=True, stable=True).indices]

    return TotalLengthPairs


def measure(lengths: np.ndarray, responses: np.ndarray, seed: int) -> dict[str, tuple[float, float | None]]:
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from sftmix_trl.sftmix.sampler import PairedSampler

    rng = np.random.default_rng(seed)
    halves = rng.permutation(len(lengths))
    confident, unconfident = halves[: len(halves) // 2], halves[len(halves) // 2 :]
    generator = torch.Generator().manual_seed(seed)
    grouped = np.array(get_length_grouped_indices(lengths.tolist(), MICRO_BATCH, generator=generator))
    results = {
        "TRL NTP, random": (padding(lengths, rng.permutation(len(lengths))), None),
        "TRL NTP, group_by_length": (padding(lengths, grouped), None),
    }
    samplers = {
        "SFTMix, random pairs": PairedSampler(confident, unconfident, MICRO_BATCH // 2, seed=seed),
        "SFTMix, length-aware pairs": PairedSampler(
            confident, unconfident, MICRO_BATCH // 2, seed=seed, lengths=lengths, response_lengths=responses
        ),
        "(alternative) length-aware, pairs on total length": make_total_length_sampler()(
            confident, unconfident, MICRO_BATCH // 2, seed=seed, lengths=lengths, response_lengths=responses
        ),
    }
    for name, sampler in samplers.items():
        pairs = sampler.pairs().numpy()  # (n, 2)
        results[name] = (padding(lengths, pairs.flatten()), mixed_share(responses, pairs))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="256,1024,0", help="dataset sizes (0: the whole file)")
    parser.add_argument("--seeds", type=int, default=5)
    opts = parser.parse_args()

    lines = [
        "# Padding and mixed share of each sampler on real lengths",
        "",
        f"Demo tokenizer and chat template, TRL's preparation, no truncation; micro-batches of {MICRO_BATCH} "
        f"sequences; a random confidence split into halves; mean over {opts.seeds} seeds (range in brackets). "
        "Padding: pad slots / computed tokens of right-padded micro-batches (padding-free batches have none). Mixed "
        "share: 2 x mixed positions / response tokens.",
        "",
    ]
    for name in throughput.DATASETS:
        all_lengths, all_responses = real_lengths(name)
        lines += [
            f"## {name} ({len(all_lengths)} examples, mean {all_lengths.mean():.0f} tokens, "
            f"{all_responses.mean():.0f} response tokens)",
            "",
            "| sampler | examples | padding | mixed share |",
            "| --- | --- | --- | --- |",
        ]
        for size in [int(s) for s in opts.sizes.split(",")]:
            runs = []
            for seed in range(opts.seeds):
                subset = np.random.default_rng(1000 + seed).permutation(len(all_lengths))[: size or None]
                runs.append(measure(all_lengths[subset], all_responses[subset], seed))
            for sampler in runs[0]:
                pads = [100 * run[sampler][0] for run in runs]
                row = f"| {sampler} | {size or len(all_lengths)} | {statistics.mean(pads):.1f}% "
                row += f"({min(pads):.1f}-{max(pads):.1f}) | "
                shares = [run[sampler][1] for run in runs]
                row += "-" if shares[0] is None else f"{statistics.mean(shares):.3f}"
                lines.append(row + " |")
        lines.append("")
    text = "\n".join(lines)
    throughput.write_report("pairing_padding.md", text)


if __name__ == "__main__":
    main()
