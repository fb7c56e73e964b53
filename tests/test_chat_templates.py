"""Chat templates, per family: the marked copy that trains every assistant turn is derived (or TRL's, or the user's
own) and accepted only if every marked span ends where its turn ends, end-of-turn token included. Each family is
built offline from its template's text: ChatML (conftest), Llama 3.1 / 3.2 Instruct (the copies TRL ships to
recognise them), Mistral Instruct v0.3 (below, from its tokenizer_config.json)."""

from pathlib import Path

import pytest
import trl
from conftest import CHATML, write_jsonl
from transformers.utils.chat_template_utils import render_jinja_template

from sftmix_trl.after_training.save import save_tokenizer
from sftmix_trl.chat_templates import (
    FAMILIES,
    ChatTemplateError,
    check_generation_markers,
    derive_generation_markers,
    strip_generation_markers,
    training_chat_template,
    user_chat_template,
)
from sftmix_trl.confidence import ConfidenceConfig, expected_metadata
from sftmix_trl.configs import ModelArguments, ScriptArguments
from sftmix_trl.data.load import load_datasets
from sftmix_trl.model import load_tokenizer
from sftmix_trl.sftmix.config import SFTMixConfig

TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
MISTRAL_V03 = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}"""
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Name a fruit."},
    {"role": "assistant", "content": "A banana."},
]
# family -> (template text, what each reply's trained text must be)
TEMPLATES = {
    "ChatML (SmolLM2, Qwen2)": (CHATML, "{}<|im_end|>\n"),
    "Llama 3.1 Instruct": ((TRL_TEMPLATES / "llama3_1.jinja").read_text(), "{}<|eot_id|>"),
    "Llama 3.2 Instruct": ((TRL_TEMPLATES / "llama3_2.jinja").read_text(), "{}<|eot_id|>"),
    "Mistral Instruct v0.3": (MISTRAL_V03, " {}</s>"),
}
# A Gemma-3-shaped template whose markers leave the end of turn out: the model would never learn to stop
GEMMA_EOT_OUTSIDE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<start_of_turn>model\n' }}{% generation %}{{ message['content'] | trim }}{% endgeneration %}"
    "{{ '<end_of_turn>\n' }}{% else %}{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] | trim "
    "+ '<end_of_turn>\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}"
    "{% endif %}"
)


def trained(template: str, messages: list[dict]) -> list[str]:
    rendered, spans = render_jinja_template(
        conversations=[messages], chat_template=template, return_assistant_tokens_mask=True, **SPECIAL
    )
    return [rendered[0][start:end] for start, end in spans[0]]


def test_every_family_listed_is_tested():
    assert set(TEMPLATES) == set(FAMILIES)


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_a_marked_copy_is_derived_that_trains_every_reply_and_its_end_of_turn(family):
    template, reply = TEMPLATES[family]
    marked = derive_generation_markers(template, SPECIAL)
    assert marked is not None, family
    for messages in (CONVERSATION, CONVERSATION[1:]):
        original = render_jinja_template(conversations=[messages], chat_template=template, **SPECIAL)[0][0]
        assert render_jinja_template(conversations=[messages], chat_template=marked, **SPECIAL)[0][0] == original
        assert trained(marked, messages) == [reply.format("Blue."), reply.format("A banana.")]


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_the_tokenizer_gets_the_derived_copy_and_keeps_its_own(tiny_model, family):
    template = TEMPLATES[family][0]
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(tiny_model)))
    tokenizer.chat_template = template
    marked = training_chat_template(tokenizer)
    assert check_generation_markers(template, marked, dict(tokenizer.special_tokens_map)) is None
    tokenizer.chat_template = marked
    assert user_chat_template(tokenizer) == template


def test_markers_that_leave_the_end_of_turn_out_are_refused_with_one_line(tiny_model):
    problem = check_generation_markers(strip_generation_markers(GEMMA_EOT_OUTSIDE), GEMMA_EOT_OUTSIDE, SPECIAL, False)
    assert problem.startswith("a marked span ends before its turn does: '<end_of_turn>\\n' (the end of turn)")
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(tiny_model)))
    tokenizer.chat_template = GEMMA_EOT_OUTSIDE
    with pytest.raises(
        ChatTemplateError, match=r"with its own \{% generation %\} markers: a marked span ends before"
    ) as error:
        training_chat_template(tokenizer)
    assert "\n" not in str(error.value)
    # Unmarked, no derived copy of that shape passes (the reply's expression lacks the end of turn) ...
    assert derive_generation_markers(strip_generation_markers(GEMMA_EOT_OUTSIDE), SPECIAL) is None
    # ... while Gemma's own shape, one expression per message, is derived with the end of turn inside the span
    gemma = (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
        "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + "
        "message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
    )
    marked = derive_generation_markers(gemma, SPECIAL)
    assert trained(marked, CONVERSATION[1:]) == ["Blue.<end_of_turn>\n", "A banana.<end_of_turn>\n"]


def test_trl_marked_copies_of_text_templates_pass_the_check():
    for name in ("llama3", "qwen2_5", "qwen3", "gemma", "gemma3", "phi3", "phi3_5", "deepseekv3", "gptoss"):
        marked = (TRL_TEMPLATES / f"{name}_training.jinja").read_text()
        assert check_generation_markers(strip_generation_markers(marked), marked, SPECIAL, exact=False) is None, name


# -- the saved tokenizer and the table carry the template the user gave ------------------------------------------------


def test_saved_tokenizer_carries_the_users_template_not_the_marked_copy(tiny_model, tmp_path):
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(tiny_model)), assistant_only_loss=True)
    assert "{% generation %}" in tokenizer.chat_template and user_chat_template(tokenizer) == CHATML
    save_tokenizer(tokenizer, str(tmp_path))
    assert "{% generation %}" in tokenizer.chat_template  # training goes on with the marked copy
    reloaded = load_tokenizer(ModelArguments(model_name_or_path=str(tmp_path)))
    assert reloaded.chat_template == CHATML


def test_table_records_the_template_content_not_its_path(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(4)])
    dataset = load_datasets(ScriptArguments(dataset_name=str(data)))[0]
    path = tmp_path / "template.jinja"
    model_args = ModelArguments(model_name_or_path=str(tiny_model))
    args = SFTMixConfig(output_dir=str(tmp_path / "out"), report_to="none", chat_template_path=str(path))
    hashes = []
    for template in (CHATML, CHATML.replace("<|im_end|>\n", "<|im_end|>\n\n")):  # the same path, edited in place
        path.write_text(template)
        tokenizer = load_tokenizer(model_args, False, str(path))
        hashes.append(expected_metadata(dataset, model_args, args, ConfidenceConfig.from_args(args), tokenizer))
    assert hashes[0]["chat_template_sha256"] != hashes[1]["chat_template_sha256"]
