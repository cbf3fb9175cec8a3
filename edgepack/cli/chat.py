"""``edgepack chat``: a multi-turn conversation whose history stays in the KV cache.

Each turn renders the whole conversation through the bundle's chat template, keeps the
longest token prefix the cache already holds and runs only the rest: a turn costs its
new tokens, not the conversation so far. Matching tokens (not counting turns) stays right
for templates that render earlier turns differently once a later one exists. When the
context is full the oldest turns are dropped (the system prompt stays) and the rest is
run again.

Backends: the C engine and the torch Llama decoder keep their caches, cut back to the
common prefix; other torch models (transformers' own modules) crop transformers'
DynamicCache where it can, else run the whole conversation again each turn.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator

from edgepack.cli.run import add_load_arguments, add_sampling_arguments, apply_threads
from edgepack.errors import GenerationError, printable

# Room a turn needs for its reply before older turns are dropped; a reply longer than what
# is left stops with finish "length" and the next turn drops turns.
MIN_REPLY_TOKENS = 16


def configure_parser(p) -> None:
    p.add_argument("bundle", metavar="BUNDLE_OR_REPO",
                   help="bundle directory, or a Hub repo: owner/name[@revision] or hf://owner/name")
    p.add_argument("--system", default=None, help="system prompt, kept through /reset and dropped turns")
    p.add_argument("--max-new-tokens", type=int, default=512, help="longest reply, in tokens")
    p.add_argument("--context", type=int, default=None,
                   help="tokens of conversation kept (default: the model's context length)")
    add_sampling_arguments(p)
    add_load_arguments(p)
    p.add_argument("--stats", action="store_true", help="after each reply, its time to first token and speed (stderr)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object a turn on stdout (the reply, its tokens, time to first token, speed) "
                        "instead of the streamed text")


# --- the conversation ----------------------------------------------------------------------------


@dataclass
class Turn:
    """One reply: its text and how it went."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0  # the whole rendered conversation
    reused_tokens: int = 0  # of those, already in the cache
    generated_tokens: int = 0
    first_token_seconds: float = 0.0
    decode_seconds: float = 0.0
    dropped_turns: int = 0  # oldest turns dropped before this one to fit the context


@dataclass
class Chat:
    """A conversation with a loaded EdgeModel; ``say(text)`` streams the reply's pieces.

    ``messages`` is the conversation as the template sees it; ``cached`` the token ids whose
    keys and values the cache holds, in order (what the next turn can reuse)."""

    lm: object
    system: str | None = None
    max_new_tokens: int = 512
    context: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    messages: list[dict] = field(default_factory=list)
    cached: list[int] = field(default_factory=list)

    def __post_init__(self):
        from edgepack.runtime import _check_sampling

        self.temperature, self.top_p, self.top_k = self.lm._sampling_defaults(self.temperature, self.top_p, self.top_k)
        _check_sampling(self.max_new_tokens, 0, self.temperature, self.top_p, self.top_k)
        limit = self.lm.max_positions
        self.context = limit if self.context is None else self.context
        if not 2 <= self.context <= limit:
            raise GenerationError(f"--context must be between 2 and the model's {limit}, not {self.context}",
                                  hint=f"pass --context {limit} or less, or leave it out")
        self.decoder = _decoder(self.lm, self.context, self.seed)
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays); the cache is reused lazily."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def say(self, text: str) -> Iterator[str]:
        """Add a user turn (dropping the oldest turns if the context is full: see
        ``self.last.dropped_turns``) and return the reply's pieces as they come;
        ``self.last`` describes the reply when they are done."""
        self.messages.append({"role": "user", "content": text})
        self.last = turn = Turn()
        try:
            ids = self._fit(turn)
        except GenerationError:
            self.messages.pop()
            raise
        # at least one token runs: its logits give the reply's first token
        start = self.decoder.truncate(min(_common_prefix(self.cached, ids), len(ids) - 1))
        self.cached = ids[:start]
        turn.prompt_tokens, turn.reused_tokens = len(ids), start
        budget = min(self.max_new_tokens, self.context - len(ids))
        self.messages.append({"role": "assistant", "content": ""})
        return self._reply(ids[start:], budget, turn)

    def _fit(self, turn: Turn) -> list[int]:
        """The rendered conversation, after dropping the oldest turns until a reply fits."""
        first = 1 if self.system else 0
        while True:
            ids = self.lm.encode_prompt(self.messages, chat=True)
            room = min(self.max_new_tokens, MIN_REPLY_TOKENS)
            if len(ids) + room <= self.context:
                return ids
            if len(self.messages) - first <= 1:  # only this turn left (and the system prompt)
                raise GenerationError(
                    f"this message is {len(ids)} tokens with the template; the context holds {self.context}",
                    hint="send a shorter message" + (" or a shorter --system prompt" if self.system else ""),
                )
            # a turn is a user message and the reply after it
            del self.messages[first : first + 2]
            turn.dropped_turns += 1

    def _reply(self, new_ids: list[int], budget: int, turn: Turn) -> Iterator[str]:
        from edgepack.runtime import _IncrementalDetokenizer

        detok = _IncrementalDetokenizer(self.lm.tokenizer)
        eos = self.lm.eos_token_ids
        t0 = time.perf_counter()
        ids = new_ids
        try:
            while True:
                logits = self.decoder.forward(ids)
                self.cached.extend(ids)
                token = self.decoder.sample(logits, self.temperature, self.top_p, self.top_k)
                turn.generated_tokens += 1
                if turn.generated_tokens == 1:
                    turn.first_token_seconds = time.perf_counter() - t0
                if token in eos:
                    turn.finish_reason = "stop"
                else:
                    piece = detok.add(token)
                    turn.finish_reason = "length" if turn.generated_tokens >= budget else None
                    if turn.finish_reason:
                        piece += detok.flush()
                    turn.text += piece
                    yield piece
                if turn.finish_reason:
                    return
                ids = [token]
        finally:  # also when the reader stops early (Ctrl-C): the partial reply stays in history
            turn.decode_seconds = time.perf_counter() - t0 - turn.first_token_seconds
            self.messages[-1]["content"] = turn.text


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# --- the cache, per backend ------------------------------------------------------------------------


def _decoder(lm, context: int, seed: int | None):
    if lm.backend == "native":
        return _NativeDecoder(lm.model, context, seed)
    if hasattr(lm.model, "logits_last"):
        return _LeanDecoder(lm.model, context, seed)
    return _HFDecoder(lm.model, seed)


class _NativeDecoder:
    """edgepack's C engine: one NativeCache for the whole session; cutting it back is
    setting its length (positions past it are overwritten before they are read)."""

    def __init__(self, model, context: int, seed: int | None):
        self.model, self.cache = model, model.new_cache(context)
        self.rng = random.Random(seed) if seed is not None else None

    def truncate(self, length: int) -> int:
        return self.cache.keep(length)  # a wrapped sliding-window ring keeps all or nothing

    def forward(self, ids: list[int]):
        return self.model.forward(ids, self.cache)

    def sample(self, logits, temperature: float, top_p: float, top_k: int) -> int:
        return self.model.sample(logits, temperature, top_p, top_k, self.rng)


class _TorchSampling:
    def __init__(self, model, seed: int | None):
        import torch

        self.model, self.torch = model, torch
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.device = getattr(model, "_edgepack_input_device", torch.device("cpu"))

    def sample(self, logits, temperature: float, top_p: float, top_k: int) -> int:
        from edgepack.runtime.torch.model import _sample

        return _sample(logits.float(), temperature, top_p, top_k, self.generator)

    def _tensor(self, ids: list[int]):
        return self.torch.tensor([ids], dtype=self.torch.long, device=self.device)


class _LeanDecoder(_TorchSampling):
    """The torch Llama decoder (runtime/torch/llama.py): its KVCache, cut back by length."""

    def __init__(self, model, context: int, seed: int | None):
        super().__init__(model, seed)
        self.cache = model.new_cache(context)

    def truncate(self, length: int) -> int:
        self.cache.length = min(self.cache.length, length)
        return self.cache.length

    def forward(self, ids: list[int]):
        return self.model.logits_last(self._tensor(ids), self.cache)


class _HFDecoder(_TorchSampling):
    """transformers' modules: past_key_values cropped to the common prefix when the cache
    type can crop (DynamicCache), else dropped and the conversation run again."""

    def __init__(self, model, seed: int | None):
        super().__init__(model, seed)
        self.past, self.length = None, 0

    def truncate(self, length: int) -> int:
        """Cut the cache back to at most ``length`` tokens; returns how many it keeps."""
        if length >= self.length:
            return self.length
        if length > 0 and hasattr(self.past, "crop"):
            self.past.crop(length - self.length)  # negative: tokens to drop (every transformers version reads it so)
            self.length = length
        else:
            self.past, self.length = None, 0
        return self.length

    def forward(self, ids: list[int]):
        with self.torch.inference_mode():
            out = self.model(input_ids=self._tensor(ids), past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        self.length += len(ids)
        return out.logits[0, -1]


# --- the command ------------------------------------------------------------------------------------


def _lines(interactive: bool) -> Iterator[str]:
    """User turns: prompted lines on a terminal (readline editing where it exists), else one
    turn per stdin line."""
    if interactive:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
        while True:
            try:
                yield input(">>> ")
            except EOFError:
                print()
                return
    else:
        for line in sys.stdin:
            yield line.rstrip("\r\n")


def main(args) -> int:
    from edgepack.format.verify import HashProgress
    from edgepack.runtime import load

    apply_threads(args.threads)
    say = None if getattr(args, "quiet", False) else (lambda m: print(f"[edgepack] {printable(m)}", file=sys.stderr))
    t0 = time.perf_counter()
    with HashProgress() as hashing:  # the first load hashes every file: a line on a terminal
        lm = load(args.bundle, verify=False if args.no_verify else "once", device=args.device, force=args.force,
                  backend=args.backend, key=args.key, progress=say,
                  hash_progress=hashing)
    load_seconds = time.perf_counter() - t0
    chat = Chat(lm, system=args.system, max_new_tokens=args.max_new_tokens, context=args.context,
                temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    interactive = sys.stdin.isatty()
    tty_out = sys.stdout.isatty()
    shown = (lambda text: printable(text, newlines=True)) if tty_out else (lambda text: text)
    if interactive and say:
        for notice in lm.notices:
            say(f"note: {notice}")
        say(f"loaded {lm.name} in {load_seconds:.2f} s ({lm.backend} backend, context {chat.context} tokens); "
            "/reset forgets the conversation, /exit or Ctrl-D leaves")
    turns = 0
    for line in _lines(interactive):
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            break
        if text == "/reset":
            chat.reset()
            if interactive:
                print("(conversation cleared)", file=sys.stderr)
            continue
        try:
            pieces = chat.say(line)
            if chat.last.dropped_turns and not getattr(args, "quiet", False):
                print(f"note: the context ({chat.context} tokens) is full: dropped the oldest "
                      f"{chat.last.dropped_turns} turn(s), running the rest again", file=sys.stderr)
            try:
                for piece in pieces:
                    if not args.json:
                        sys.stdout.write(shown(piece))
                        sys.stdout.flush()
            except KeyboardInterrupt:  # stops this reply; the next prompt follows
                pieces.close()
                chat.last.finish_reason = "interrupted"
        except GenerationError as exc:  # a message too long for the context: say so, go on
            print(f"error: {printable(exc.message)}", file=sys.stderr)
            if exc.hint:
                print(f"hint: {printable(exc.hint)}", file=sys.stderr)
            if not interactive:
                return exc.exit_code
            continue
        turns += 1
        if args.json:
            print(json.dumps(_turn_json(chat.last, turns)), flush=True)
        else:
            sys.stdout.write("\n")
            sys.stdout.flush()
        if args.stats:
            print(_stats_line(chat.last), file=sys.stderr)
    return 0


def _turn_json(turn: Turn, number: int) -> dict:
    """What --json prints for one reply."""
    decode = (turn.generated_tokens - 1) / turn.decode_seconds if turn.decode_seconds > 0 else None
    return {"turn": number, "reply": turn.text, "finish_reason": turn.finish_reason,
            "prompt_tokens": turn.prompt_tokens, "reused_tokens": turn.reused_tokens,
            "generated_tokens": turn.generated_tokens, "first_token_s": round(turn.first_token_seconds, 4),
            "decode_tokens_per_s": round(decode, 2) if decode else None, "dropped_turns": turn.dropped_turns}


def _stats_line(turn: Turn) -> str:
    tps = (turn.generated_tokens - 1) / turn.decode_seconds if turn.decode_seconds > 0 else 0.0
    new = turn.prompt_tokens - turn.reused_tokens
    return (f"first token {turn.first_token_seconds:.2f} s ({new} new prompt tokens, {turn.reused_tokens} reused); "
            f"{turn.generated_tokens} tokens, {tps:.1f} tokens/s ({turn.finish_reason})")
