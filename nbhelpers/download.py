"""Resolve a local path or URL to a local file; URLs are downloaded only when asked, into a cache.

The cache folder is ``$NBHELPERS_CACHE`` or ``~/.cache/nbhelpers``. Offline, a URL that is not
cached gives a clear error that says where to put the file by hand.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from .atomic import atomic_path


class DownloadError(RuntimeError):
    """A URL could not be fetched (offline, HTTP error) and no cached copy exists."""


def cache_dir() -> Path:
    """The download cache folder (created on demand)."""
    root = os.environ.get("NBHELPERS_CACHE") or os.path.join(Path.home(), ".cache", "nbhelpers")
    return Path(root)


def is_url(s: str | os.PathLike) -> bool:
    """True for ``http(s)://`` and ``file://`` addresses."""
    return isinstance(s, str) and urllib.parse.urlparse(s).scheme in ("http", "https", "file")


def cached_path(url: str) -> Path:
    """Where ``url`` lives in the cache: ``<cache>/<sha1[:12]>-<basename>``."""
    name = os.path.basename(urllib.parse.urlparse(url).path) or "download"
    digest = hashlib.sha1(url.encode("utf-8")).hexdigest()[:12]
    return cache_dir() / f"{digest}-{name}"


def resolve(path_or_url: str | os.PathLike, download: bool = True, timeout: float = 60.0) -> Path:
    """Return a local file for ``path_or_url``, downloading a URL into the cache if needed.

    A missing local file raises ``FileNotFoundError`` naming it. A URL is fetched only when
    ``download`` is true and it is not cached yet; failures raise ``DownloadError``.
    """
    if not is_url(path_or_url):
        p = Path(path_or_url).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file or directory")
        return p
    url = str(path_or_url)
    dest = cached_path(url)
    if dest.exists():
        return dest
    if not download:
        raise DownloadError(f"{url} is not in the cache ({dest}) and downloading was not requested")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, atomic_path(dest) as tmp:
            with open(tmp, "wb") as f:
                shutil.copyfileobj(resp, f, length=1 << 20)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise DownloadError(
            f"could not download {url}: {e}. Offline? Fetch it elsewhere and pass the local path, "
            f"or copy it to {dest}"
        ) from e
    return dest
