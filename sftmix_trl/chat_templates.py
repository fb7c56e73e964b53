"""Chat templates with `{% generation %}` markers, which training every assistant turn of a conversation needs.

TRL's `assistant_only_loss` trains the tokens a template renders inside `{% generation %}...{% endgeneration %}`.
Most templates have no markers. `training_chat_template` returns, in this order:

1. the template itself when it has markers (`configs/templates/alpaca.jinja` does);
2. TRL's marked copy of a template it knows (Llama 3, Qwen, Gemma, Phi, ...);
3. a copy derived here for the common shape in which one expression renders every message as
   `<header> + message['content'] + <end of turn>` (ChatML templates such as SmolLM2's): the assistant's branch
   gets the markers around `message['content'] + <end of turn>`. The derived copy is accepted only if it renders
   every probe conversation exactly like the original and its marked spans are the assistant replies, each starting
   where the generation prompt ends. A one-turn conversation then trains exactly the tokens it trains as a
   prompt/completion pair.

Otherwise `ChatTemplateError` says what to do.
"""

from __future__ import annotations

import re

from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template
from trl.chat_template_utils import get_training_chat_template, has_generation_markers

from .errors import SFTMixError

# `message['content']`, `message["content"]` or `message.content`
_CONTENT = re.compile(r"""message\s*(?:\[\s*(['"])content\1\s*\]|\.content\b)""")
_EXPRESSION = re.compile(r"\{\{(-?)(.*?)(-?)\}\}", re.DOTALL)
_PROBE_SYSTEM = {"role": "system", "content": "System rule S."}
_PROBE_TURNS = [
    {"role": "user", "content": "First question Q1?"},
    {"role": "assistant", "content": "First answer A1."},
    {"role": "user", "content": "Second question Q2?"},
    {"role": "assistant", "content": "Second answer A2."},
]


class ChatTemplateError(SFTMixError):
    """The chat template cannot mark the assistant turns; the message says what to do."""


def derive_generation_markers(chat_template: str) -> str | None:
    """A copy of `chat_template` with markers around the assistant's reply, or None if its shape is not the one
    handled (one `{{ ... }}` expression that concatenates a header, `message['content']` and an end of turn)."""
    matches = [m for m in _EXPRESSION.finditer(chat_template) if _CONTENT.search(m.group(2))]
    if len(matches) != 1:
        return None
    match = matches[0]
    left_trim, expression, right_trim = match.groups()
    contents = list(_CONTENT.finditer(expression))
    if len(contents) != 1:
        return None
    header = expression[: contents[0].start()].rstrip()
    if header and not header.endswith("+"):
        return None  # content inside a call or a filter chain: not a plain concatenation
    header = header[:-1].strip() if header else ""
    reply = expression[contents[0].start() :].strip()
    role = "message['role'] == 'assistant'" if "message['role']" in expression else "message.role == 'assistant'"
    marked = (
        f"{{%{left_trim} if {role} %}}"
        + (f"{{{{ {header} }}}}" if header else "")
        + f"{{% generation %}}{{{{ {reply} }}}}{{% endgeneration %}}"
        + f"{{% else %}}{{{{ {expression.strip()} }}}}{{% endif {right_trim}%}}"
    )
    return chat_template[: match.start()] + marked + chat_template[match.end() :]


def _render(chat_template: str, messages: list[dict], special_tokens: dict, **kwargs) -> tuple[str, list]:
    rendered, indices = render_jinja_template(
        conversations=[messages], chat_template=chat_template, **special_tokens, **kwargs
    )
    return rendered[0], (indices[0] if indices else [])


def check_generation_markers(original: str, marked: str, special_tokens: dict) -> str | None:
    """Why `marked` is not a faithful marked copy of `original` (None when it is), on 1- and 2-turn probes with and
    without a system message: same text, one marked span per assistant reply, each starting where the generation
    prompt before it ends and holding the whole reply."""
    for messages in (_PROBE_TURNS[:2], _PROBE_TURNS, [_PROBE_SYSTEM, *_PROBE_TURNS]):
        try:
            text, spans = _render(marked, messages, special_tokens, return_assistant_tokens_mask=True)
            if text != _render(original, messages, special_tokens)[0]:
                return "it renders differently from the original"
            replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            if len(spans) != len(replies):
                return f"it marks {len(spans)} spans for {len(replies)} assistant replies"
            for (start, end), i in zip(spans, replies):
                prompt = _render(original, messages[:i], special_tokens, add_generation_prompt=True)[0]
                if (
                    start != len(prompt)
                    or not text.startswith(prompt)
                    or messages[i]["content"] not in text[start:end]
                ):
                    return "a marked span is not the reply that follows the generation prompt"
        except Exception as error:  # a template that raises on the probe (e.g. it refuses a system message)
            return f"rendering a probe conversation failed ({type(error).__name__}: {error})"
    return None


def training_chat_template(tokenizer: PreTrainedTokenizerBase) -> str:
    """The tokenizer's chat template with `{% generation %}` markers around every assistant reply (see the module
    docstring for where it comes from). Raises `ChatTemplateError` when none can be found."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default", "")
    if has_generation_markers(template):
        return template
    try:
        known = get_training_chat_template(tokenizer)
    except ValueError:  # TRL does not know this template
        known = None
    if known is not None:
        return known
    derived = derive_generation_markers(template)
    problem = "its shape is not one this package can mark"
    if derived is not None:
        problem = check_generation_markers(template, derived, dict(tokenizer.special_tokens_map))
        if problem is None:
            return derived
    raise ChatTemplateError(
        f"the chat template of {tokenizer.name_or_path} has no {{% generation %}} markers, which training every "
        f"assistant turn of multi-turn conversations needs, and none could be derived ({problem}). Put "
        "`{% generation %}...{% endgeneration %}` around the assistant's reply and end of turn in a copy of the "
        "template and set `chat_template_path` to it, or set `assistant_turns: last` to train only the last turn"
    )
