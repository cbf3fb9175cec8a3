"""`edgepack chat`: every reply equals what generate() gives for the conversation rendered
whole (greedy), while each turn runs only the tokens the cache does not hold yet; driven
in-process, through a pipe and through a pseudo-terminal."""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

import edgepack
from edgepack.cli.chat import Chat
from edgepack.errors import GenerationError, printable

TURNS = ["The capital of France", "Water boils", "Small boxes", "Quantization stores", "the quick brown fox",
         "Rome", "a Raspberry Pi", "the lazy dog", "a laptop", "eight or four bits"]
REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), TERM="dumb", EDGEPACK_DEBUG="1")


def _chat_argv(bundle, *extra: str) -> list[str]:
    return [sys.executable, "-m", "edgepack.cli", "chat", str(bundle), "--temperature", "0",
            "--max-new-tokens", "10", "--no-verify", *extra]


def _expected(lm, turns: list[str], system: str | None = None) -> list[str]:
    """Each reply as generate() gives it for the whole conversation so far (no turn dropped)."""
    messages = [{"role": "system", "content": system}] if system else []
    replies = []
    for text in turns:
        messages.append({"role": "user", "content": text})
        reply = lm.generate(messages, max_new_tokens=10, temperature=0)
        messages.append({"role": "assistant", "content": reply})
        replies.append(reply)
    return replies


@pytest.mark.parametrize("kind,backend", [("llama", None), ("llama", "torch"), ("gpt2", None)])
def test_replies_equal_generate_on_the_whole_conversation(packed, kind, backend):
    """Ten turns in a 128-token context: older turns get dropped, and every reply still
    equals generate() on the conversation the chat kept."""
    lm = edgepack.load(packed(kind, 8), backend=backend)
    chat = Chat(lm, system="be brief", max_new_tokens=10, temperature=0)
    reused, dropped = [], 0
    for text in TURNS:
        reply = "".join(chat.say(text))
        assert reply == lm.generate(chat.messages[:-1], max_new_tokens=10, temperature=0)
        assert chat.messages[-1] == {"role": "assistant", "content": reply}
        assert chat.messages[0] == {"role": "system", "content": "be brief"}
        assert len(lm.encode_prompt(chat.messages[:-1], chat=True)) == chat.last.prompt_tokens <= 128
        reused.append(chat.last.reused_tokens)
        dropped += chat.last.dropped_turns
    assert dropped > 0  # the context filled
    # turns after the first reuse the cached history: only the new message runs
    assert reused[0] == 0 and sum(r > 10 for r in reused[1:]) >= 3


def test_reset_keeps_the_system_prompt_and_forgets_the_rest(packed):
    lm = edgepack.load(packed("llama", 8))
    chat = Chat(lm, system="be brief", max_new_tokens=10, temperature=0)
    "".join(chat.say(TURNS[0]))
    chat.reset()
    reply = "".join(chat.say(TURNS[1]))
    assert chat.messages[:2] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": TURNS[1]}]
    assert reply == _expected(lm, [TURNS[1]], system="be brief")[0]
    assert 0 < chat.last.reused_tokens < chat.last.prompt_tokens  # the system prompt stayed in the cache


def test_a_message_longer_than_the_context_is_refused_and_forgotten(packed):
    lm = edgepack.load(packed("llama", 8))
    chat = Chat(lm, max_new_tokens=10, temperature=0)
    with pytest.raises(GenerationError, match="context holds 128"):
        chat.say("the quick brown fox " * 40)
    assert chat.messages == []
    assert "".join(chat.say(TURNS[0])) == _expected(lm, [TURNS[0]])[0]


def test_bad_context_is_refused(packed):
    lm = edgepack.load(packed("llama", 8))
    with pytest.raises(GenerationError, match="--context must be between 2"):
        Chat(lm, context=129)


def test_pipe_one_turn_per_line_with_stats(packed):
    bundle = packed("llama", 8)
    lm = edgepack.load(bundle)
    turns = TURNS[:4]
    stdin = "\n".join(turns[:2] + [""] + turns[2:]) + "\n"  # a blank line is no turn
    proc = subprocess.run(_chat_argv(bundle, "--stats", "--system", "be brief"), input=stdin,
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "".join(r + "\n" for r in _expected(lm, turns, system="be brief"))
    firsts = re.findall(r"^first token (\d+\.\d\d) s \((\d+) new prompt tokens, (\d+) reused\)", proc.stderr, re.M)
    assert len(firsts) == 4
    assert int(firsts[0][2]) == 0 and all(int(reused) > 0 for _, _, reused in firsts[1:])
    assert ">>>" not in proc.stdout + proc.stderr  # no prompt when stdin is not a terminal


def test_pipe_says_when_the_context_is_full(packed):
    bundle = packed("llama", 8)
    proc = subprocess.run(_chat_argv(bundle, "--context", "48"), input="\n".join(TURNS[:4]) + "\n",
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stderr.splitlines() if "is full" in line]
    assert notes and all(re.fullmatch(r"note: the context \(48 tokens\) is full: dropped the oldest \d+ turn\(s\), "
                                      r"running the rest again", n) for n in notes)
    assert len(proc.stdout.split("\n")) >= 5  # every turn answered


def test_pipe_exit_stops_reading(packed):
    bundle = packed("llama", 8)
    lm = edgepack.load(bundle)
    proc = subprocess.run(_chat_argv(bundle), input=f"{TURNS[0]}\n/exit\n{TURNS[1]}\n",
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == _expected(lm, TURNS[:1])[0] + "\n"


class _Terminal:
    """The chat command with a pseudo-terminal as stdin and stdout (stderr apart)."""

    def __init__(self, argv: list[str]):
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=subprocess.PIPE, env=_env())
        os.close(slave)
        self.buffer = b""

    def read_until(self, marker: bytes, timeout_s: float = 300) -> bytes:
        deadline = time.monotonic() + timeout_s
        while marker not in self.buffer:
            assert self.proc.poll() is None or select.select([self.master], [], [], 0)[0], self.buffer
            assert time.monotonic() < deadline, self.buffer
            if select.select([self.master], [], [], 0.5)[0]:
                try:
                    self.buffer += os.read(self.master, 4096)
                except OSError:  # the child closed the terminal
                    break
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    def send(self, line: str) -> str:
        """Type a line; the text shown up to the next prompt, without the echo of the line."""
        os.write(self.master, line.encode() + b"\n")
        shown = self.read_until(b">>> ").decode("utf-8", "replace").replace("\r\n", "\n")
        assert shown.startswith(line + "\n"), shown
        return shown[len(line) + 1 :]

    def close(self) -> tuple[int, str]:
        os.write(self.master, b"/exit\n")
        code = self.proc.wait(timeout=60)
        stderr = self.proc.stderr.read().decode()
        os.close(self.master)
        return code, stderr


def test_terminal_session_streams_each_reply_and_resets(packed):
    bundle = packed("llama", 8)
    lm = edgepack.load(bundle)
    term = _Terminal(_chat_argv(bundle, "--stats", "--system", "be brief"))
    try:
        term.read_until(b">>> ")
        expected = _expected(lm, TURNS[:3], system="be brief")
        for text, reply in zip(TURNS[:3], expected):
            # on a terminal, control characters a tokenizer can emit are shown escaped
            assert term.send(text) == printable(reply, newlines=True) + "\n"
        assert term.send("/reset") == ""
        after_reset = _expected(lm, [TURNS[3]], system="be brief")[0]
        assert term.send(TURNS[3]) == printable(after_reset, newlines=True) + "\n"
    finally:
        code, stderr = term.close()
    assert code == 0, stderr
    assert len(re.findall(r"^first token \d+\.\d\d s ", stderr, re.M)) == 4
    assert "(conversation cleared)" in stderr
    assert re.search(r"^\[edgepack\] loaded llama-8\S* in \d+\.\d\d s \(native backend, context 128 tokens\)", stderr, re.M)


def test_pipe_json_one_object_per_turn(packed):
    bundle = packed("llama", 8)
    lm = edgepack.load(bundle)
    turns = TURNS[:3]
    proc = subprocess.run(_chat_argv(bundle, "--json"), input="\n".join(turns[:1] + ["/reset"] + turns[1:]) + "\n",
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    objects = [json.loads(line) for line in proc.stdout.splitlines()]
    expected = _expected(lm, turns[:1]) + _expected(lm, turns[1:])  # /reset: a new conversation
    assert [o["reply"] for o in objects] == expected and [o["turn"] for o in objects] == [1, 2, 3]
    for o in objects:
        assert o["finish_reason"] in ("stop", "length") and o["generated_tokens"] >= 1 and o["first_token_s"] > 0
    assert objects[1]["reused_tokens"] <= objects[2]["reused_tokens"] and objects[2]["reused_tokens"] > 0
