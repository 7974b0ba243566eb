"""Is the Hugging Face hub reachable? One quick answer, so an offline machine fails at once."""
from __future__ import annotations

import os
import socket
from functools import lru_cache


def _offline_flag() -> bool:
    return any(os.environ.get(v, "0") not in ("0", "", "false", "False")
               for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


@lru_cache(maxsize=1)
def _probe_hub(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def hub_reachable() -> bool:
    """False when offline is requested (HF_*_OFFLINE) or one quick TCP probe fails, so an
    offline machine fails at once instead of after the hub client's retries."""
    return not _offline_flag() and _probe_hub()


hub_reachable.cache_clear = _probe_hub.cache_clear  # type: ignore[attr-defined]
