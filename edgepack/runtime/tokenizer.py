"""A light tokenizer for bundles: the `tokenizers` library plus the chat template, rendered
the way transformers renders it, without importing transformers (seconds of import time
and ~100 MiB on a small box). Bundles without a ``tokenizer.json`` fall back to
transformers' AutoTokenizer.

Whatever the files hold, loading raises BundleIntegrityError and a chat template that
does not compile or fails on its messages raises ChatTemplateError: the `tokenizers` library
raises a bare ``Exception`` for a file it cannot parse, and jinja's errors (or anything a
template makes Python raise) are no business of the caller's."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from edgepack.errors import BundleIntegrityError, ChatTemplateError, EdgepackError


def load_tokenizer(bundle: Path):
    if (bundle / "tokenizer.json").is_file():
        return BundleTokenizer(bundle)
    from edgepack import extras

    extras.require("torch", "this bundle's tokenizer", "it has no tokenizer.json, so transformers reads it",
                   packages=("transformers",))  # fmt: skip
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(bundle))


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


class BundleTokenizer:
    """The subset of a transformers tokenizer the runtime and its users need: ``encode``,
    ``decode``, ``apply_chat_template``, ``chat_template``, ``eos_token(_id)``,
    ``bos_token(_id)``, ``len()``."""

    def __init__(self, bundle: Path):
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises bare Exception for a bad file
            raise _damaged("tokenizer.json", exc) from None
        config_path = bundle / "tokenizer_config.json"
        try:
            config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        except (OSError, ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
            raise _damaged("tokenizer_config.json", exc) from None
        if not isinstance(config, dict):
            raise _damaged("tokenizer_config.json", TypeError("not a JSON object"))
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.pad_token = _token_text(config.get("pad_token"))
        for name in ("bos_token", "eos_token", "pad_token"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise _damaged("tokenizer_config.json", TypeError(f"{name} is not a string"))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: use "default"
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
        if template is None and (bundle / "chat_template.jinja").is_file():
            try:
                template = (bundle / "chat_template.jinja").read_text(encoding="utf-8")
            except (OSError, ValueError) as exc:
                raise _damaged("chat_template.jinja", exc) from None
        if template is not None and not isinstance(template, str):
            raise _damaged("tokenizer_config.json", TypeError("chat_template is not a string"))
        self.chat_template = template
        self._compiled = None

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[dict], add_generation_prompt: bool = True, tokenize: bool = False, **kwargs
    ):
        if not self.chat_template:
            raise ChatTemplateError("this bundle's tokenizer has no chat template",
                                    hint="send a plain prompt (without --chat)")  # fmt: skip
        try:
            if self._compiled is None:
                self._compiled = _jinja_env().from_string(self.chat_template)
            text = self._compiled.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                pad_token=self.pad_token or "",
                **kwargs,
            )
        except EdgepackError:
            raise
        except Exception as exc:  # noqa: BLE001 - jinja's errors and whatever the template makes Python raise
            raise template_failed(exc) from None
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _damaged(name: str, exc: BaseException) -> BundleIntegrityError:
    detail = str(exc).splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return BundleIntegrityError(f"the bundle's {name} cannot be read: {detail}",
                                hint="the bundle's tokenizer files are damaged or were edited; pull or pack it again")  # fmt: skip


def template_failed(exc: BaseException) -> ChatTemplateError:
    import jinja2

    if isinstance(exc, jinja2.TemplateSyntaxError):
        where = f" (line {exc.lineno})" if exc.lineno else ""
        return ChatTemplateError(f"the bundle's chat template does not compile{where}: {exc.message or exc}",
                                 hint="fix chat_template in tokenizer_config.json (or chat_template.jinja), "
                                 "or send a plain prompt without --chat")  # fmt: skip
    if isinstance(exc, _RaisedByTemplate):  # the template's own raise_exception(): its words
        return ChatTemplateError(f"the bundle's chat template refuses these messages: {exc}",
                                 hint="change the messages as the template asks (roles, order), or send a plain prompt")  # fmt: skip
    detail = str(exc).splitlines()[0][:200] if str(exc).strip() else ""
    return ChatTemplateError(f"the bundle's chat template failed: {type(exc).__name__}" + (f": {detail}" if detail else ""),
                             hint="the template is broken or does not fit these messages; send a plain prompt without --chat")  # fmt: skip


class _RaisedByTemplate(Exception):
    """raise_exception() called from a template (transformers raises TemplateError there)."""


def _jinja_env():
    """The environment transformers renders chat templates in (sandboxed, trim_blocks,
    lstrip_blocks, loop controls, raise_exception, strftime_now, tojson keeping unicode)."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise _RaisedByTemplate(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
