"""Push an export directory to the Hugging Face Hub, with retries and without ever showing the token.

Authentication is huggingface_hub's own (``HF_TOKEN`` or ``hf auth login``); fv_accel never takes a token
argument, so it cannot end up in a command line, a log or a config file. Error messages are scrubbed of the
token anyway (a server may echo a header back). Transient failures (HTTP 429/5xx, dropped connections,
timeouts) are retried with exponential backoff; anything else fails at once. A failed push never touches the
local export, and the error says what failed and the command that retries it.

Large exports (at least ``LARGE_FOLDER_BYTES``) go through ``HfApi.upload_large_folder`` where the installed
huggingface_hub has it (0.25 to 1.x): resumable (re-running skips what was uploaded; its progress lives in
``<folder>/.cache/huggingface``), split over several commits, without a commit message. huggingface_hub 2.x has
no such method: its ``upload_folder`` itself streams, splits large folders into several commits and resumes when
re-run (with ``hf_xet``, a dependency of huggingface_hub), so it is used for every size there.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fv_accel.errors import FvAccelError

logger = logging.getLogger(__name__)

_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{8,}")
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
#: Folders at least this large are pushed with ``upload_large_folder`` where available (a 1.3B bf16 export is
#: 2.8 GB and fits one commit; a 14B one is 28 GB in six 5 GB shards).
LARGE_FOLDER_BYTES = 8 * 2**30


class HubPushError(FvAccelError):
    """A push that failed (exit 1); the local export is intact and the message says how to retry."""


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    revision: str
    commit_url: str
    attempts: int


def redact(text: str) -> str:
    """``text`` with the active Hub token (and anything shaped like one) replaced by ``***``."""
    from huggingface_hub import get_token

    token = get_token()
    if token:
        text = text.replace(token, "***")
    return _TOKEN_LIKE.sub("hf_***", text)


def _transport_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):  # huggingface_hub ≥ 1.x talks through httpx (or its fork httpx2)
        try:
            module = __import__(name)
        except ImportError:
            continue
        errors.append(module.TransportError)
    return tuple(errors)


def is_transient(exc: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):  # a ConnectionError subclass, but retrying cannot help
        return False
    if isinstance(exc, HfHubHTTPError):
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None)
        return status in TRANSIENT_STATUS or (status is not None and status >= 500)
    return isinstance(exc, _transport_errors())


def _describe(exc: BaseException) -> str:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set; unset it to push"
    first_line = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        hint = {401: " (not logged in? set HF_TOKEN or run `hf auth login`)",
                403: " (the token cannot write to this repo)"}.get(status or 0, "")
        return redact(f"HTTP {status}: {first_line}{hint}")
    return redact(f"{type(exc).__name__}: {first_line}")


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = "Upload model exported by fv_accel",
    max_attempts: int = 5,
    base_delay_s: float = 1.0,
    max_delay_s: float = 60.0,
    retry_command: str | None = None,
    large_folder_bytes: int = LARGE_FOLDER_BYTES,
    api: Any = None,
) -> PushResult:
    """Create ``repo_id`` (if needed; ``private`` applies to a new repo) and upload ``folder`` to ``revision``
    (default ``main``; another branch is created from main if missing): in one commit, or, from
    ``large_folder_bytes`` on, with ``upload_large_folder`` where huggingface_hub has it (see the module doc).
    ``api``: the ``HfApi`` to use (default: a new one, configured from the environment)."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    api = api if api is not None else HfApi()
    branch = revision or "main"
    attempts = 0
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts)
    large = size >= large_folder_bytes and hasattr(api, "upload_large_folder")

    def once() -> Any:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if branch != "main":
            api.create_branch(repo_id, branch=branch, repo_type="model", exist_ok=True)
        if large:  # resumable: a retry (here or by the user's command) skips what is already uploaded
            api.upload_large_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=branch,
                                    private=private)
            return f"{api.endpoint}/{repo_id}/tree/{branch}"
        return api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", revision=branch,
                                 commit_message=commit_message)

    while True:
        attempts += 1
        try:
            info = once()
            break
        except Exception as exc:
            reason = _describe(exc)
            if is_transient(exc) and attempts < max_attempts:
                delay = min(max_delay_s, base_delay_s * 2 ** (attempts - 1))
                logger.warning("push to %s failed (attempt %d/%d: %s); retrying in %.1fs", repo_id, attempts,
                               max_attempts, reason, delay)
                time.sleep(delay)
                continue
            retry = f" Retry with: {retry_command}" if retry_command else ""
            raise HubPushError(f"push of {folder} to {repo_id}@{branch} failed after {attempts} attempt"
                               f"{'s' if attempts != 1 else ''} ({reason}). The local export at {folder} is "
                               f"intact.{retry}") from None
    url = str(getattr(info, "commit_url", "") or info)
    logger.info("pushed %s (%.2f GB%s) to %s@%s (%s)", folder, size / 1e9, ", upload_large_folder" if large else "",
                repo_id, branch, url)
    return PushResult(repo_id=repo_id, revision=branch, commit_url=url, attempts=attempts)
