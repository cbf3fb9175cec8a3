"""``edgepack run``: load a bundle and stream a completion to stdout."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def configure_parser(p) -> None:
    p.add_argument("bundle", help="bundle directory, or a Hub repo: owner/name[@revision] or hf://owner/name")
    p.add_argument("prompt", nargs="?", default=None, help="prompt text (default: read stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the bundle's chat template")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate")
    p.add_argument("--min-new-tokens", type=int, default=0, help="ignore end-of-sequence before this many tokens")
    add_sampling_arguments(p)
    add_load_arguments(p)
    p.add_argument("--stats", action="store_true",
                   help="print load time, prompt and decode speed and peak memory to stderr")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (the text, token counts, speeds, peak memory) instead of streaming")


def add_sampling_arguments(p) -> None:
    p.add_argument("--temperature", type=float, default=None, help="0 is greedy (default: the bundle's generation_config)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample from the smallest set of tokens whose probability reaches this (default: the bundle's)")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample from the k likeliest tokens, 0 for all (default: the bundle's)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: a new one each run)")


def add_load_arguments(p) -> None:
    """How a command that runs a bundle (run, chat, serve) loads it."""
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: the bundle's device_map)")
    p.add_argument(
        "--backend",
        choices=["native", "torch"],
        default=None,
        help="native: edgepack's CPU engine (no torch); torch: torch modules (default: native where it can run the bundle)",
    )
    p.add_argument("--no-verify", action="store_true", help="check file sizes only, skip hashing")
    p.add_argument("--force", action="store_true", help="load even if this box looks too small")
    p.add_argument("--key", default=None, metavar="PUBKEY",
                   help="refuse the bundle unless this Ed25519 public key signed it (default: $EDGEPACK_TRUSTED_KEY)")
    add_threads_argument(p)


def add_threads_argument(p) -> None:
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for edgepack's engine (default: EDGEPACK_THREADS, else adapted per step to the idle cores)")
    p.add_argument("--activations", choices=["int8", "float"], default=None, action=_Activations,
                   help="inputs of the engine's int8 products in decode steps: int8 per block of 32, as llama.cpp's Q8_0 "
                        "(x86; ~1.4x faster), or float32 (logits within 1e-4 of float64's) (default: EDGEPACK_ACTIVATION_BITS, else int8)")


class _Activations(argparse.Action):
    """--activations sets EDGEPACK_ACTIVATION_BITS as it is parsed: the engine reads it when a
    bundle loads, and run, chat and serve all parse before they load."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        from edgepack.runtime.engine.threads import ACTIVATIONS, ACTIVATIONS_ENV

        os.environ[ACTIVATIONS_ENV] = str(ACTIVATIONS[value])
        setattr(namespace, self.dest, value)


def apply_threads(n: int | None) -> None:
    from edgepack.errors import GenerationError

    if n is not None and n < 1:
        raise GenerationError(f"--threads must be at least 1, not {n}", hint="pass --threads 1 or more")
    if n is not None:  # read by the engine when the bundle loads (engine.asked_threads)
        os.environ["EDGEPACK_THREADS"] = str(n)


def main(args) -> int:
    from edgepack.errors import GenerationError, UsageError, printable
    from edgepack.format.verify import HashProgress
    from edgepack.runtime import load

    if args.stats and getattr(args, "quiet", False):
        raise UsageError("--stats prints to stderr, which -q silences", hint="drop -q, or use --json for the figures")
    apply_threads(args.threads)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise GenerationError("the prompt is empty", hint="pass a PROMPT argument or pipe text to stdin")
    quiet = getattr(args, "quiet", False)
    say = None if quiet else (lambda msg: print(f"[edgepack] {printable(msg)}", file=sys.stderr))
    t0 = time.perf_counter()
    with HashProgress() as hashing:  # the first load hashes every file: a line on a terminal
        lm = load(args.bundle, verify=False if args.no_verify else "once", device=args.device, force=args.force,
                  backend=args.backend, key=args.key, progress=say,
                  hash_progress=hashing)
    load_seconds = time.perf_counter() - t0
    for notice in [] if quiet else lm.notices:
        print(f"note: {printable(notice)}", file=sys.stderr)
    # On a terminal the bundle's tokenizer must not be able to send escape sequences (a
    # vocabulary entry can be any bytes); into a pipe or file the text goes as generated.
    shown = (lambda text: printable(text, newlines=True)) if sys.stdout.isatty() else (lambda text: text)
    step, pieces = None, []
    for step in lm.stream_steps(
        prompt,
        chat=args.chat,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    ):
        if args.json:
            pieces.append(step.text)
        else:
            sys.stdout.write(shown(step.text))
            sys.stdout.flush()
    if args.json:
        print(json.dumps({"text": "".join(pieces), **stats(lm, step, load_seconds)}))
        return 0
    sys.stdout.write("\n")
    if args.stats and lm.why_not_native is not None:
        print(f"backend: torch, not edgepack's CPU engine: {lm.why_not_native}", file=sys.stderr)
    if args.stats:
        report = stats(lm, step, load_seconds)
        print(
            f"load {report['load_seconds']:.2f} s; prompt: {report['prompt_tokens']} tokens in "
            f"{report['prompt_seconds']:.3f} s ({report['prompt_tokens_per_second']:.1f} tokens/s); generated: "
            f"{report['generated_tokens']} tokens, {report['decode_tokens_per_second']:.1f} tokens/s "
            f"({report['finish_reason']}); peak RSS {report['peak_rss_bytes'] / 2**20:.0f} MiB "
            f"({engine_words(lm)})",
            file=sys.stderr,
        )
    return 0


def stats(lm, step, load_seconds: float) -> dict:
    """What a run cost: load time, prompt and decode tokens/s (decode counts the tokens after
    the first, whose time is the prompt's), this process's peak RSS."""
    prompt_tps = step.prompt_tokens / step.prompt_seconds if step.prompt_seconds > 0 else 0.0
    decode_tps = (step.generated_tokens - 1) / step.decode_seconds if step.decode_seconds > 0 else 0.0
    return {
        "backend": lm.backend,
        "load_seconds": round(load_seconds, 4),
        "prompt_tokens": step.prompt_tokens,
        "prompt_seconds": round(step.prompt_seconds, 4),
        "prompt_tokens_per_second": round(prompt_tps, 2),
        "generated_tokens": step.generated_tokens,
        "decode_seconds": round(step.decode_seconds, 4),
        "decode_tokens_per_second": round(decode_tps, 2),
        "finish_reason": step.finish_reason,
        "peak_rss_bytes": peak_rss_bytes(),
    }


def peak_rss_bytes() -> int:
    """The most resident memory this process has held: /proc's VmHWM on Linux (getrusage's
    maxrss there keeps the peak of the process that exec'd us, e.g. a 400 MB test runner),
    getrusage elsewhere (bytes on macOS)."""
    import resource

    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def engine_words(lm) -> str:
    """'native backend, engine avx2, 2 threads, int8 activations' where edgepack's engine runs (its kernel
    set: avx512, avx2, neon-dotprod, neon, generic; the threads it steps on now; what its int8 products
    take in decode steps), else 'torch backend'."""
    if lm.backend != "native":
        return f"{lm.backend} backend"
    from edgepack.runtime.engine import _engine

    n = lm.model.threads_in_use()
    return f"native backend, engine {_engine.set_isa()}, {n} thread{'s' if n != 1 else ''}, {lm.model.activations()} activations"
