"""Asking the Hugging Face hub only when it answers.

huggingface_hub retries a download that cannot connect five times with backoff (1+2+4+8+8 s,
one warning each) before it gives up, so an offline `datasets.load_dataset` takes ~25 s to
fail. One short probe first turns an unreachable hub into a one-line error in about a second,
and a real download (the probe answered) goes on exactly as before, retries included.
"""

from __future__ import annotations

# Long enough for a slow connection to open a socket, short enough to fail at once offline.
PROBE_TIMEOUT_S = 3.0


def unreachable_reason() -> str | None:
    """Why huggingface_hub cannot fetch anything right now, or None when the hub answers.

    Only a failure to connect counts: any HTTP answer, even an error status, means downloads
    can work, and huggingface_hub handles those as usual."""
    import httpx2  # huggingface_hub's HTTP client, so the probe uses its proxies and endpoint
    from huggingface_hub import constants, is_offline_mode
    from huggingface_hub.utils import get_session

    if is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)
    except (httpx2.ConnectError, httpx2.ConnectTimeout, httpx2.ProxyError) as exc:
        detail = str(exc) or type(exc).__name__
        return f"cannot reach the Hugging Face hub at {constants.ENDPOINT} ({detail})"
    except httpx2.TransportError:
        pass  # it connected: a slow or broken answer is huggingface_hub's to retry
    return None


def cached_model_path(repo: str) -> str | None:
    """The local snapshot of hub model `repo` that mlx-lm downloaded before, or None."""
    from huggingface_hub.errors import LocalEntryNotFoundError
    from mlx_lm.utils import hf_repo_to_path  # cache only, the files mlx_lm.load downloads

    try:
        return str(hf_repo_to_path(repo))
    except LocalEntryNotFoundError:
        return None
