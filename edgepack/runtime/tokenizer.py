"""A light tokenizer for bundles: the `tokenizers` library plus the chat template, rendered
the way transformers renders it, without importing transformers (seconds of import time
and ~100 MiB on a small box). Bundles without a ``tokenizer.json`` fall back to
transformers' AutoTokenizer.

Whatever the files hold, loading raises BundleIntegrityError and a chat template that
does not compile or fails on its messages raises ChatTemplateError: the `tokenizers` library
raises a bare ``Exception`` for a file it cannot parse, and jinja's errors (or anything a
template makes Python raise) are no business of the caller's.

A chat template is code from the bundle, so it is rendered bounded: in jinja2's sandbox, with
a deadline checked on every loop iteration and call, and every string or list it builds
(operators, filters, method calls, joined output) checked against a size limit before it is
allocated where the size can be known first, and after otherwise. Beyond either bound the
render stops with a ChatTemplateError that says which bound."""

from __future__ import annotations

import json
import re
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from edgepack.errors import BundleIntegrityError, ChatTemplateError, EdgepackError

# A real chat template renders a conversation in milliseconds (Llama 3.1's, 1,000 messages:
# ~20 ms); a second is fifty times that on a slow box and still short enough for a client.
CHAT_TEMPLATE_SECONDS = 1.0
# The longest text (or list) one render may build: 16 Mi characters is far past any context
# (a 128k-token prompt is ~0.5 Mi characters); callers that know the context pass less.
CHAT_TEMPLATE_MAX_CHARS = 16 * 1024 * 1024
# Every value of at least this many characters is charged to the render; all of them
# together may come to this many times the limit (values freed early are charged too).
_CHARGED_CHARS = 4096
_CHARGE_FACTOR = 8
_TICKS_PER_CLOCK_READ = 256
# A %-format or str.format field width of 7+ digits pads to a million characters or more.
_WIDE_FORMAT = re.compile(r"%[^a-zA-Z%]*(\*|\d{7,})|\{[^{}]*\d{7,}[^{}]*\}")



def load_tokenizer(bundle: Path):
    if (bundle / "tokenizer.json").is_file():
        return BundleTokenizer(bundle)
    from edgepack import extras

    extras.require("torch", "this bundle's tokenizer", "it has no tokenizer.json, so transformers reads it",
                   packages=("transformers",))
    from transformers import AutoTokenizer

    return TransformersTokenizer(AutoTokenizer.from_pretrained(str(bundle)))


class TransformersTokenizer:
    """transformers' tokenizer (a bundle without tokenizer.json) whose chat template is
    rendered bounded, as BundleTokenizer's is: transformers renders it without a deadline or
    a size limit. Everything else is the wrapped tokenizer's."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._compiled = None

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("tokenizer", "_compiled"):  # copy/pickle probe before __init__
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_compiled": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True, tokenize: bool = False,
                            **kwargs):
        template = self.tokenizer.chat_template
        if isinstance(template, dict):  # named templates: use "default"
            template = template.get("default")
        if not isinstance(template, str) or not template:
            raise ChatTemplateError("this bundle's tokenizer has no chat template",
                                    hint="send a plain prompt (without --chat)")
        max_seconds = kwargs.pop("max_seconds", CHAT_TEMPLATE_SECONDS)
        max_chars = kwargs.pop("max_chars", CHAT_TEMPLATE_MAX_CHARS)
        if self._compiled is None:
            self._compiled = _compile_template(template)
        special = {k: v for k, v in self.tokenizer.special_tokens_map.items() if isinstance(v, str)}
        variables = {**special, "messages": list(messages), "add_generation_prompt": add_generation_prompt, **kwargs}
        text = render_bounded(self._compiled, variables, max_seconds=max_seconds, max_chars=max_chars)
        return self.tokenizer.encode(text, add_special_tokens=False) if tokenize else text


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

    def __getstate__(self) -> dict:  # copies (the server's own tokenizer) recompile the template
        return {**self.__dict__, "_compiled": None}

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch lets go of the GIL while Rust works; encode holds it (a 750k-character
        # prompt stopped every other thread, a server's event loop included, for 0.75 s)
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def max_chars_per_token(self) -> int | None:
        """The most input characters one token can stand for, or None where nothing bounds it.

        A vocabulary entry of n symbols covers at most n input characters (byte-level BPE:
        one symbol per byte, and a character is at least one byte; SentencePiece: one per
        character, its `▁` for a space). Normalizers only widen that: NFC/NFKC compose at
        most 4 code points into one (the longest canonical decomposition), Replace shrinks by
        its pattern/content ratio. Tokenizers that can drop input (a normalizer stripping
        characters, a pre-tokenizer removing whitespace, an unknown token covering a word)
        have no bound: None."""
        spec = json.loads(self._tok.to_str())
        model = spec.get("model") or {}
        if model.get("type") != "BPE" or (model.get("fuse_unk") and not model.get("byte_fallback")):
            return None
        factor = _normalizer_factor(spec.get("normalizer"))
        if factor is None or not _keeps_input(spec.get("pre_tokenizer")):
            return None
        longest = max((len(t) for t in self._tok.get_vocab(with_added_tokens=True)), default=1)
        return longest * factor

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[dict], add_generation_prompt: bool = True, tokenize: bool = False, **kwargs
    ):
        if not self.chat_template:
            raise ChatTemplateError("this bundle's tokenizer has no chat template",
                                    hint="send a plain prompt (without --chat)")
        max_seconds = kwargs.pop("max_seconds", CHAT_TEMPLATE_SECONDS)
        max_chars = kwargs.pop("max_chars", CHAT_TEMPLATE_MAX_CHARS)
        if self._compiled is None:
            self._compiled = _compile_template(self.chat_template)
        variables = dict(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            pad_token=self.pad_token or "",
            **kwargs,
        )
        text = render_bounded(self._compiled, variables, max_seconds=max_seconds, max_chars=max_chars)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _damaged(name: str, exc: BaseException) -> BundleIntegrityError:
    detail = str(exc).splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return BundleIntegrityError(f"the bundle's {name} cannot be read: {detail}",
                                hint="the bundle's tokenizer files are damaged or were edited; pull or pack it again")


def template_failed(exc: BaseException) -> ChatTemplateError:
    import jinja2

    if isinstance(exc, jinja2.TemplateSyntaxError):
        where = f" (line {exc.lineno})" if exc.lineno else ""
        return ChatTemplateError(f"the bundle's chat template does not compile{where}: {exc.message or exc}",
                                 hint="fix chat_template in tokenizer_config.json (or chat_template.jinja), "
                                 "or send a plain prompt without --chat")
    if isinstance(exc, _RaisedByTemplate):  # the template's own raise_exception(): its words
        return ChatTemplateError(f"the bundle's chat template refuses these messages: {exc}",
                                 hint="change the messages as the template asks (roles, order), or send a plain prompt")
    detail = str(exc).splitlines()[0][:200] if str(exc).strip() else ""
    return ChatTemplateError(f"the bundle's chat template failed: {type(exc).__name__}" + (f": {detail}" if detail else ""),
                             hint="the template is broken or does not fit these messages; send a plain prompt without --chat")


class _RaisedByTemplate(Exception):
    """raise_exception() called from a template (transformers raises TemplateError there)."""


def _normalizer_factor(spec: dict | None) -> int | None:
    """How many input characters one normalized character can stand for (None: unbounded)."""
    if spec is None:
        return 1
    kind = spec.get("type")
    if kind == "Sequence":
        factor = 1
        for part in spec.get("normalizers", []):
            f = _normalizer_factor(part)
            if f is None:
                return None
            factor *= f
        return factor
    if kind in ("NFD", "NFKD", "Lowercase", "Prepend"):
        return 1
    if kind in ("NFC", "NFKC"):
        return 4
    if kind == "Replace":
        pattern, content = (spec.get("pattern") or {}).get("String"), spec.get("content")
        if isinstance(pattern, str) and isinstance(content, str) and content:
            return max(1, -(-len(pattern) // len(content)))
    return None


def _keeps_input(spec: dict | None) -> bool:
    """Whether a pre-tokenizer passes every character on (Whitespace-style splitters drop some)."""
    if spec is None:
        return True
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_keeps_input(p) for p in spec.get("pretokenizers", []))
    if kind == "Split":
        return spec.get("behavior") != "Removed"
    return kind in ("ByteLevel", "Metaspace", "Digits", "Punctuation", "UnicodeScripts")


def _compile_template(source: str):
    try:
        return _jinja_env().from_string(source)
    except Exception as exc:  # noqa: BLE001 - a syntax error, or whatever jinja raises on bad source
        raise template_failed(exc) from None


class _Budget:
    """One render's deadline and size limit, kept per thread (the server renders on two)."""

    def __init__(self, max_seconds: float, max_chars: int):
        self.deadline = time.monotonic() + max_seconds
        self.max_seconds, self.max_chars = max_seconds, max_chars
        self.ticks = 0
        self.charged = 0

    def tick(self) -> None:
        self.ticks += 1
        if self.ticks % _TICKS_PER_CLOCK_READ == 0 and time.monotonic() > self.deadline:
            raise _LimitExceeded(f"ran for more than {self.max_seconds:g} s")

    def size(self, n: int, what: str = "a value") -> None:
        """Refuse a value of n characters (or items) before or after it is built."""
        if n > self.max_chars:
            raise _LimitExceeded(f"built {what} of {n:,} characters (the limit is {self.max_chars:,})")
        if n >= _CHARGED_CHARS:
            self.charged += n
            if self.charged > _CHARGE_FACTOR * self.max_chars:
                raise _LimitExceeded(f"built more than {_CHARGE_FACTOR * self.max_chars:,} characters in all")

    def result(self, value: Any) -> Any:
        if isinstance(value, (str, list, tuple, dict)):
            self.size(len(value))
        return value


class _LimitExceeded(Exception):
    pass


_current = threading.local()


def _budget() -> _Budget:
    budget = getattr(_current, "budget", None)
    if budget is None:  # a template object used outside render_bounded still gets bounds
        budget = _current.budget = _Budget(CHAT_TEMPLATE_SECONDS, CHAT_TEMPLATE_MAX_CHARS)
    return budget


def render_bounded(template, variables: dict, *, max_seconds: float, max_chars: int) -> str:
    """Render a template compiled by _jinja_env within max_seconds and max_chars; beyond
    either, or on a template error, a ChatTemplateError saying which."""
    _current.budget = budget = _Budget(max_seconds, max_chars)
    pieces, total = [], 0
    try:
        for piece in template.generate(**variables):
            total += len(piece)
            budget.size(total, "a prompt")
            budget.tick()
            pieces.append(piece)
        return "".join(pieces)
    except _LimitExceeded as exc:
        raise ChatTemplateError(
            f"the bundle's chat template {exc}, so it was stopped",
            hint="the template is broken or hostile; send fewer or shorter messages, or a plain prompt",
        ) from None
    except EdgepackError:
        raise
    except Exception as exc:  # noqa: BLE001 - jinja's errors and whatever the template makes Python raise
        raise template_failed(exc) from None
    finally:
        _current.budget = None


def _sequence_length(value: Any) -> int | None:
    return len(value) if isinstance(value, (str, list, tuple)) else None


def _big_int(value: Any, limit: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) > limit


def _check_arguments(args, kwargs) -> None:
    budget = _budget()
    budget.tick()
    values = list(args) + list(kwargs.values())
    if any(_big_int(v, budget.max_chars) for v in values):  # a width, count or repeat
        raise _LimitExceeded(f"asked for a size over {budget.max_chars:,}")
    if any(isinstance(v, str) and _WIDE_FORMAT.search(v) for v in values):
        raise _LimitExceeded("asked for a format field a million or more characters wide")


def _check_replace(text: Any, old: Any, new: Any, count: Any = -1) -> None:
    if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
        hits = len(text) + 1 if old == "" else text.count(old)
        if _is_int(count) and count >= 0:
            hits = min(hits, count)
        _budget().size(len(text) + hits * max(0, len(new) - len(old)), "a replacement")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bounded_filter(name: str, func):
    def checked(*args, **kwargs):
        _check_arguments(args, kwargs)
        values = [a for a in args if not isinstance(a, _passed_types())]  # not a passed context / env
        if name == "replace" and len(values) >= 3:
            _check_replace(*values[:4])
        if name == "indent" and values and isinstance(values[0], str):
            width = values[1] if len(values) > 1 else kwargs.get("width", 4)
            width = len(width) if isinstance(width, str) else width if _is_int(width) else 0
            _budget().size(len(values[0]) + (values[0].count("\n") + 1) * width, "an indented text")
        return _budget().result(func(*args, **kwargs))

    for attr in ("jinja_pass_arg",):  # keep the context/environment passing of the filter
        if hasattr(func, attr):
            setattr(checked, attr, getattr(func, attr))
    return checked


def _passed_types() -> tuple:
    from jinja2 import Environment
    from jinja2.nodes import EvalContext
    from jinja2.runtime import Context

    return (Environment, EvalContext, Context)


def _jinja_env():
    """The environment transformers renders chat templates in (sandboxed, trim_blocks,
    lstrip_blocks, loop controls, raise_exception, strftime_now, tojson keeping unicode),
    with the bounds described at the top of this module."""
    from jinja2 import nodes
    from jinja2.compiler import CodeGenerator
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedCodeGenerator(CodeGenerator):
        def visit_Concat(self, node, frame):  # `a ~ b`: joined by a size-checked join
            self.write("environment.checked_join((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        code_generator_class = BoundedCodeGenerator
        intercepted_binops = frozenset({"*", "+", "**", "%"})

        def _parse(self, source, name, filename):
            tree = super()._parse(source, name, filename)
            for loop in tree.find_all(nodes.For):  # every loop ticks the budget per item
                loop.iter = nodes.Filter(loop.iter, "edgepack_loop", [], [], None, None, lineno=loop.lineno)
            return tree

        def call_binop(self, context, operator, left, right):
            budget = _budget()
            budget.tick()
            lengths = (_sequence_length(left), _sequence_length(right))
            if operator == "*" and None in lengths and lengths != (None, None):
                count = right if lengths[0] is not None else left
                if _is_int(count):
                    budget.size((lengths[0] or lengths[1]) * max(count, 0), "a repeated value")
            elif operator == "+" and None not in lengths:
                budget.size(lengths[0] + lengths[1], "a joined value")
            elif operator == "**" and _is_int(left) and _is_int(right) and abs(left) > 1:
                if right > 0 and left.bit_length() * right > 8 * budget.max_chars:
                    raise _LimitExceeded(f"asked for a number over {budget.max_chars:,} bytes long")
            elif operator == "%" and isinstance(left, str):
                _check_arguments((left,) + (right if isinstance(right, tuple) else (right,)), {})
            return budget.result(super().call_binop(context, operator, left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
            _check_arguments(args, kwargs)
            bound = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
            owner, method = getattr(bound, "__self__", None), getattr(bound, "__name__", "")
            if isinstance(owner, str):
                if method in ("format", "format_map") and _WIDE_FORMAT.search(owner):
                    raise _LimitExceeded("asked for a format field a million or more characters wide")
                if method == "replace" and len(args) >= 2:
                    _check_replace(owner, *args[:3])
                if method == "expandtabs":
                    tab = args[0] if args else kwargs.get("tabsize", 8)
                    _budget().size(len(owner) + owner.count("\t") * (tab if _is_int(tab) else 8), "a text")
                if method == "join" and args:
                    items = list(args[0])
                    lengths = sum(len(i) for i in items if isinstance(i, str))
                    _budget().size(lengths + len(owner) * max(0, len(items) - 1), "a joined text")
                    args = (items,) + args[1:]
            return _budget().result(super().call(__context, __obj, *args, **kwargs))

        @staticmethod
        def checked_join(values) -> str:
            parts = [str(v) for v in values]
            _budget().size(sum(map(len, parts)), "a joined text")
            return "".join(parts)

        @staticmethod
        def concat(values) -> str:  # macro, block-set and caller output
            parts = list(values)
            _budget().size(sum(map(len, parts)), "a block's output")
            return "".join(parts)

    def edgepack_loop(iterable):
        budget = _budget()
        if isinstance(iterable, (str, list, tuple, dict)):
            budget.size(len(iterable), "a loop")
        for item in iterable:
            budget.tick()
            yield item

    def raise_exception(message):
        raise _RaisedByTemplate(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    for name, func in list(env.filters.items()):
        env.filters[name] = _bounded_filter(name, func)
    env.filters["edgepack_loop"] = edgepack_loop
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
