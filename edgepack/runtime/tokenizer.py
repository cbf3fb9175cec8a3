"""A light tokenizer for bundles: the `tokenizers` library plus the chat template, rendered
the way transformers renders it, without importing transformers (seconds of import time
and ~100 MiB on a small box). Bundles without a ``tokenizer.json`` fall back to
transformers' AutoTokenizer."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence


def load_tokenizer(bundle: Path):
    if (bundle / "tokenizer.json").is_file():
        return BundleTokenizer(bundle)
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

        self._tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
        config_path = bundle / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.pad_token = _token_text(config.get("pad_token"))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: use "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (bundle / "chat_template.jinja").is_file():
            template = (bundle / "chat_template.jinja").read_text(encoding="utf-8")
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
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
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
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _jinja_env():
    """The environment transformers renders chat templates in (sandboxed, trim_blocks,
    lstrip_blocks, loop controls, raise_exception, strftime_now, tojson keeping unicode)."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
