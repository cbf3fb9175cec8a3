"""huggingface_hub's exceptions turned into ours: one HubError with a hint naming the next step.

Nothing here imports huggingface_hub at module level; each function imports what it tests for.
"""

from __future__ import annotations

import sys

from edgepack.errors import EdgepackError, HubError

TOKEN_HINT = "set HF_TOKEN or pass --token (a token from https://huggingface.co/settings/tokens)"


def _have_token(token: str | bool | None) -> bool:
    if token is False:
        return False
    if token:
        return True
    from huggingface_hub import get_token

    return get_token() is not None


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


# Network failures of the HTTP library under huggingface_hub: httpx2 (2.x), httpx (1.x), requests (0.x).
_TRANSPORT_ERRORS = (("httpx2", "TransportError"), ("httpx", "TransportError"),
                     ("requests.exceptions", "ConnectionError"), ("requests.exceptions", "Timeout"),
                     ("requests.exceptions", "ChunkedEncodingError"))


def _transport_errors() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module_name, name in _TRANSPORT_ERRORS:
        module = sys.modules.get(module_name)  # only what is already loaded can have failed
        if module is not None and isinstance(getattr(module, name, None), type):
            found.append(getattr(module, name))
    return tuple(found)


def is_transient(exc: BaseException) -> bool:
    """A failure that another attempt may not hit again: a 5xx, a 429, a dropped connection."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return False
    if isinstance(exc, LocalEntryNotFoundError):  # the listing failed and the cache lacks the files
        return exc.__cause__ is not None and is_transient(exc.__cause__)
    if isinstance(exc, HfHubHTTPError):
        status = _status(exc)
        return status is None or status >= 500 or status == 429
    return isinstance(exc, _transport_errors())


def hub_error(exc: BaseException, repo_id: str, revision: str | None, token, *,
               writing: bool = False) -> EdgepackError:
    """Turn a huggingface_hub exception into one of ours, with a hint that names the next step."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        LocalTokenNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    status = _status(exc)
    if isinstance(exc, HFValidationError):
        return HubError(f"{repo_id!r} is not a valid Hub repo id: {exc}".splitlines()[0],
                        hint="repo ids look like owner/name: letters, digits, '-', '_', '.'")
    if isinstance(exc, GatedRepoError):
        return HubError(
            f"{repo_id} is gated: its terms must be accepted on the Hub before it can be downloaded",
            hint=f"accept them on the repo's page, then {TOKEN_HINT} of the account that accepted",
        )
    if isinstance(exc, RevisionNotFoundError):
        return HubError(
            f"revision {revision!r} not found in {repo_id}",
            hint="check the branch, tag or commit; omit @REVISION for main",
        )
    if isinstance(exc, RepositoryNotFoundError):
        if not _have_token(token):
            return HubError(f"repository {repo_id} not found or private",
                            hint=f"check the spelling; for a private repo, {TOKEN_HINT}")
        return HubError(
            f"repository {repo_id} not found (or your token cannot see it)",
            hint="check the spelling, and that the token belongs to an account with access",
        )
    if isinstance(exc, LocalTokenNotFoundError) or (writing and status == 401 and not _have_token(token)):
        return HubError(f"pushing to {repo_id} needs a Hugging Face token with write access", hint=TOKEN_HINT)
    if isinstance(exc, HfHubHTTPError) and status == 401:
        return HubError(
            "the Hub refused the token (401: invalid or expired)",
            hint="check HF_TOKEN or --token, or create a new token at https://huggingface.co/settings/tokens",
        )
    if isinstance(exc, HfHubHTTPError) and status == 403:
        return HubError(f"your token may not {'write to' if writing else 'read'} {repo_id} (403)",
                        hint="use a token with write access to that namespace")
    if isinstance(exc, HfHubHTTPError) and status == 412:
        return HubError(f"{repo_id} changed while pushing (someone else committed first)",
                        hint="push again: the index and card are rebuilt from the new state")
    if isinstance(exc, (OfflineModeIsEnabled, LocalEntryNotFoundError)) and constants.HF_HUB_OFFLINE:
        return HubError(f"{repo_id} is not in the local cache and HF_HUB_OFFLINE is set",
                        hint="unset HF_HUB_OFFLINE (or set it to 0) to download it")
    if is_transient(exc) or isinstance(exc, LocalEntryNotFoundError):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return HubError(
            f"network failure talking to the Hub about {repo_id} ({type(exc).__name__}: {first})",
            hint="check the connection and run the same command again: downloads resume where they "
            "stopped, and nothing is loaded before every file is verified",
        )
    if isinstance(exc, HfHubHTTPError):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return HubError(f"the Hub answered {status} for {repo_id}: {first}", hint="try again later")
    return HubError(f"Hub request for {repo_id} failed: {type(exc).__name__}: {exc}".splitlines()[0],
                    hint="run with --debug for the traceback")


def hub_exceptions() -> tuple[type[BaseException], ...]:
    """What huggingface_hub raises for a failed request (our own file errors stay as they are)."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        LocalTokenNotFoundError,
        OfflineModeIsEnabled,
    )

    return (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, LocalTokenNotFoundError,
            OfflineModeIsEnabled, *_transport_errors())
