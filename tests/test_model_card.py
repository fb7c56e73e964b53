"""The model card: links, citation, settings and the line that reproduces the run."""

import re
import subprocess
import sys

from conftest import ROOT

from sftmix_trl.after_training import hub
from sftmix_trl.configs import ModelArguments
from sftmix_trl.sftmix.config import SFTMixConfig


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
    script.write_text("from sftmix_trl.after_training.hub import launch_line\nprint('LINE', launch_line('sft.py'))\n")
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
