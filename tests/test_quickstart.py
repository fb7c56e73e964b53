"""The README's Python quickstart runs as written (on the tiny model instead of SmolLM2, into a temporary folder)."""

import re

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_readme_quickstart_runs(tiny_model, tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart in Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    assert code.count("\n") <= 15  # the README promises a short example
    code = code.replace('"~/.cache/sftmix-trl/SmolLM2-135M-Instruct"', repr(str(tiny_model)))
    code = code.replace('"outputs/quickstart"', repr(str(tmp_path / "quickstart")))
    monkeypatch.chdir(ROOT)  # the demo data path is relative to the repository
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step > 0
    assert (tmp_path / "quickstart" / "confidence" / "confidence.parquet").is_file()
