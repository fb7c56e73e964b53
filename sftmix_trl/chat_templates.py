"""Chat templates with `{% generation %}` markers, which training every assistant turn of a conversation needs.

TRL's `assistant_only_loss` trains the tokens a template renders inside `{% generation %}...{% endgeneration %}`.
Most templates have no markers. `training_chat_template` returns, in this order:

1. the template itself when it has markers (`configs/templates/alpaca.jinja` does, or the user's own);
2. TRL's marked copy of a template it knows (Llama 3, Qwen, Gemma, Phi, ...);
3. a copy derived here: one `{{ ... }}` expression that renders a message as `<header> + message['content'] ... +
   <end of turn>` gets an assistant branch with the markers around the reply and its end of turn (the header outside
   the markers, or inside when the generation prompt does not hold it). Each expression that renders a message's
   content is tried in turn; the first copy that passes the check below wins. `FAMILIES` lists the template families
   this is tested on (tests/test_chat_templates.py builds each from the template's text, offline).

Whatever its origin, a marked template is accepted only if, on 1- and 2-turn probe conversations with and without a
system message, it renders the same text as the template it marks, and each marked span is exactly what the template
renders for that reply after the generation prompt: the reply and its end-of-turn token (trailing whitespace may stay
outside). A span that ends before its end of turn would never teach the model to stop. A one-turn conversation then
trains exactly the tokens it trains as a prompt/completion pair.

Otherwise `ChatTemplateError` says what to do. The tokenizer's own template is remembered (`user_chat_template`):
the saved adapter carries that one, not the marked training copy.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterator

from jinja2.exceptions import TemplateError
from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template
from trl.chat_template_utils import get_training_chat_template, has_generation_markers

from sftmix_trl.errors import SFTMixError

# `message['content']`, `message["content"]` or `message.content`
_CONTENT = re.compile(r"""message\s*(?:\[\s*(['"])content\1\s*\]|\.content\b)""")
_EXPRESSION = re.compile(r"\{\{(-?)(.*?)(-?)\}\}", re.DOTALL)
_MARKERS = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")
_PROBE_SYSTEM = {"role": "system", "content": "System rule S."}
_PROBE_TURNS = [
    {"role": "user", "content": "First question Q1?"},
    {"role": "assistant", "content": "First answer A1."},
    {"role": "user", "content": "Second question Q2?"},
    {"role": "assistant", "content": "Second answer A2."},
]
# Template families whose marked copy is derived here, each tested on its template's text
FAMILIES = ("ChatML (SmolLM2, Qwen2)", "Llama 3.1 Instruct", "Llama 3.2 Instruct", "Mistral Instruct v0.3")
_USER_TEMPLATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class ChatTemplateError(SFTMixError):
    """The chat template cannot mark the assistant turns; the message says what to do."""


def strip_generation_markers(chat_template: str) -> str:
    return _MARKERS.sub("", chat_template)


def _mark(chat_template: str, match: re.Match, header_inside: bool) -> str | None:
    """`chat_template` with the expression `match` split into an assistant branch with markers around the reply (and
    around the header too when `header_inside`), or None if the expression is not `header + content ...`."""
    left_trim, expression, right_trim = match.groups()
    contents = list(_CONTENT.finditer(expression))
    if len(contents) != 1:
        return None
    header = expression[: contents[0].start()].rstrip()
    if header and not header.endswith("+"):
        return None  # content inside a call or a filter chain: not a plain concatenation
    header = header[:-1].strip() if header else ""
    reply = expression[contents[0].start() :].strip()
    if header_inside:
        if not header:
            return None  # the same copy as with the header outside
        reply, header = f"{header} + {reply}", ""
    role = "message['role'] == 'assistant'" if "message['role']" in expression else "message.role == 'assistant'"
    marked = (
        f"{{%{left_trim} if {role} %}}"
        + (f"{{{{ {header} }}}}" if header else "")
        + f"{{% generation %}}{{{{ {reply} }}}}{{% endgeneration %}}"
        + f"{{% else %}}{{{{ {expression.strip()} }}}}{{% endif {right_trim}%}}"
    )
    return chat_template[: match.start()] + marked + chat_template[match.end() :]


def derive_candidates(chat_template: str) -> Iterator[str]:
    """Marked copies of `chat_template`: one per expression that renders a message's content and per place of the
    header (outside the markers first). `training_chat_template` keeps the first that passes the check."""
    for match in _EXPRESSION.finditer(chat_template):
        if _CONTENT.search(match.group(2)):
            for header_inside in (False, True):
                marked = _mark(chat_template, match, header_inside)
                if marked is not None:
                    yield marked


def derive_generation_markers(chat_template: str, special_tokens: dict | None = None) -> str | None:
    """The first derived marked copy of `chat_template` that passes `check_generation_markers`, or None."""
    for marked in derive_candidates(chat_template):
        if check_generation_markers(chat_template, marked, special_tokens or {}) is None:
            return marked
    return None


def _render(chat_template: str, messages: list[dict], special_tokens: dict, **kwargs) -> tuple[str, list]:
    rendered, indices = render_jinja_template(
        conversations=[messages], chat_template=chat_template, **special_tokens, **kwargs
    )
    return rendered[0], (indices[0] if indices else [])


def _reply_render(template: str, messages: list[dict], i: int, special_tokens: dict) -> tuple[str, int | None]:
    """What `template` renders for the reply `messages[i]` after the generation prompt (the text a prompt/completion
    pair trains), and where it starts in the rendered conversation. The start is None when the template renders the
    earlier turns differently once more turns follow (Mistral moves the system message into the last user turn): the
    reply's text is then taken from the conversation without its system message."""
    prompt = _render(template, messages[:i], special_tokens, add_generation_prompt=True)[0]
    turn = _render(template, messages[: i + 1], special_tokens)[0]
    full = _render(template, messages, special_tokens)[0]
    if turn.startswith(prompt) and full.startswith(turn):
        return turn[len(prompt) :], len(prompt)
    plain = [m for m in messages if m["role"] != "system"]
    if len(plain) == len(messages):
        return (turn[len(prompt) :] if turn.startswith(prompt) else ""), None
    return _reply_render(template, plain, i - (len(messages) - len(plain)), special_tokens)[0], None


def _span_problem(marked_text: str, reply: str, start: int, expected_start: int | None) -> str | None:
    """Why a marked span is not the reply and its end of turn (None when it is)."""
    if marked_text == reply or (
        reply.startswith(marked_text) and marked_text and not reply[len(marked_text) :].strip()
    ):
        if expected_start is not None and start != expected_start:
            return "a marked span does not start where the generation prompt ends"
        return None
    if reply.startswith(marked_text) and marked_text.strip():
        return (
            f"a marked span ends before its turn does: {reply[len(marked_text) :]!r} (the end of turn) is left out, "
            "so the model would never learn to stop"
        )
    if reply and marked_text.startswith(reply):
        return f"a marked span runs past the end of its turn into {marked_text[len(reply) :]!r}"
    return f"a marked span is not the reply that follows the generation prompt (it marks {marked_text!r}, the turn is {reply!r})"


def _merged(spans: list, text: str) -> list[tuple[int, int]]:
    """Marked spans with the ones that touch (or are apart only by whitespace) joined: some templates mark the reply
    and its end of turn in two blocks."""
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and not text[merged[-1][1] : start].strip():
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def _end_problem(text: str, start: int, end: int, turn_end: int | None, content: str) -> str | None:
    """Why a marked span does not end where its turn ends, end of turn included (None when it does)."""
    if content.strip() not in text[start:end]:
        return f"a marked span does not hold its reply (it marks {text[start:end]!r})"
    if turn_end is not None and text[end:turn_end].strip():
        return (
            f"a marked span ends before its turn does: {text[end:turn_end]!r} (the end of turn) is left out, so the "
            "model would never learn to stop"
        )
    if turn_end is not None and end > turn_end:
        return f"a marked span runs past the end of its turn into {text[turn_end:end]!r}"
    return None


def check_generation_markers(original: str, marked: str, special_tokens: dict, exact: bool = True) -> str | None:
    """Why `marked` is not a faithful marked copy of `original` (None when it is), on 1- and 2-turn probes with and
    without a system message: same text, one marked span per assistant reply, each ending where the reply's turn
    ends, end-of-turn token included. `exact` (a copy derived here): each span is also exactly what the template
    renders for that reply after the generation prompt; without it (TRL's copies, the user's own markers, which may
    also mark a piece of the header such as Qwen's newline or a thinking block) only the end is checked. A probe the
    template refuses (`raise_exception`, e.g. for a system message) is skipped; at least one must render."""
    rendered_any = False
    for messages in (_PROBE_TURNS[:2], _PROBE_TURNS, [_PROBE_SYSTEM, *_PROBE_TURNS]):
        try:
            text, spans = _render(marked, messages, special_tokens, return_assistant_tokens_mask=True)
            original_text = _render(original, messages, special_tokens)[0]
        except TemplateError:  # the template refuses this probe: conversations like it are dropped from the data
            continue
        except Exception as error:
            return f"rendering a probe conversation failed ({type(error).__name__}: {error})"
        rendered_any = True
        if text != original_text:
            return "it renders differently from the original"
        spans = _merged(spans, text)
        replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if len(spans) != len(replies):
            return f"it marks {len(spans)} spans for {len(replies)} assistant replies"
        for (start, end), i in zip(spans, replies):
            if exact:
                reply, expected_start = _reply_render(original, messages, i, special_tokens)
                problem = _span_problem(text[start:end], reply, start, expected_start)
            else:
                turn = _render(original, messages[: i + 1], special_tokens)[0]
                turn_end = len(turn) if text.startswith(turn) else None  # unknown if earlier turns render otherwise
                problem = _end_problem(text, start, end, turn_end, messages[i]["content"])
            if problem:
                return problem
    return None if rendered_any else "it refuses every probe conversation"


def user_chat_template(tokenizer: PreTrainedTokenizerBase) -> str | dict | None:
    """The tokenizer's chat template as the user gave it, before `training_chat_template` swapped in a marked copy."""
    return _USER_TEMPLATES.get(tokenizer, tokenizer.chat_template)


def training_chat_template(tokenizer: PreTrainedTokenizerBase) -> str:
    """The tokenizer's chat template with checked `{% generation %}` markers around every assistant reply (see the
    module docstring for where it comes from). Raises `ChatTemplateError` when none can be found. Remembers the
    tokenizer's own template for `user_chat_template`."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default", "")
    if tokenizer not in _USER_TEMPLATES:
        _USER_TEMPLATES[tokenizer] = tokenizer.chat_template
    special_tokens = dict(tokenizer.special_tokens_map)
    known, origin = None, ""
    if has_generation_markers(template):
        known, origin = template, "its own {% generation %} markers"
    else:
        try:
            known, origin = get_training_chat_template(tokenizer), "TRL's marked copy of it"
        except ValueError:  # TRL does not know this template
            pass
    if known is not None:
        problem = check_generation_markers(strip_generation_markers(known), known, special_tokens, exact=False)
        if problem is None:
            return known
        raise ChatTemplateError(
            f"the chat template of {tokenizer.name_or_path} cannot train every assistant turn with {origin}: "
            f"{problem}. Put `{{% generation %}}...{{% endgeneration %}}` around each assistant reply and its end of "
            "turn in a copy of the template and set `chat_template_path` to it, or set `assistant_turns: last`"
        )
    problem = "its shape is not one this package can mark"
    for derived in derive_candidates(template):
        problem = check_generation_markers(template, derived, special_tokens)
        if problem is None:
            return derived
    raise ChatTemplateError(
        f"the chat template of {tokenizer.name_or_path} has no {{% generation %}} markers, which training every "
        f"assistant turn of multi-turn conversations needs, and none could be derived (last try: {problem}). Put "
        "`{% generation %}...{% endgeneration %}` around the assistant's reply and end of turn in a copy of the "
        "template and set `chat_template_path` to it, or set `assistant_turns: last` to train only the last turn"
    )
