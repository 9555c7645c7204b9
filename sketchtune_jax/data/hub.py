"""The Hugging Face Hub as a source of data sets (``hf:NAME[:CONFIG]:SPLIT``) and model repositories.

Without a network the hub libraries retry each request for about a minute, warning at every
try; here the hub is probed once (a TCP connection, a few seconds at most) and, when it cannot be
reached, only the local cache is read: a source that is not there fails at once, in one line.
"""

from __future__ import annotations

import fnmatch
import os
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
# A repository's files worth downloading besides the weights (configs, tokenizers).
_MODEL_FILES = ["*.json", "tokenizer*", "*.model", "*.txt"]


def offline_requested() -> bool:
    """Whether the environment asks the hub libraries to stay offline (``HF_HUB_OFFLINE=1``)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in _OFFLINE_VARIABLES)


def hub_reachable(timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the hub (``HF_ENDPOINT``, else huggingface.co) accepts a connection within ``timeout_s``;
    False at once when offline mode is requested."""
    if offline_requested():
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout_s).close()
    except OSError:
        return False
    return True


@contextmanager
def cache_only() -> Iterator[None]:
    """Inside the block the hub libraries read only their local caches: no request, so no retries."""
    import sys

    saved = {v: os.environ.get(v) for v in _OFFLINE_VARIABLES}
    os.environ.update(dict.fromkeys(_OFFLINE_VARIABLES, "1"))
    # Libraries already imported read these flags from their modules, not from the environment.
    patched: list[tuple[Any, str, Any]] = []
    for module, names in (
        ("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
        ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
    ):
        mod = sys.modules.get(module)
        for name in names if mod is not None else ():
            if hasattr(mod, name):
                patched.append((mod, name, getattr(mod, name)))
                setattr(mod, name, True)
    try:
        yield
    finally:
        for mod, name, value in patched:
            setattr(mod, name, value)
        for v, value in saved.items():
            if value is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = value


class HubSourceError(ValueError):
    """A hub source could not be loaded: ``str(e)`` is ``"<source>: <reason>"``, one line."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def load_hub_dataset(name: str, config: str | None, split: str, *, source: str | None = None) -> Any:
    """The ``split`` of data set ``name`` (``config``) from the hub, or from the local cache when the hub
    cannot be reached; a `HubSourceError` (one line, naming ``source``) otherwise."""
    source = source or f"hf:{name}{':' + config if config else ''}:{split}"
    try:
        import datasets
    except ImportError:
        raise HubSourceError(source, "a Hugging Face data set needs the `datasets` package") from None
    online = hub_reachable()
    try:
        if online:
            return datasets.load_dataset(name, config, split=split)
        with cache_only():
            return datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - offline, unknown name or split: one line, with the reason
        if not online:
            raise HubSourceError(
                source,
                "the Hugging Face Hub cannot be reached (offline) and the data set is not in the local cache "
                "(download it once with a network, or give a local file)",
            ) from None
        raise HubSourceError(source, f"loading it from the Hugging Face Hub failed ({_first_line(e)})") from None


def weight_patterns(files: Iterable[str]) -> tuple[list[str], list[str]]:
    """``(allow, ignore)`` patterns of what to download of a repository holding ``files``: configs,
    tokenizer and one copy of the weights, safetensors when there are any, else PyTorch ``.bin``."""
    files = list(files)
    has_safetensors = any(fnmatch.fnmatch(f, "*.safetensors") for f in files)
    weights = ["*.safetensors", "*.safetensors.index.json"] if has_safetensors else ["*.bin", "*.bin.index.json"]
    # The other format's shard index is JSON too; leave it out so the directory names one format.
    other = "*.bin.index.json" if has_safetensors else "*.safetensors.index.json"
    return [*_MODEL_FILES, *weights], [other]


def download_model(repo: str) -> str:
    """A local snapshot of model repository ``repo``: downloaded once, safetensors preferred over
    ``.bin``; the cached snapshot when the hub cannot be reached. Raises what the hub raises."""
    import huggingface_hub

    if not hub_reachable():
        with cache_only():
            return huggingface_hub.snapshot_download(repo, local_files_only=True)
    allow, ignore = weight_patterns(huggingface_hub.list_repo_files(repo))
    return huggingface_hub.snapshot_download(repo, allow_patterns=allow, ignore_patterns=ignore)
