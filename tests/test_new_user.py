"""What a new user meets first (issue 13): bad data that must end in one line with nothing written, the model card,
the logs, resuming the NTP recipe, and the `sftmix-trl` command of an installed package."""

import contextlib
import json
import logging
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, run_recipe, write_jsonl
from safetensors.torch import load_file
from test_resume import kill_when

import sftmix_trl.sftmix_trainer as trainer_module
from sftmix_trl import hub
from sftmix_trl.configs import ModelArguments, ScriptArguments, SFTConfig
from sftmix_trl.data import DataError, DataSource, load_datasets, load_source
from sftmix_trl.data_checks import check_training_data, prepare_like_trl
from sftmix_trl.model import load_model, load_tokenizer, lora_config
from sftmix_trl.ntp_trainer import NTPTrainer
from sftmix_trl.plots import log_axis_ticks
from sftmix_trl.recipes import sft as sft_recipe
from sftmix_trl.recipes import sftmix as sftmix_recipe
from sftmix_trl.runs import launch
from sftmix_trl.sftmix_config import SFTMixConfig

# -- 1. data files that are not UTF-8 ---------------------------------------------------------------------------------

GOOD = b'{"instruction": "Name a colour.", "output": "Blue."}\n'
LATIN1 = '{"instruction": "Caf\xe9 or tea?", "output": "Tea."}\n'.encode("latin-1")  # one 0xE9 byte


def test_jsonl_that_is_not_utf8_names_file_line_and_byte(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(GOOD + LATIN1)
    with pytest.raises(DataError) as error:
        load_source(DataSource(str(path)))
    offset = len(GOOD) + LATIN1.index(b"\xe9")
    assert str(error.value) == (
        f"{path}, line 2 (byte {offset}): not valid UTF-8 (byte(s) e9: invalid continuation byte); save the file as "
        "UTF-8"
    )


def test_json_array_that_is_not_utf8_names_file_line_and_byte(tmp_path):
    path = tmp_path / "latin1.json"
    data = b"[\n" + GOOD.strip() + b",\n" + LATIN1.strip() + b"\n]"
    path.write_bytes(data)
    offset = data.index(LATIN1[LATIN1.index(b"Caf") + 3 :][:1])
    with pytest.raises(DataError, match=rf"latin1\.json, line 3 \(byte {offset}\): not valid UTF-8"):
        load_source(DataSource(str(path)))


def _stop_message(main, types, argv: list[str], monkeypatch) -> str:
    monkeypatch.setattr(sys, "argv", ["recipe.py", *argv])
    with pytest.raises(SystemExit) as stop:
        launch(main, types)
    return str(stop.value)


def _argv(recipe: str, tiny_model, out, *extra: str) -> list[str]:
    config = f"configs/demo/{recipe}_qlora.yaml"
    return ["--config", config, "--model_name_or_path", str(tiny_model), "--output_dir", str(out), *extra]


def test_recipe_on_a_non_utf8_file_stops_in_one_line_before_writing(tiny_model, tmp_path, monkeypatch):
    (tmp_path / "latin1.jsonl").write_bytes(GOOD + LATIN1)
    out = tmp_path / "out"
    argv = _argv("sft", tiny_model, out, "--dataset_name", str(tmp_path / "latin1.jsonl"), "--dataset_mixture", "null")
    text = _stop_message(sft_recipe.main, sft_recipe.ARGUMENTS, argv, monkeypatch)
    assert text.startswith("error: ") and "\n" not in text and "latin1.jsonl, line 2" in text and "UTF-8" in text
    assert not out.exists()


# -- 2. data that cannot train as configured: one line, before the first write ----------------------------------------


@pytest.fixture
def long_prompts(tmp_path):
    """12 examples whose prompts alone (about 200 tokens with the tiny tokenizer) fill max_length=64."""
    records = [
        {"instruction": f"question {i}: " + "describe the symptoms in detail " * 20, "output": "ok"} for i in range(12)
    ]
    return write_jsonl(tmp_path / "long_prompts.jsonl", records)


@pytest.mark.parametrize("recipe", [sft_recipe, sftmix_recipe])
def test_truncation_that_empties_every_response_stops_before_any_write(
    tiny_model, tmp_path, long_prompts, monkeypatch, recipe
):
    out = tmp_path / "out"
    name = recipe.__name__.rsplit(".", 1)[1]
    argv = _argv(name, tiny_model, out, "--dataset_name", str(long_prompts), "--dataset_mixture", "null")
    argv += ["--max_length", "64", "--eval_split_size", "0", "--eval_strategy", "no"]
    text = _stop_message(recipe.main, recipe.ARGUMENTS, argv, monkeypatch)
    assert re.fullmatch(
        r"error: 12 of the 12 training examples lose their whole response to truncation at max_length=64 "
        r"\(truncation_mode=keep_start\), leaving 0; .* needs at least \d\. Raise `max_length` above \d+ .*",
        text,
    ), text
    assert not out.exists()  # before: sftmix.py wrote confidence/run.json and confidence/reference/, then crashed


@pytest.mark.parametrize(
    "extra, message",
    [
        # 10 examples split 5 / 5: fewer than the 8 pairs of a micro-batch of 16
        (
            ["--per_device_train_batch_size", "16", "--reference_batch_size", "2"],
            r"gives 5 confident and 5 unconfident, fewer than the 8 pairs",
        ),
        # 10 examples in batches of 8: a 2-step reference run cannot give 3 snapshots
        (["--reference_batch_size", "8"], r"reference run has 2 optimizer step\(s\) on 10 examples, fewer than"),
    ],
)
def test_too_few_examples_for_sftmix_stops_before_any_write(tiny_model, tmp_path, monkeypatch, extra, message):
    out = tmp_path / "out"
    argv = _argv("sftmix", tiny_model, out, "--max_train_examples", "10", "--eval_split_size", "0")
    argv += ["--eval_strategy", "no", "--max_length", "512", *extra]
    text = _stop_message(sftmix_recipe.main, sftmix_recipe.ARGUMENTS, argv, monkeypatch)
    assert text.startswith("error: ") and "\n" not in text and re.search(message, text), text
    assert not out.exists()


def test_the_check_prepares_the_data_exactly_as_the_trainer_does(tiny_model, tmp_path, long_prompts):
    """The check runs TRL's own preparation: same rows, tokens and labels as the trainer, truncation drops included."""
    short = load_datasets(ScriptArguments(dataset_name="data/demo/health_qa.json", max_train_examples=6))[0]
    long = load_datasets(ScriptArguments(dataset_name=str(long_prompts), max_train_examples=2))[0]
    from datasets import concatenate_datasets

    dataset = concatenate_datasets([short, long])
    args = SFTConfig(output_dir=str(tmp_path / "o"), max_length=64, report_to="none", gradient_checkpointing=False)
    model_args = ModelArguments(model_name_or_path=str(tiny_model), load_in_4bit=False)
    tokenizer = load_tokenizer(model_args)
    checked = check_training_data(dataset, tokenizer, args, trainer_class=NTPTrainer)
    trainer = NTPTrainer(
        model=load_model(model_args),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(model_args),
    )
    assert len(checked) == len(trainer.train_dataset) == len(short)  # the 2 long prompts lost their response
    for column in ("example_id", "input_ids", "labels"):
        assert checked[column] == trainer.train_dataset[column]
    assert len(prepare_like_trl(long, tokenizer, args)) == 0


# -- 3, 4, 5. the model card ------------------------------------------------------------------------------------------


def _card(tmp_path, **overrides) -> str:
    kwargs = dict(
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        datasets=["org/data"],
        method="SFTMix",
        settings=hub.card_settings(
            SFTMixConfig(output_dir=str(tmp_path / "o"), lr_scheduler_type="cosine", report_to="none"),
            ModelArguments(model_name_or_path="x"),
        ),
        launch_line="accelerate launch --config_file cpu.yaml recipes/sftmix.py --config c.yaml",
    )
    kwargs.update(overrides)
    return hub.write_model_card(str(tmp_path), **kwargs).read_text()


def test_card_links_no_unconfigured_repository_and_cites_the_paper(tmp_path, monkeypatch):
    from sftmix_trl import __version__

    monkeypatch.setattr(hub, "repository_url", lambda: None)
    text = _card(tmp_path)
    hosts = {url.split("/")[2] for url in re.findall(r"\]\((https?://[^)]+)\)", text)}
    assert hosts == {"huggingface.co", "arxiv.org"}  # the base model and the paper, nothing invented
    assert f"sftmix-trl {__version__}" in text
    assert "[arXiv:2410.05248](https://arxiv.org/abs/2410.05248)" in text
    assert f'pip install "sftmix-trl=={__version__}"' in text

    monkeypatch.setattr(hub, "repository_url", lambda: "https://example.org/sftmix-trl")
    assert f"[sftmix-trl](https://example.org/sftmix-trl) {__version__}" in _card(tmp_path)


def test_repository_url_comes_only_from_the_package_metadata(monkeypatch):
    import importlib.metadata

    class Meta:
        def __init__(self, urls):
            self.urls = urls

        def get_all(self, name):
            return self.urls if name == "Project-URL" else None

    monkeypatch.setattr(importlib.metadata, "metadata", lambda name: Meta(["Homepage, https://a.org"]))
    assert hub.repository_url() is None
    monkeypatch.setattr(importlib.metadata, "metadata", lambda name: Meta(["Repository, https://git.example/x"]))
    assert hub.repository_url() == "https://git.example/x"


def test_card_settings_print_enum_values(tmp_path):
    text = _card(tmp_path)
    assert "| `lr_scheduler_type` | `cosine` |" in text
    assert "SchedulerType" not in text and "Strategy." not in text


def test_reproduce_line_without_accelerate_names_the_command(monkeypatch):
    monkeypatch.setattr(hub, "_accelerate_launcher_args", lambda: None)
    monkeypatch.setattr(sys, "argv", ["/venv/bin/sftmix-trl", "--config", "my run.yaml"])
    assert hub.launch_line("sftmix.py") == "sftmix-trl sftmix --config 'my run.yaml'"
    monkeypatch.setattr(sys, "argv", ["recipes/sft.py", "--config", "a.yaml"])
    assert hub.launch_line("sft.py") == "python recipes/sft.py --config a.yaml"


def test_reproduce_line_under_accelerate_has_the_config_file(tmp_path):
    script = tmp_path / "line.py"
    script.write_text("from sftmix_trl.hub import launch_line\nprint('LINE', launch_line('sft.py'))\n")
    config = ROOT / "accelerate_configs" / "cpu.yaml"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        str(script),
        "--seed",
        "3",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    line = next(x for x in result.stdout.splitlines() if x.startswith("LINE "))
    assert line == f"LINE accelerate launch --config_file {config} {script} --seed 3"


# -- 6. the Mixup head's shape under ZeRO-3 ---------------------------------------------------------------------------


def test_mixup_head_shape_is_logged_as_the_loss_sees_it(tiny_model, tmp_path, monkeypatch, caplog):
    """ZeRO-3 simulated: between the model's forward and the gather, the head's weight is a 0-size shard."""
    from test_trainer import build, make_args

    dataset = load_datasets(ScriptArguments(dataset_name="data/demo/health_qa.json", max_train_examples=8))[0]
    trainer = build(tiny_model, dataset, make_args(tmp_path, max_steps=1))
    head = trainer.model.get_base_model().get_output_embeddings()
    full = head.weight.data

    def release(*_):  # after the model's forward, as ZeRO-3 re-partitions the head
        head.weight.data = torch.empty(0)

    @contextlib.contextmanager
    def gathered(weight, bias):  # the gather; the weight stays whole for the backward that follows
        head.weight.data = full
        yield

    trainer.model.register_forward_hook(release)
    monkeypatch.setattr(trainer_module, "maybe_gather_lm_head_ctx", gathered)
    with caplog.at_level(logging.INFO, logger="sftmix_trl"):
        trainer.train()
    shapes = [r.getMessage().rsplit("weight ", 1)[1] for r in caplog.records if "Mixup head weight" in r.getMessage()]
    assert shapes == [str(tuple(full.shape))]


# -- 7. bitsandbytes' Hub kernel warning ------------------------------------------------------------------------------


def test_bitsandbytes_hub_kernel_warning_is_dropped_and_nothing_else(caplog):
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "no kernels")
        logger.warning("another bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]


# -- 8. the confidence plot's log axis --------------------------------------------------------------------------------


@pytest.mark.parametrize("low, high", [(9.0, 14.3), (10.01, 10.5), (1.2, 537.0), (3.0, 9.5), (1.0, 1e12)])
def test_log_axis_ticks_are_few_distinct_and_inside(low, high):
    ticks = log_axis_ticks(low, high)
    assert 3 <= len(ticks) <= 8 and ticks == sorted(set(ticks))
    assert all(low <= t <= high for t in ticks)
    assert len({f"{t:g}" for t in ticks}) == len(ticks)  # labels print distinct


def test_confidence_plot_labels_no_minor_ticks(tmp_path, monkeypatch):
    import matplotlib.figure

    from sftmix_trl.confidence import ConfidenceTable
    from sftmix_trl.plots import plot_confidence

    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: figures.append(self))
    rng = np.random.default_rng(0)
    ppl = rng.uniform(9, 14, size=(40, 1)) * rng.uniform(0.95, 1.05, size=(40, 3))  # less than a decade
    plot_confidence(ConfidenceTable([f"e{i}" for i in range(40)], ppl, np.ones(40, dtype=int)), tmp_path / "c.png")
    axis = figures[0].axes[1].xaxis
    figures[0].canvas.draw()
    assert all(label.get_text() == "" for label in axis.get_minorticklabels())
    major = [label.get_text() for label in axis.get_majorticklabels() if label.get_text()]
    assert len(major) >= 3 and len(set(major)) == len(major)


# -- 9. the NTP recipe resumes with the numerics it started with ------------------------------------------------------


@pytest.mark.slow
def test_sft_killed_after_a_checkpoint_resumes_to_the_same_adapter(tiny_model, tmp_path):
    """A 4-bit base: TRL trains the adapter in bf16; resuming in float32 (PEFT's reload) would end elsewhere."""
    args = ["--config", "configs/demo/sft_qlora.yaml", "--model_name_or_path", str(tiny_model),
            "--max_train_examples", "16", "--eval_split_size", "0", "--eval_strategy", "no", "--max_length", "512",
            "--lora_dropout", "0", "--logging_steps", "1", "--per_device_train_batch_size", "4", "--max_steps",
            "24", "--learning_rate", "1e-2", "--save_strategy", "steps", "--save_steps", "4",
            "--save_total_limit", "10"]  # fmt: skip
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run_recipe("sft.py", *args, "--output_dir", str(full)).returncode == 0

    from test_resume import launch_in_background

    process = launch_in_background("sft.py", *args, "--output_dir", str(cut))
    checkpoint = cut / "checkpoint-8"
    kill_when(process, lambda: (checkpoint / "trainer_state.json").is_file() and (cut / "checkpoint-12").exists())
    assert not (cut / "adapter_model.safetensors").exists()  # really killed before the end
    resumed = run_recipe("sft.py", *args, "--output_dir", str(cut), "--resume_from_checkpoint", str(checkpoint))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected, got = load_file(full / "adapter_model.safetensors"), load_file(cut / "adapter_model.safetensors")
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype == torch.bfloat16, name
        np.testing.assert_allclose(got[name].float().numpy(), tensor.float().numpy(), rtol=1e-4, atol=1e-6)
    history = json.loads((cut / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "loss" in h] == list(range(1, 25))


# -- 10. the `sftmix-trl` command -------------------------------------------------------------------------------------


def test_console_script_is_declared_and_points_at_the_cli():
    scripts = (ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
    entry = re.search(r'^sftmix-trl = "(.+)"$', scripts, re.MULTILINE).group(1)
    module, _, function = entry.partition(":")
    assert (module, function) == ("sftmix_trl.cli", "main")
    assert callable(getattr(__import__(module, fromlist=[function]), function))


@pytest.mark.parametrize(
    "argv, code, text", [([], 2, "usage: sftmix-trl"), (["train"], None, "unknown command 'train'")]
)
def test_cli_usage_and_unknown_command(argv, code, text, capsys):
    from sftmix_trl.cli import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    message = capsys.readouterr().out + (stop.value.code if isinstance(stop.value.code, str) else "")
    assert text in message and (code is None or stop.value.code == code)


def test_cli_under_accelerate_runs_the_demo_config(tiny_model, tmp_path):
    out = tmp_path / "out"
    config = ROOT / "accelerate_configs" / "cpu.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "sftmix_trl.cli",
           "sft", "--config", "configs/demo/sft_qlora.yaml", "--model_name_or_path", str(tiny_model),
           "--output_dir", str(out), "--max_train_examples", "8", "--eval_split_size", "0", "--eval_strategy", "no",
           "--max_steps", "1", "--save_strategy", "no"]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert (
        f"accelerate launch --config_file {config} -m sftmix_trl.cli sft --config configs/demo/sft_qlora.yaml" in card
    )
    assert "gemm_4bit_forward" not in result.stdout + result.stderr  # item 7, in a real 4-bit run


def test_evaluation_max_length_that_leaves_no_scored_token_is_refused_before_loading():
    from sftmix_trl.evaluation import EvalArguments, EvalError

    with pytest.raises(EvalError, match=r"`max_length` must be >= 2"):
        EvalArguments(tasks=["perplexity"], perplexity_data="data/demo/health_qa.json", max_length=1)


def test_parquet_with_a_text_field_that_is_not_utf8_names_the_record(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def text(values):  # Arrow strings that skip UTF-8 validation, as some writers produce them
        return pa.array(values, type=pa.binary()).view(pa.string())

    rows = [b"fine question", b"Caf\xe9 or tea?", b"another"]
    path = tmp_path / "latin1.parquet"
    pq.write_table(pa.table({"instruction": text(rows), "output": text([b"a", b"b", b"c"])}), path)
    with pytest.raises(DataError) as error:
        load_source(DataSource(str(path)))
    assert (
        str(error.value)
        == f"{path}, record 1: a text field is not valid UTF-8 (byte(s) e9: invalid continuation byte)"
    )
