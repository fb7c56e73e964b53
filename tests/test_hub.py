"""Model card, token redaction and Hub publishing, all offline: the Hub API is replaced by a recording fake."""

from types import SimpleNamespace

import huggingface_hub.utils
import pytest
import yaml

from sftmix_trl.after_training.card import sftmix_card_sections
from sftmix_trl.after_training.hub import PublishError, push_folder, redact, write_model_card
from sftmix_trl.confidence import PLOT_FILE

TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYzAbCd"  # 30 letters, the shape of a real token
BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    head, _, _ = text[4:].partition("\n---\n")
    return yaml.safe_load(head)


def card(tmp_path, **overrides):
    kwargs = dict(
        base_model=BASE,
        datasets=["HuggingFaceH4/no_robots", "org/other"],
        method="SFTMix",
        settings={"learning_rate": 2e-4, "mixup_alpha": 0.5, "seed": 42},
        launch_line="accelerate launch recipes/sftmix.py --config configs/demo/sftmix_qlora.yaml --seed 42",
        sections=["## Extra section\n\nsome text"],
        hub_model_id="someone/smollm2-sftmix",
    )
    kwargs.update(overrides)
    path = write_model_card(str(tmp_path), **kwargs)
    assert path == tmp_path / "README.md"
    return path.read_text()


def test_model_card_contents(tmp_path):
    text = card(tmp_path)
    meta = front_matter(text)
    assert meta["library_name"] == "peft"
    assert meta["base_model"] == BASE
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["datasets"] == ["HuggingFaceH4/no_robots", "org/other"]
    assert "sftmix" in meta["tags"] and {"trl", "peft", "lora"} <= set(meta["tags"])

    assert "# someone/smollm2-sftmix" in text
    assert f"[{BASE}](https://huggingface.co/{BASE})" in text
    assert "**SFTMix**" in text and "Mixup" in text
    assert "| setting | value |" in text
    assert "| `learning_rate` | `0.0002` |" in text
    assert "| `mixup_alpha` | `0.5` |" in text
    assert "| `seed` | `42` |" in text
    assert "## Extra section\n\nsome text" in text
    assert "accelerate launch recipes/sftmix.py --config configs/demo/sftmix_qlora.yaml --seed 42" in text
    assert "from peft import AutoPeftModelForCausalLM" in text
    assert 'AutoPeftModelForCausalLM.from_pretrained("someone/smollm2-sftmix")' in text
    assert 'AutoTokenizer.from_pretrained("someone/smollm2-sftmix")' in text


def test_model_card_usage_snippet_is_valid_python(tmp_path):
    text = card(tmp_path)
    snippet = text.split("```python\n", 1)[1].split("```", 1)[0]
    compile(snippet, "snippet", "exec")


def test_model_card_for_plain_sft(tmp_path):
    text = card(tmp_path, method="SFT", hub_model_id=None, datasets=[])
    meta = front_matter(text)
    assert "sftmix" not in meta["tags"]
    assert "datasets" not in meta
    assert "Mixup" not in text
    assert f"# {tmp_path.name}" in text  # the repository defaults to the folder name
    assert f'from_pretrained("{tmp_path.name}")' in text


def test_model_card_with_a_local_base_model(tmp_path):
    """A local folder is no Hub id: the Hub would refuse a card that names it as `base_model`."""
    local = tmp_path / "models" / "SmolLM2-135M-Instruct"
    local.mkdir(parents=True)
    out = tmp_path / "out"
    out.mkdir()
    for base in (str(local), "~/.cache/sftmix-trl/SmolLM2-135M-Instruct", "./models/x"):
        text = card(out, base_model=base)
        assert "base_model" not in front_matter(text)
        assert f"https://huggingface.co/{base}" not in text
        assert f"`{base}`" in text
    assert front_matter(card(out, base_model="gpt2"))["base_model"] == "gpt2"


def test_model_card_redacts_tokens(tmp_path):
    text = card(
        tmp_path,
        launch_line=f"HF_TOKEN={TOKEN} accelerate launch recipes/sftmix.py --hub_token {TOKEN}",
        settings={"hub_token": TOKEN, "learning_rate": 1e-4},
        sections=[f"a section quoting {TOKEN}"],
    )
    assert TOKEN not in text
    assert TOKEN[3:] not in text
    assert "--hub_token hf_***" in text
    assert "| `hub_token` | `hf_***` |" in text
    assert "| `learning_rate` | `0.0001` |" in text


def test_redact():
    assert redact(f"token={TOKEN} end") == "token=hf_*** end"
    assert redact(f"{TOKEN},{TOKEN}x") == "hf_***,hf_***"
    assert redact("hf_short and hf_ and plain text") == "hf_short and hf_ and plain text"
    assert redact("") == ""
    assert TOKEN not in redact(f'{{"hub_token": "{TOKEN}"}}')


class FakeApi:
    def __init__(self, fail_with: Exception | None = None):
        self.calls = []
        self.fail_with = fail_with

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return SimpleNamespace(url=f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        if self.fail_with is not None:
            raise self.fail_with


@pytest.fixture
def no_token(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.utils, "get_token", lambda: None)


@pytest.mark.parametrize("repo_id", [None, ""])
def test_push_without_repo_id(tmp_path, repo_id):
    api = FakeApi()
    with pytest.raises(PublishError, match="hub_model_id"):
        push_folder(str(tmp_path), repo_id, token=TOKEN, api=api)
    assert api.calls == []


def test_push_without_token(tmp_path, no_token):
    with pytest.raises(PublishError) as error:
        push_folder(str(tmp_path), "someone/adapter")
    message = str(error.value)
    assert "token" in message
    assert f"saved in {tmp_path}" in message


UPLOADED = [
    "adapter_model.safetensors",
    "adapter_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "merges.txt",
    "README.md",
    "confidence/confidence.png",
    "loss.png",
]
SKIPPED = [
    "checkpoint-10/adapter_model.safetensors",
    "checkpoint-10/trainer_state.json",
    "checkpoint-10/README.md",
    "checkpoint-200/optimizer.pt",
    "confidence/snapshots/step-5/adapter_model.safetensors",
    "confidence/snapshots/step-5/adapter_config.json",
    "confidence/snapshots/step-10.tmp/adapter_model.safetensors",
    "confidence/snapshots/steps.json",
    "confidence/confidence.parquet",
    "confidence/scores/step-5.parquet",
    "training_args.bin",
    "runs/Jan01/events.out.tfevents.1.host",
    "adapter_model.safetensors.tmp",
]


def filtered(paths, allow_patterns, ignore_patterns):
    """The files `upload_folder` would send, filtered the way huggingface_hub does."""
    filter_repo_objects = getattr(huggingface_hub.utils, "filter_repo_objects", None)
    if filter_repo_objects is not None:
        return list(filter_repo_objects(paths, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
    from fnmatch import fnmatchcase

    ignore = [p + "*" if p.endswith("/") else p for p in ignore_patterns]
    return [
        p
        for p in paths
        if any(fnmatchcase(p, a) for a in allow_patterns) and not any(fnmatchcase(p, i) for i in ignore)
    ]


def test_push_call_boundary(tmp_path, no_token):
    api = FakeApi()
    url = push_folder(str(tmp_path), "someone/adapter", private=True, api=api, extra_patterns=["*.gguf"])
    assert url == "https://huggingface.co/someone/adapter"
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]

    _, repo_id, create = api.calls[0]
    assert repo_id == "someone/adapter"
    assert create["private"] is True
    assert create.get("exist_ok") is True
    assert create.get("repo_type", "model") == "model"

    upload = api.calls[1][1]
    assert upload["repo_id"] == "someone/adapter"
    assert upload["folder_path"] == str(tmp_path)
    assert upload.get("repo_type", "model") == "model"
    allow, ignore = upload["allow_patterns"], upload["ignore_patterns"]
    assert filtered(UPLOADED + SKIPPED, allow, ignore) == UPLOADED
    assert filtered(["model.gguf"], allow, ignore) == ["model.gguf"]  # extra_patterns are uploaded too


def test_push_returns_plain_url_string(tmp_path):
    class StringApi(FakeApi):
        def create_repo(self, repo_id, **kwargs):
            super().create_repo(repo_id, **kwargs)
            return f"https://huggingface.co/{repo_id}"

    api = StringApi()
    assert (
        push_folder(str(tmp_path), "someone/adapter", token=TOKEN, api=api) == "https://huggingface.co/someone/adapter"
    )
    assert api.calls[0][2]["private"] is None  # the Hub's default visibility unless asked


def test_push_uses_the_given_token_with_the_real_client(tmp_path, no_token, monkeypatch):
    """Without a fake api, `HfApi` is built with the explicit token (checked by replacing the class)."""
    created = []

    class RecordingHfApi(FakeApi):
        def __init__(self, token=None, **kwargs):
            super().__init__()
            created.append(token)

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    push_folder(str(tmp_path), "someone/adapter", token=TOKEN)
    assert created == [TOKEN]


def test_push_network_failure(tmp_path):
    api = FakeApi(fail_with=ConnectionError(f"could not reach huggingface.co with Authorization: Bearer {TOKEN}"))
    with pytest.raises(PublishError) as error:
        push_folder(str(tmp_path), "someone/adapter", token=TOKEN, api=api)
    message = str(error.value)
    assert str(tmp_path) in message
    assert "someone/adapter" in message and "ConnectionError" in message
    assert TOKEN not in message
    assert error.value.__cause__ is None and error.value.__suppress_context__  # no traceback quoting the token


def test_push_failure_in_create_repo(tmp_path):
    class Offline(FakeApi):
        def create_repo(self, repo_id, **kwargs):
            raise OSError("network is unreachable")

    api = Offline()
    with pytest.raises(PublishError, match="network is unreachable") as error:
        push_folder(str(tmp_path), "someone/adapter", token=TOKEN, api=api)
    assert "can be pushed later" in str(error.value)
    assert api.calls == []


def test_card_then_push_uploads_the_card(tmp_path):
    write_model_card(
        str(tmp_path), base_model=BASE, datasets=[], method="SFTMix", settings={}, launch_line="accelerate launch x"
    )
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    api = FakeApi()
    push_folder(str(tmp_path), "someone/adapter", token=TOKEN, api=api)
    upload = api.calls[1][1]
    local = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert filtered(local, upload["allow_patterns"], upload["ignore_patterns"]) == local


# -- SFTMix card sections ------------------------------------------------------------------------------------------


def table(**overrides):
    metadata = dict(
        num_scored=120,
        num_confident=60,
        num_unconfident=58,
        num_excluded=2,
        snapshot_steps=[5, 10],
        run={"reference_model": "HuggingFaceTB/SmolLM2-135M-Instruct"},
    )
    metadata.update(overrides)
    return SimpleNamespace(metadata=metadata)


LOG_HISTORY = [
    {"loss": 2.5, "ntp_loss": 2.0, "mixup_loss": 0.9, "mixup_lambda": 0.4, "step": 1},
    {"eval_loss": 2.4, "step": 1},
    {"loss": 1.23456, "ntp_loss": 1.1, "mixup_loss": 0.5, "ntp_loss_confident": 0.8, "step": 2},
    {"train_runtime": 12.5, "train_loss": 1.8, "step": 2},
]


def settings_for(tmp_path, confidence_dir=None):
    out = tmp_path / "out"
    return SimpleNamespace(output_dir=str(out), confidence_dir=str(confidence_dir or out / "confidence"))


def test_sftmix_card_sections(tmp_path):
    split, figures = sftmix_card_sections(table(), LOG_HISTORY, settings_for(tmp_path))
    assert split.startswith("## Confidence split")
    assert "| examples scored | 120 |" in split
    assert "| confident / unconfident | 60 / 58 |" in split
    assert "| excluded (no response token after truncation) | 2 |" in split
    assert "| confidence snapshots (reference steps) | [5, 10] |" in split
    assert "| reference model | HuggingFaceTB/SmolLM2-135M-Instruct |" in split
    assert "![" not in split  # no plot on disk

    assert figures.startswith("## Training figures")
    assert "| loss | 1.235 |" in figures  # the last logged value, not the first
    assert "| ntp_loss | 1.1 |" in figures
    assert "| mixup_loss | 0.5 |" in figures
    assert "| ntp_loss_confident | 0.8 |" in figures
    assert "| mixup_lambda | 0.4 |" in figures  # last logged, even if not in the final entry
    assert "| eval_loss | 2.4 |" in figures
    assert "| train_runtime | 12.5 |" in figures
    assert "ntp_loss_unconfident" not in figures and "mixup_token_share" not in figures  # never logged
    assert "| 2.5 |" not in figures


def test_sftmix_card_sections_picture(tmp_path):
    args = settings_for(tmp_path)
    confidence = tmp_path / "out" / "confidence"
    confidence.mkdir(parents=True)
    (confidence / PLOT_FILE).write_bytes(b"png")
    split, _ = sftmix_card_sections(table(), [], args)
    assert f"![Confidence split](confidence/{PLOT_FILE})" in split

    elsewhere = tmp_path / "shared-confidence"  # outside output_dir: not uploaded, so no broken link
    elsewhere.mkdir()
    (elsewhere / PLOT_FILE).write_bytes(b"png")
    split, _ = sftmix_card_sections(table(), [], settings_for(tmp_path, confidence_dir=elsewhere))
    assert "![" not in split


def test_sftmix_card_sections_in_a_written_card(tmp_path):
    args = settings_for(tmp_path)
    (tmp_path / "out").mkdir()
    sections = sftmix_card_sections(table(num_scored=7, num_confident=4, num_unconfident=3), LOG_HISTORY, args)
    text = card(tmp_path / "out", sections=sections)
    assert "| confident / unconfident | 4 / 3 |" in text
    assert "| loss | 1.235 |" in text


def test_sftmix_card_sections_with_sparse_metadata(tmp_path):
    split, figures = sftmix_card_sections(SimpleNamespace(metadata={}), [], settings_for(tmp_path))
    assert "| examples scored | None |" in split
    assert "| confident / unconfident | None / None |" in split
    assert figures.rstrip().endswith("| --- | --- |")
