"""``edgepack run``: load a bundle and stream a completion to stdout."""

from __future__ import annotations

import os
import sys


def configure_parser(p) -> None:
    p.add_argument("bundle", help="bundle directory, or a Hub repo: owner/name[@revision] or hf://owner/name")
    p.add_argument("prompt", nargs="?", default=None, help="prompt text (default: read stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the bundle's chat template")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--min-new-tokens", type=int, default=0, help="ignore end-of-sequence before this many tokens")
    p.add_argument("--temperature", type=float, default=None, help="0 is greedy (default: the bundle's generation_config)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: the bundle's device_map)")
    p.add_argument(
        "--backend",
        choices=["native", "torch"],
        default=None,
        help="native: edgepack's CPU engine (no torch); torch: torch modules (default: native where it can run the bundle)",
    )
    p.add_argument("--no-verify", action="store_true", help="check file sizes only, skip hashing")
    p.add_argument("--force", action="store_true", help="load even if this box looks too small")
    p.add_argument("--stats", action="store_true", help="print token counts and speed to stderr")


def main(args) -> int:
    from edgepack.errors import GenerationError, printable
    from edgepack.runtime import load

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise GenerationError("the prompt is empty", hint="pass a PROMPT argument or pipe text to stdin")
    bundle = args.bundle
    if not os.path.isdir(bundle) and ("/" in bundle and not bundle.startswith((".", "/", "~")) or bundle.startswith("hf://")):
        from edgepack.hub import resolve_bundle_ref  # pull the variant that fits, verified

        bundle = resolve_bundle_ref(bundle, progress=lambda msg: print(f"[edgepack] {printable(msg)}", file=sys.stderr))
    lm = load(bundle, verify=False if args.no_verify else "once", device=args.device, force=args.force, backend=args.backend)
    for notice in lm.notices:
        print(f"note: {printable(notice)}", file=sys.stderr)
    # On a terminal the bundle's tokenizer must not be able to send escape sequences (a
    # vocabulary entry can be any bytes); into a pipe or file the text goes as generated.
    shown = (lambda text: printable(text, newlines=True)) if sys.stdout.isatty() else (lambda text: text)
    step = None
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
        sys.stdout.write(shown(step.text))
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats and step is not None:
        decode_tps = (step.generated_tokens - 1) / step.decode_seconds if step.decode_seconds > 0 else 0.0
        print(
            f"prompt: {step.prompt_tokens} tokens in {step.prompt_seconds:.3f}s; "
            f"generated: {step.generated_tokens} tokens, {decode_tps:.1f} tokens/s ({step.finish_reason}; "
            f"{lm.backend} backend{_kernels(lm)})",
            file=sys.stderr,
        )
    return 0


def _kernels(lm) -> str:
    """', NAME kernels' when the C engine runs: the instruction set its kernels use (avx512,
    avx2, neon-dotprod, neon, generic)"""
    if lm.backend != "native":
        return ""
    from edgepack.runtime.engine import _engine as _native

    return f", {_native.set_isa()} kernels"
