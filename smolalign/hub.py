"""Reaching the Hugging Face Hub: probe once, and when it is unreachable use only the local cache.

Without the probe, every hub lookup on a machine without network retries for half a minute before failing.
"""

from __future__ import annotations

import functools
import socket
from urllib.parse import urlparse

import datasets.config
import huggingface_hub
import huggingface_hub.constants


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(huggingface_hub.constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_failure_reason(error: Exception) -> str:
    """Why something named by a Hub id could not be loaded, for the end of an error sentence."""
    if not hub_reachable():
        return "the Hugging Face Hub is unreachable and it is not in the local cache"
    return f"the Hugging Face Hub could not provide it ({type(error).__name__})"


def prefer_local_cache() -> bool:
    """Switch this process to offline mode when the Hub cannot be reached; returns True if offline."""
    if hub_reachable():
        return False
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
    return True


DATA_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow")
COMPRESSIONS = (".gz", ".bz2", ".xz")


def is_data_file_name(name: str) -> bool:
    """A name ending like a data file smolalign reads (`pairs.jsonl`, `hh.jsonl.gz`): a file, never a Hub id."""
    lowered = name.lower()
    for compression in COMPRESSIONS:
        lowered = lowered.removesuffix(compression)
    return lowered.endswith(DATA_FILE_SUFFIXES)


def looks_like_path(name: str) -> bool:
    """A name that can only be a local path (Hub ids are `owner/name`, with at most one slash)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/")
