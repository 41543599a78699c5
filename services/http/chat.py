"""Chat messages to one prompt text: the model's Jinja chat template, rendered as transformers does."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# For a model without a template (the built-in random model): one "role: content" line per message,
# then the cue for the reply. Plain on purpose: any model can continue it, none was trained on it.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for transformers' training masks;
    rendering for inference keeps the text and ignores the mark."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_keep"), [], [], body).set_lineno(lineno)

    def _keep(self, caller: Any) -> str:
        return caller()


class ChatTemplateError(ValueError):
    """The template refused the conversation (raise_exception) or failed to render it."""


class ChatTemplate:
    """One compiled template plus the special-token strings transformers hands every render.

    transformers (`apply_chat_template`) renders in an immutable sandbox with trim_blocks and
    lstrip_blocks, the loopcontrols extension and the `generation` tag, a `tojson` that keeps
    non-ASCII, and the globals `raise_exception` and `strftime_now`; templates rely on all of these.
    """

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None, name: str = "model") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"the {name} chat template does not compile: {e}") from None
        self.special_tokens = dict(special_tokens or {})
        self.name = name  # "model" (from the model directory) or "fallback"

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens)
        except ChatTemplateError:
            raise
        except (jinja2.TemplateError, TypeError) as e:  # e.g. a template adding None content to a string
            raise ChatTemplateError(f"the chat template failed on these messages: {e}") from None

    @classmethod
    def fallback(cls) -> "ChatTemplate":
        return cls(FALLBACK_TEMPLATE, name="fallback")

    @classmethod
    def for_model(cls, model_dir: str) -> "ChatTemplate":
        """The template of a model directory (chat_template.jinja wins over tokenizer_config.json's
        `chat_template`, as in transformers), else the fallback."""
        d = Path(model_dir)
        config = _read_json(d / "tokenizer_config.json")
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if (d / "chat_template.jinja").is_file():
            source = (d / "chat_template.jinja").read_text()
        if not isinstance(source, str) or not source:
            return cls.fallback()
        return cls(source, _special_tokens(config))


def _special_tokens(config: dict[str, Any]) -> dict[str, str]:
    """tokenizer_config.json stores a token as a string or as a serialized AddedToken {"content": ...}."""
    out = {}
    for name in SPECIAL_TOKENS:
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[name] = value
    return out


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    return value if isinstance(value, dict) else {}


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str) -> None:
    raise ChatTemplateError(message)
