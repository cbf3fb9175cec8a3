"""The minimal runtime: load a bundle, verify it, generate.

    import edgepack
    lm = edgepack.load("smollm2-8bit")
    print(lm.generate([{"role": "user", "content": "What is the capital of France?"}]))
    for piece in lm.stream("Once upon a time", max_new_tokens=32):
        print(piece, end="", flush=True)

Two backends run a bundle. On a CPU, Llama-family bundles at int8, int4 or 16 bits run in
edgepack's own engine (runtime/engine: the C module edgepack.runtime.engine._engine, no torch import: a cold
start and a memory footprint torch's ~1 s and ~220 MiB import would dwarf). The rest (other
architectures, nf4/fp4, GPUs, a box where the C module is not built) is built as torch
modules (runtime/torch/model.py). This module imports neither torch nor anything from the exporter,
planner or Hub code; the torch backend is imported only when a bundle needs it.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from edgepack.format import bundle as bundle_format
from edgepack.runtime.constants import NATIVE_OVERHEAD_BYTES, TORCH_OVERHEAD_BYTES
from edgepack.errors import (
    BundleIntegrityError,
    DeviceError,
    EdgepackError,
    GenerationError,
    InsufficientMemoryError,
)

BACKENDS = ("native", "torch")


# --- loading -------------------------------------------------------------------------------


def load(
    bundle_dir: str | os.PathLike,
    *,
    verify: bool | str = "once",
    device: str | None = None,
    force: bool = False,
    backend: str | None = None,
    key: str | os.PathLike | None = None,
    token: str | None = None,
    progress=None,
    hash_progress=None,
) -> "EdgeModel":
    """Load a bundle written by ``edgepack pack``: a local folder, or a Hub repo as the CLI
    takes it (``owner/name``, ``owner/name@rev``, ``hf://owner/name[@rev]``; pulled, the
    variant that fits this box chosen, into edgepack's cache).

    verify: ``"once"`` (default) hashes every file on the first load and then trusts files
    whose size/mtime/inode are unchanged; ``True`` always hashes; ``False`` checks sizes
    only (the environment variable ``EDGEPACK_SKIP_HASH=1`` does the same).
    device: ``None`` follows the bundle's device_map; ``"cpu"`` forces everything onto the
    CPU. force: load even when this box looks too small. backend: ``None`` (edgepack's
    CPU engine where it can run the bundle, else torch), ``"native"`` (that engine, or an
    error saying why not) or ``"torch"``.
    key: an Ed25519 public key (PEM file; default: ``$EDGEPACK_TRUSTED_KEY``) that must have
    signed the bundle: an unsigned bundle, another signer or a changed file is refused
    before any weight is loaded. Without a key, an ``edgepack.sig`` that is not a
    well-formed signature is refused too (a damaged signature is never ignored).
    token: Hugging Face token for a repo reference; progress: ``callable(str)`` told what
    a pull does; hash_progress: ``callable(done_bytes, total_bytes)`` called as the files
    are hashed (the CLI's terminal line, format.verify.HashProgress).
    """
    path = _resolve_reference(bundle_dir, token, progress)
    if key is None:
        key = os.environ.get("EDGEPACK_TRUSTED_KEY") or None
    manifest_bytes = _check_signature(path, key)
    # No garbage collection while loading: it makes thousands of small objects (modules,
    # tensors) and each full collection walks everything imported so far (torch's ~150k
    # objects): ~50 ms of a 0.3 s load, for nothing to collect.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _load(path, verify, device, force, backend, manifest_bytes, hash_progress)
    finally:
        if enabled:
            gc.enable()


def _resolve_reference(ref, token: str | None, progress) -> Path:
    """A local path as is; a repo reference (format.refs decides, as the CLI does) pulled
    through the Hub code, imported only then: loading a folder imports nothing from edgepack.hub."""
    from edgepack.format.refs import RepoRef, bundle_ref

    found = bundle_ref(ref)
    if isinstance(found, RepoRef):
        from edgepack.hub import resolve_bundle_ref

        return resolve_bundle_ref(os.fspath(ref), token=token, progress=progress)
    return Path(found).expanduser()


def _check_signature(path: Path, key) -> bytes | None:
    """With a key: the manifest bytes whose signature by that key checked out (the whole
    bundle hashed against them). Without: None, after refusing a malformed edgepack.sig."""
    from edgepack.format import signing

    if key is not None:
        signing.verify_signature(path, key)  # signature first, then every file's sha256
        return bundle_format.read_manifest_bytes(path)
    if (path / bundle_format.SIGNATURE_NAME).exists() or (path / bundle_format.SIGNATURE_NAME).is_symlink():
        signing.read_signature(path)  # its shape only: no key to check it against
    return None


def _load(path: Path, verify, device, force, backend, manifest_bytes: bytes | None = None,
          hash_progress=None) -> "EdgeModel":
    if backend not in (None, *BACKENDS):
        raise GenerationError(f"unknown backend {backend!r}", hint=f"use one of {', '.join(BACKENDS)}")
    if os.environ.get("EDGEPACK_SKIP_HASH", "") not in ("", "0"):
        verify = False
    if manifest_bytes is not None:  # the signed manifest, every file already hashed against it
        manifest = bundle_format.verify_bundle(path, check_hashes=False, manifest_bytes=manifest_bytes)
    else:
        manifest = bundle_format.verify_bundle(path, check_hashes=verify, progress=hash_progress)
    device_map, notices = _resolve_device_map(manifest, device)
    config = _read_config(path)
    why_not_native = _why_not_native(manifest, config, device_map, backend)
    native = why_not_native is None
    if not native:
        _require_torch(why_not_native)
    if not force:
        _preflight_memory(manifest, device_map, path, NATIVE_OVERHEAD_BYTES if native else TORCH_OVERHEAD_BYTES)
    from edgepack.runtime.memory import release_freed_memory
    from edgepack.runtime.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(path)
    except EdgepackError:  # edgepack's tokenizer says which file and why
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:  # transformers' AutoTokenizer
        raise BundleIntegrityError(
            f"cannot load the bundle's tokenizer: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
            hint="the bundle's tokenizer files are damaged or were edited; pack the model again",
        ) from None
    # Tokenizer first: parsing tokenizer.json peaks ~25 MiB above what it keeps; released
    # now, that peak never stacks on top of the weights.
    release_freed_memory()
    if native:
        from edgepack.runtime.engine import NativeLM

        model = NativeLM.load(path, manifest, config)
    else:
        from edgepack.runtime.torch import model as torch_model

        model = torch_model.build_model(path, manifest, config, device_map)
    lm = EdgeModel(model, tokenizer, manifest, path, device_map, notices)
    lm.why_not_native = why_not_native
    return lm


def _why_not_native(manifest: dict, config: dict, device_map: dict[str, str], backend: str | None) -> str | None:
    """None when edgepack's C engine runs the bundle, else why torch runs it instead; backend
    "native" where the engine cannot is an error saying why."""
    if backend == "torch":
        return "backend 'torch' asked for"
    from edgepack.runtime import engine

    reason = engine.unavailable(config, manifest, device_map)
    if os.environ.get("EDGEPACK_LEAN", "1") == "0":
        reason = "EDGEPACK_LEAN=0 (transformers asked for)"
    if reason is not None and backend == "native":
        raise GenerationError(
            f"edgepack's CPU engine cannot run this bundle: {reason}",
            hint="load it with backend='torch' (CLI: --backend torch)",
        )
    return reason


def _require_torch(why_not_native: str) -> None:
    """On a minimal install (no torch extra), say why this bundle needs it, before loading."""
    from edgepack import extras

    because = why_not_native if why_not_native.startswith("backend") else (
        f"edgepack's CPU engine cannot run it: {why_not_native}")
    # torch alone: the lean Llama decoder needs nothing else; transformers, accelerate and
    # bitsandbytes are imported only for other architectures and GPUs (the CLI still names
    # the extra when one of them is missing: edgepack.extras.for_import_error).
    extras.require("torch", "this bundle", because, packages=("torch",))


def _resolve_device_map(manifest: dict, device: str | None) -> tuple[dict[str, str], list[str]]:
    device_map = {k: str(v) if not isinstance(v, int) else f"cuda:{v}" for k, v in manifest["device_map"].items()}
    if device is not None:
        _check_device(device, "--device")
        return {k: device for k in device_map}, []
    wants_cuda = any(v.startswith("cuda") for v in device_map.values())
    if wants_cuda and not _cuda_available():
        notice = "the bundle was planned for a GPU but this box has none; running everything on the CPU"
        return {k: "cpu" for k in device_map}, [notice]
    for placed in set(device_map.values()):
        _check_device(placed, "the bundle's device_map")
    return device_map, []


def _check_device(device: str, origin: str) -> None:
    """cpu, cuda or cuda:N with N a GPU torch sees; anything else would fail deep in torch."""
    kind, _, index = device.partition(":")
    if device == "cpu":
        return
    if kind != "cuda" or (index and not index.isdigit()):
        raise DeviceError(f"{origin} names device {device!r}, which edgepack cannot place weights on",
                          hint="use cpu, cuda or cuda:N (N counts from 0)")
    if not _cuda_available():
        raise DeviceError(f"{origin} asks for {device}, but torch here sees no CUDA GPU "
                          "(a CPU-only torch build, or no NVIDIA driver)",
                          hint="use --device cpu, or install a CUDA build of torch")
    import torch

    if index and int(index) >= torch.cuda.device_count():
        raise DeviceError(f"{origin} asks for {device}, but this box has {torch.cuda.device_count()} GPU(s)",
                          hint=f"use --device cuda:0 ... cuda:{torch.cuda.device_count() - 1}, or --device cpu")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _preflight_memory(
    manifest: dict, device_map: dict[str, str], path: Path | None = None, overhead: int = TORCH_OVERHEAD_BYTES
) -> None:
    """Refuse, with numbers, rather than be OOM-killed half-way through loading.

    need: the weights this box's RAM holds plus ``overhead`` (TORCH_OVERHEAD_BYTES: torch), the whole process
    (interpreter, torch, transformers, a short run's activations). Part of that is already
    held (this process's RSS), so what must still fit is need - RSS, into what this process
    may still allocate: free RAM, or its cgroup's headroom when that is smaller (a
    container's limit is invisible to psutil; see edgepack.runtime.memory).
    """
    from edgepack.runtime import memory

    mem, mib = manifest["memory"], 1024 * 1024
    on_cpu = all(v == "cpu" for v in device_map.values())
    weights = mem["weight_bytes"] if on_cpu else mem["weight_bytes_per_device"].get("cpu", 0)
    need = weights + overhead
    held = memory.process_rss_bytes()
    budget = memory.budget()
    if need - held > budget.available_bytes and path is not None:
        # A cgroup is charged for the page cache that verifying the bundle left; drop it, look again.
        memory.evict_page_cache(path / e["path"] for e in manifest["files"])
        budget = memory.budget()
    if need - held > budget.available_bytes:
        where = "of free RAM" if budget.source == "RAM" else (
            f"under its memory cgroup limit of {budget.cgroup.limit_bytes // mib} MiB")
        raise InsufficientMemoryError(
            f"the bundle needs about {need // mib} MiB ({weights // mib} MiB of weights + "
            f"{overhead // mib} MiB for the runtime); this process holds {held // mib} MiB "
            f"and can get only {budget.available_bytes // mib} MiB more {where}",
            hint="free memory or raise the memory limit, pack the model at fewer bits (--bits 4), "
            "or pass --force to try anyway",
        )


def _read_config(path: Path) -> dict:
    import json

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise BundleIntegrityError(
            f"cannot read the bundle's config.json ({type(exc).__name__})",
            hint="the bundle's config.json is damaged; pack the model again",
        ) from None
    if not isinstance(config, dict):
        raise BundleIntegrityError("config.json is not a JSON object", hint="pack the model again")
    return config


# --- generation ----------------------------------------------------------------------------


@dataclass
class GenerationStep:
    """One generated token: its text piece (may be "" while a character is incomplete)."""

    text: str
    token: int
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str | None  # None while generating, then "stop" or "length"
    prompt_seconds: float
    decode_seconds: float


@dataclass
class GenerationPlan:
    prompt_ids: list[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    min_new_tokens: int
    max_new_tokens: int
    stops: list[str]


class StepWriter:
    """Generated tokens -> GenerationSteps: text pieces (held back while they may begin a
    stop string), end of sequence, stop strings and the length limit."""

    def __init__(self, lm: "EdgeModel", plan: GenerationPlan):
        self.eos, self.plan = lm.eos_token_ids, plan
        self.detok = _IncrementalDetokenizer(lm.tokenizer)
        self.t0 = time.perf_counter()
        self.prompt_seconds = 0.0
        self.held = ""  # text that may be the start of a stop string: not emitted yet
        self.n = 0

    def add(self, token: int) -> GenerationStep:
        self.n += 1
        n, stops, detok = self.n, self.plan.stops, self.detok
        if n == 1:
            self.prompt_seconds = time.perf_counter() - self.t0
        if token in self.eos:
            piece, finish = "", "stop"
        else:
            piece, finish = detok.add(token), ("length" if n >= self.plan.max_new_tokens else None)
        if finish is not None:
            piece += detok.flush()  # bytes held back for an incomplete character
        if stops:
            self.held += piece
            hit = _first_stop(self.held, stops)
            if hit is not None:
                piece, self.held, finish = self.held[:hit], "", "stop"
            elif finish is not None:
                piece, self.held = self.held, ""
            else:
                keep = _partial_stop_length(self.held, stops)
                piece, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        elapsed = time.perf_counter() - self.t0 - self.prompt_seconds
        return GenerationStep(piece, token, len(self.plan.prompt_ids), n, finish, self.prompt_seconds, elapsed)


class EdgeModel:
    """A loaded bundle: ``.model`` (``engine.NativeLM``, or with the torch backend a torch
    module: ``model(input_ids).logits``), ``.backend`` (and ``.why_not_native``: why the torch
    one runs, or None), ``.tokenizer``, ``.generate()`` and ``.stream()``."""

    why_not_native: str | None = None

    def __init__(self, model, tokenizer, manifest, path, device_map, notices):
        self.model = model
        self.tokenizer = tokenizer
        self.manifest = manifest
        self.path = path
        self.device_map = device_map
        self.notices = notices
        self.backend = getattr(model, "backend", "torch")
        self.generation_config = _read_generation_config(path)
        eos = self.generation_config.get("eos_token_id")
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        self.max_positions = int(manifest["architecture"].get("max_position_embeddings") or 1 << 20)
        if self.backend == "native":  # its KV cache holds config.json's context (they agree unless crafted)
            self.max_positions = min(self.max_positions, model.max_positions)

    @property
    def name(self) -> str:
        return self.path.name

    # prompts ---------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | Sequence[dict], chat: bool | None = None) -> list[int]:
        """Token ids for a plain string, or for chat messages through the chat template."""
        if isinstance(prompt, str) and not chat:
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if not getattr(self.tokenizer, "chat_template", None):
            raise GenerationError(
                "this bundle's tokenizer has no chat template",
                hint="send a plain prompt without --chat",
            )
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except EdgepackError:
            raise
        except Exception as exc:  # noqa: BLE001 - transformers' tokenizers (no tokenizer.json) raise jinja's errors
            from edgepack.runtime.tokenizer import template_failed

            raise template_failed(exc) from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    # generation ------------------------------------------------------------------------

    def stream_steps(
        self,
        prompt: str | Sequence[dict],
        *,
        max_new_tokens: int = 256,
        min_new_tokens: int = 0,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: Sequence[str] | str | None = None,
        chat: bool | None = None,
    ) -> Iterator[GenerationStep]:
        """Generate token by token, yielding a GenerationStep per token."""
        plan = self.plan_generation(prompt, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                    temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop, chat=chat)
        writer = StepWriter(self, plan)
        tokens = self._tokens(plan.prompt_ids, plan.temperature, plan.top_p, plan.top_k, plan.seed,
                              plan.min_new_tokens, plan.max_new_tokens)
        for token in tokens:
            step = writer.add(token)
            yield step
            if step.finish_reason is not None:
                return

    def plan_generation(self, prompt: str | Sequence[dict], *, max_new_tokens: int = 256, min_new_tokens: int = 0,
                        temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                        seed: int | None = None, stop: Sequence[str] | str | None = None,
                        chat: bool | None = None) -> "GenerationPlan":
        """The prompt's token ids and the sampling settings, checked (stream_steps' first part;
        the server drives the tokens itself)."""
        temperature, top_p, top_k = self._sampling_defaults(temperature, top_p, top_k)
        _check_sampling(max_new_tokens, min_new_tokens, temperature, top_p, top_k)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        prompt_ids = self.encode_prompt(prompt, chat)
        if not prompt_ids:
            raise GenerationError("the prompt is empty", hint="give a non-empty prompt")
        if len(prompt_ids) >= self.max_positions:
            raise GenerationError(
                f"the prompt is {len(prompt_ids)} tokens; this model's context is {self.max_positions}",
                hint="shorten the prompt",
            )
        max_new_tokens = min(max_new_tokens, self.max_positions - len(prompt_ids))
        return GenerationPlan(prompt_ids, temperature, top_p, top_k, seed, min_new_tokens, max_new_tokens, stops)

    def stream(self, prompt: str | Sequence[dict], **sampling) -> Iterator[str]:
        """Yield one text piece per generated token."""
        for step in self.stream_steps(prompt, **sampling):
            yield step.text

    def generate(self, prompt: str | Sequence[dict], **sampling) -> str:
        return "".join(self.stream(prompt, **sampling))

    def _sampling_defaults(self, temperature, top_p, top_k):
        gen = self.generation_config
        sample = bool(gen.get("do_sample", False))
        if temperature is None:
            temperature = float(gen.get("temperature") or 1.0) if sample else 0.0
        if top_p is None:
            top_p = float(gen.get("top_p") or 1.0) if sample else 1.0
        if top_k is None:
            top_k = int(gen.get("top_k") or 0) if sample else 0
        return temperature, top_p, top_k

    def _tokens(self, prompt_ids, temperature, top_p, top_k, seed, min_new_tokens, max_new_tokens) -> Iterator[int]:
        args = (prompt_ids, self.eos_token_ids, temperature, top_p, top_k, seed, min_new_tokens, max_new_tokens)
        if self.backend == "native":
            return self.model.generate_tokens(*args)
        from edgepack.runtime.torch.model import generate_tokens

        return generate_tokens(self.model, *args)


def _read_generation_config(path: Path) -> dict:
    import json

    try:
        data = json.loads((path / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _check_sampling(max_new_tokens, min_new_tokens, temperature, top_p, top_k) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be a positive integer, not {max_new_tokens!r}",
                              hint="pass --max-new-tokens 1 or more")
    if not isinstance(min_new_tokens, int) or not 0 <= min_new_tokens <= max_new_tokens:
        raise GenerationError(f"min_new_tokens must be between 0 and max_new_tokens, not {min_new_tokens!r}",
                              hint=f"pass --min-new-tokens between 0 and {max_new_tokens}")
    if not temperature >= 0:  # also refuses NaN
        raise GenerationError(f"temperature must be >= 0 (0 is greedy), not {temperature}",
                              hint="pass --temperature 0 for greedy, or e.g. 0.7")
    if not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1], not {top_p}", hint="pass --top-p 1 to turn it off, or e.g. 0.9")
    if top_k < 0:
        raise GenerationError(f"top_k must be >= 0 (0 disables it), not {top_k}", hint="pass --top-k 0 to turn it off")


def _partial_stop_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that begins some stop string (held back)."""
    best = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), best, -1):
            if stop.startswith(text[-size:]):
                best = size
                break
    return best


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


class _IncrementalDetokenizer:
    """Decode token by token without splitting multi-byte characters or losing the spaces
    a tokenizer only renders in context: decode a short window that overlaps what was
    already emitted and return the difference (the approach of HF text-generation-inference)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, token: int) -> str:
        self.tokens.append(token)
        decode = self.tokenizer.decode
        prefix = decode(self.tokens[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        text = decode(self.tokens[self.prefix_offset :], skip_special_tokens=True)
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""  # nothing new yet, or an incomplete UTF-8 sequence: wait for more
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return text[len(prefix) :]

    def flush(self) -> str:
        """What is still held back at the end of generation, as the tokenizer renders it."""
        decode = self.tokenizer.decode
        prefix = decode(self.tokens[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        text = decode(self.tokens[self.prefix_offset :], skip_special_tokens=True)
        self.prefix_offset = self.read_offset = len(self.tokens)
        return text[len(prefix) :]
