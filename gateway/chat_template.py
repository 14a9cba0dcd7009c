"""Chat messages to one prompt string: the checkpoint's own chat template when it has one, else a transcript.

The template is read the way Hugging Face tokenizers keep it, without importing transformers (the gateway runs
without torch): ``chat_template.jinja`` in the checkpoint folder, else ``chat_template.json``, else the
``chat_template`` entry of ``tokenizer_config.json`` (a string, or a list of named templates of which "default"
is used). It is rendered in a sandboxed Jinja environment set up as transformers does (``trim_blocks``,
``lstrip_blocks``, loop controls, the ``tojson`` filter, ``raise_exception``, ``strftime_now`` and a no-op
``{% generation %}`` block) with ``messages``, ``add_generation_prompt=True`` and the tokenizer's special
tokens (``bos_token``, ``eos_token``, ...).

The worker tokenizes the prompt it receives as text and its tokenizer adds the beginning-of-sequence token
itself, as for a plain completion; so a ``bos_token`` the template put at the very start is taken off again
(unless the tokenizer config says ``add_bos_token: false``), and the model does not see it twice.

Without a template (a base model, or no folder configured) the prompt is a plain transcript, one
``role: content`` line a message, ending with ``assistant:``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """The messages cannot be rendered (the template refused them, or they are malformed)."""


class _GenerationBlock(Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask marker) renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _render(caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _pick(template: Any, where: Path) -> str:
    if isinstance(template, str):
        return template
    if isinstance(template, list):        # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise ValueError(f"{where}: chat_template is neither a string nor a list with a 'default' template")


@dataclass
class ChatTemplate:
    """Renders chat messages to a prompt; ``source`` says where the template came from ("" = transcript)."""

    template: str = ""
    special_tokens: dict[str, str] = field(default_factory=dict)
    strip_bos: bool = True
    source: str = ""

    def __post_init__(self) -> None:
        self._compiled: jinja2.Template | None = None
        if self.template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[_GenerationBlock, loopcontrols])
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = _strftime_now
            self._compiled = env.from_string(self.template)     # a syntax error fails at start, not per request

    @classmethod
    def load(cls, folder: str | Path) -> "ChatTemplate":
        """The template of the checkpoint in ``folder``; a transcript for "" or a checkpoint without one.
        A folder that does not exist, or a template that does not compile, is an error."""
        if not str(folder):
            return cls()
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise ValueError(f"chat_template: {path} is not a folder")
        config: dict[str, Any] = {}
        config_file = path / "tokenizer_config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text())
        template: Any = None
        if (path / "chat_template.jinja").is_file():
            template, source = (path / "chat_template.jinja").read_text(), path / "chat_template.jinja"
        elif (path / "chat_template.json").is_file():
            template, source = json.loads((path / "chat_template.json").read_text()).get("chat_template"), \
                path / "chat_template.json"
        else:
            template, source = config.get("chat_template"), config_file
        if not template:
            return cls(source="")
        tokens = {name: text for name in SPECIAL_TOKENS if (text := _token_text(config.get(name))) is not None}
        return cls(template=_pick(template, source), special_tokens=tokens,
                   strip_bos=config.get("add_bos_token", True) is not False, source=str(source))

    @property
    def has_template(self) -> bool:
        return self._compiled is not None

    def render(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """The prompt for ``messages`` (each a mapping with a ``role`` and a string ``content``), ending where
        the assistant's answer begins."""
        if not messages:
            raise ChatTemplateError("at least one message is needed")
        if self._compiled is None:
            lines = [f"{m['role']}: {m.get('content') or ''}" for m in messages]
            return "\n".join(lines) + "\nassistant:"
        try:
            text = self._compiled.render(messages=[dict(m) for m in messages], add_generation_prompt=True,
                                         tools=None, documents=None, **self.special_tokens)
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:            # includes the sandbox's SecurityError
            raise ChatTemplateError(f"the chat template failed: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise ChatTemplateError(f"the chat template failed: {type(e).__name__}: {e}") from None
        bos = self.special_tokens.get("bos_token")
        if self.strip_bos and bos and text.startswith(bos):
            text = text[len(bos):]
        return text
