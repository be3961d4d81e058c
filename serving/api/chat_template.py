"""Chat templates: the jinja that turns OpenAI chat messages into one prompt, as HF renders it.

A model's template comes from its tokenizer (HF's tokenizer_config.json or chat_template.jinja;
a matta checkpoint keeps it as chat_template.jinja), or from ``--chat-template FILE`` for a model
without one (``--chat-template chatml`` names the ChatML template shipped in serving/api/templates/).
Rendering follows ``transformers.PreTrainedTokenizerBase.apply_chat_template(tokenize=False)``:
a sandboxed environment with ``trim_blocks`` and ``lstrip_blocks``, the loop-controls extension,
HF's ``tojson`` (no HTML escaping, non-ASCII kept), ``raise_exception`` and ``strftime_now``, and
the special tokens (``bos_token``, ``eos_token``) as variables. Templates are untrusted code: the
sandbox refuses attribute tricks, and a template error is the client's 400, never a 500.
Torch-free (``matta route`` renders too).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
BUILTIN_TEMPLATES = {"chatml": TEMPLATES_DIR / "chatml.jinja"}
CHECKPOINT_TEMPLATE_FILE = "chat_template.jinja"  # matta.checkpoint.CHAT_TEMPLATE_FILE (no torch here)


class ChatTemplateError(ValueError):
    """A template that does not compile, or that fails (or raises) on the messages it was given."""


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """One compiled chat template and the special tokens it may refer to."""

    def __init__(self, source: str, special_tokens: dict[str, str | None] | None = None, origin: str = "") -> None:
        self.source = source
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.origin = origin or "the chat template"
        # Compiled now: a broken template fails at start-up, not on every request.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        try:
            self._template = env.from_string(source)
        except jinja2.exceptions.TemplateError as exc:
            raise ChatTemplateError(f"{self.origin}: not a valid jinja template ({exc})") from exc

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **variables: Any) -> str:
        """The prompt text for ``messages`` (``[{"role", "content"}, ...]``), ending with the
        assistant's turn opened when ``add_generation_prompt``."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens, **variables)
        except jinja2.exceptions.TemplateError as exc:
            raise ChatTemplateError(f"{self.origin} failed on these messages: {exc}") from exc
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            raise ChatTemplateError(f"{self.origin} failed on these messages: {type(exc).__name__}: {exc}") from exc


def read_template_file(spec: str | Path) -> tuple[str, str]:
    """The text of ``--chat-template``'s value: a built-in name (``chatml``) or a file; and where it came from."""
    path = BUILTIN_TEMPLATES.get(str(spec), Path(spec))
    if not path.is_file():
        raise ValueError(f"--chat-template {str(spec)!r}: no such file, and not a built-in template "
                         f"({sorted(BUILTIN_TEMPLATES)})")
    try:
        return path.read_text(), str(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--chat-template {str(spec)!r}: unreadable ({exc})") from exc


def resolve_chat_template(override: str | Path | None, model_template: str | None,
                          special_tokens: dict[str, str | None], model_origin: str = "") -> ChatTemplate | None:
    """The server's chat template: ``--chat-template`` when given (as in vLLM it replaces the
    model's), else the model's own, else None (chat requests then get a clear 400)."""
    if override is not None:
        source, origin = read_template_file(override)
        return ChatTemplate(source, special_tokens, origin=f"chat template {origin}")
    if model_template is not None:
        return ChatTemplate(model_template, special_tokens, origin=f"the chat template of {model_origin or 'the model'}")
    return None


def checkpoint_chat_template(checkpoint: str | Path, override: str | Path | None) -> ChatTemplate | None:
    """For a process that does not load the checkpoint (``matta route``): its chat_template.jinja and
    special tokens, read from the files (config.json's bos/eos ids, tokenizer.json's vocabulary)."""
    checkpoint = Path(checkpoint)
    template_path = checkpoint / CHECKPOINT_TEMPLATE_FILE
    model_template = template_path.read_text() if template_path.is_file() else None
    specials: dict[str, str | None] = {}
    config_path, tokenizer_path = checkpoint / "config.json", checkpoint / "tokenizer.json"
    if config_path.is_file() and tokenizer_path.is_file():
        from tokenizers import Tokenizer

        config, vocab = json.loads(config_path.read_text()), Tokenizer.from_file(str(tokenizer_path))
        eos = config.get("eos_token_id")
        bos = config.get("bos_token_id", eos)
        specials = {"bos_token": vocab.id_to_token(bos) if isinstance(bos, int) else None,
                    "eos_token": vocab.id_to_token(eos) if isinstance(eos, int) else None}
    return resolve_chat_template(override, model_template, specials, str(checkpoint))
