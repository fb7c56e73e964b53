"""`generate` and `evaluate` ask the model in the chat template its run trained with: the tokenizer saved beside the
adapter (issue #26), on a base without a template and on a base with a template of its own; `chat_template_path`
overrides it."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import ROOT
from test_evaluation import NLTK_DATA, make_adapter

from sftmix_trl.after_training.generate import GenerateArguments, generate
from sftmix_trl.after_training.save import save_tokenizer
from sftmix_trl.configs import ModelArguments
from sftmix_trl.evaluation import EvalArguments, evaluate
from sftmix_trl.model import ModelLoadError, load_tokenizer, saved_tokenizer_folder

ALPACA = ROOT / "configs" / "templates" / "alpaca.jinja"
PROMPT = "Name a colour."
# A template neither the base nor the run has: what `chat_template_path` overrides with
PLAIN = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}{{ 'assistant: ' }}"


def strip_chat_template(folder: Path) -> Path:
    """A base model folder whose tokenizer has no chat template (like Llama-3.1-8B's or Mistral-7B-v0.1's)."""
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def bases(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """The tiny base with its own (ChatML) template, and a copy without any template."""
    bare = tmp_path_factory.mktemp("bare") / "base"
    shutil.copytree(tiny_model, bare)
    return {"own template": Path(tiny_model), "no template": strip_chat_template(bare)}


@pytest.fixture(scope="module")
def runs(bases, tmp_path_factory) -> dict[str, Path]:
    """For each base, a run's output folder as the recipes save it: a LoRA adapter and the tokenizer it trained with,
    Alpaca's template given by `chat_template_path` (as every shipped Llama-3.1-8B / Mistral-7B config does)."""
    folders = {}
    for case, base in bases.items():
        folder = make_adapter(base, tmp_path_factory.mktemp("run"))
        tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(base)), chat_template_path=str(ALPACA))
        save_tokenizer(tokenizer, str(folder))
        folders[case] = folder
    return folders


def saved_tokenizer(run: Path):
    """The tokenizer the run saved, read back as it is: what the prompts must be rendered and decoded with."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(run)


def alpaca_render(tokenizer, prompt: str) -> str:
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, chat_template=ALPACA.read_text()
    )


def record_model_inputs(monkeypatch, module) -> list:
    """Patch `module.load_with_adapter` so that every token sequence the model embeds is recorded."""
    seen = []
    original = module.load_with_adapter

    def load_and_watch(*args, **kwargs):
        model = original(*args, **kwargs)
        model.get_input_embeddings().register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0].clone()))
        return model

    monkeypatch.setattr(module, "load_with_adapter", load_and_watch)
    return seen


def test_the_runs_tokenizer_comes_from_the_adapter_folder_unless_overridden(bases, runs, tmp_path):
    base = ModelArguments(model_name_or_path=str(bases["own template"]))
    own = load_tokenizer(base).chat_template
    assert saved_tokenizer_folder(str(runs["own template"])) == runs["own template"]
    assert load_tokenizer(base, adapter_path=str(runs["own template"])).chat_template == ALPACA.read_text()
    # an adapter folder without a tokenizer: the base's
    adapter_only = make_adapter(bases["own template"], tmp_path / "adapter-only")
    assert saved_tokenizer_folder(str(adapter_only)) is None
    assert load_tokenizer(base, adapter_path=str(adapter_only)).chat_template == own
    # `chat_template_path` wins over both
    (tmp_path / "plain.jinja").write_text(PLAIN)
    overridden = load_tokenizer(base, False, str(tmp_path / "plain.jinja"), adapter_path=str(runs["own template"]))
    assert overridden.chat_template == PLAIN
    # a base without a template and nothing to replace it: one line that says what to set
    with pytest.raises(ModelLoadError, match="has no chat template; .* set `chat_template_path`"):
        load_tokenizer(ModelArguments(model_name_or_path=str(bases["no template"])), adapter_path=str(adapter_only))


@pytest.mark.parametrize("case", ["no template", "own template"])
def test_generate_asks_in_the_template_the_run_trained_with(case, bases, runs, monkeypatch):
    from sftmix_trl.after_training import generate as generate_module

    seen = record_model_inputs(monkeypatch, generate_module)
    model_args = ModelArguments(model_name_or_path=str(bases[case]), load_in_4bit=False)
    args = GenerateArguments(adapter_path=str(runs[case]), prompt=[PROMPT], max_new_tokens=2)
    (record,) = generate(args, model_args)
    tokenizer = saved_tokenizer(runs[case])
    assert tokenizer.decode(seen[0][0]) == alpaca_render(tokenizer, PROMPT)
    assert record["prompt"] == PROMPT


def test_generate_takes_a_chat_template_path(bases, runs, tmp_path, monkeypatch):
    from sftmix_trl.after_training import generate as generate_module

    (tmp_path / "plain.jinja").write_text(PLAIN)
    seen = record_model_inputs(monkeypatch, generate_module)
    model_args = ModelArguments(model_name_or_path=str(bases["no template"]), load_in_4bit=False)
    args = GenerateArguments(
        adapter_path=str(runs["no template"]),
        chat_template_path=str(tmp_path / "plain.jinja"),
        prompt=[PROMPT],
        max_new_tokens=2,
    )
    generate(args, model_args)
    tokenizer = saved_tokenizer(runs["no template"])
    assert tokenizer.decode(seen[0][0]) == f"user: {PROMPT}\nassistant: "


@pytest.mark.parametrize("case", ["no template", "own template"])
def test_evaluate_asks_ifeval_and_scores_perplexity_in_the_runs_template(case, bases, runs, tmp_path, monkeypatch):
    """The prompt lm-eval hands the model for IFEval is the trained template's rendering; the perplexity rows are
    rendered with it too; eval_results.json records where the tokenizer came from and its template."""
    from sftmix_trl.evaluation import runner

    if NLTK_DATA is None or not NLTK_DATA.is_dir():
        pytest.skip("shared nltk_data is absent")
    monkeypatch.setenv("NLTK_DATA", str(NLTK_DATA))
    prompt = {"key": 1, "prompt": PROMPT, "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    (tmp_path / "input_data.jsonl").write_text(json.dumps(prompt) + "\n")
    qa = [{"instruction": "Say yes.", "input": "", "output": "Yes."}]
    (tmp_path / "qa.json").write_text(json.dumps(qa))
    seen = record_model_inputs(monkeypatch, runner)
    model_args = ModelArguments(model_name_or_path=str(bases[case]), load_in_4bit=False)
    args = EvalArguments(
        tasks=["perplexity", "ifeval"],
        adapter_path=str(runs[case]),
        ifeval_data=str(tmp_path / "input_data.jsonl"),
        perplexity_data=str(tmp_path / "qa.json"),
        max_new_tokens=2,
        output_dir=str(tmp_path / "out"),
    )
    payload = evaluate(args, model_args)
    tokenizer = saved_tokenizer(runs[case])
    scored, asked = tokenizer.decode(seen[0][0]), tokenizer.decode(seen[1][0])
    assert scored.startswith(alpaca_render(tokenizer, "Say yes.") + "Yes.")
    assert asked == alpaca_render(tokenizer, PROMPT)
    assert payload["model"]["tokenizer"] == str(runs[case])
    assert payload["model"]["chat_template"] == ALPACA.read_text()


def test_evaluate_with_only_an_adapter_uses_the_base_it_records(bases, runs, tmp_path):
    """`sftmix-trl evaluate --adapter_path A`, as `generate` and `merge` take it: the base is the adapter's own."""
    qa = [{"instruction": "Say yes.", "input": "", "output": "Yes."}]
    (tmp_path / "qa.json").write_text(json.dumps(qa))
    model_args = ModelArguments(load_in_4bit=False)
    args = EvalArguments(
        tasks=["perplexity"],
        adapter_path=str(runs["own template"]),
        perplexity_data=str(tmp_path / "qa.json"),
        output_dir=str(tmp_path / "out"),
    )
    payload = evaluate(args, model_args)
    assert payload["model"]["model_name_or_path"] == str(bases["own template"])
    assert payload["results"]["perplexity"]["n"] == 1
