"""Resolve a local path or URL to a local file; URLs are downloaded only when asked, into a cache.

The cache folder is ``$NBHELPERS_CACHE`` or ``~/.cache/nbhelpers``. Offline, a URL that is not
cached gives a clear error that says where to put the file by hand.

A download shows a progress bar (stderr), goes to a ``*.partial`` file beside its destination and
is renamed into place only once complete (length as announced, digest as expected). The expected
digest is the ``sha256=`` argument, a ``#sha256=<hex>`` fragment of the URL, or an entry of
``KNOWN_DIGESTS``; without one, the SHA-256 of the download is recorded beside the file
(``.<name>.sha256``). A cached file whose content no longer matches (truncated, overwritten) is
noticed on the next use and fetched again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

__all__ = ["KNOWN_DIGESTS", "DownloadError", "cache_dir", "cached_path", "file_digest", "is_url", "resolve"]

# Published digests of files this project downloads: (algorithm, hex). The CIFAR-10 authors publish MD5.
KNOWN_DIGESTS: dict[str, tuple[str, str]] = {
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz": ("md5", "c58f30108f718f92721af3b95e74349a"),
}
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A URL could not be fetched (offline, HTTP error, bad digest) and no good cached copy exists."""


def cache_dir() -> Path:
    """The download cache folder (created on demand)."""
    root = os.environ.get("NBHELPERS_CACHE") or os.path.join(Path.home(), ".cache", "nbhelpers")
    return Path(root)


def is_url(s: str | os.PathLike) -> bool:
    """True for ``http(s)://`` and ``file://`` addresses."""
    return isinstance(s, str) and urllib.parse.urlparse(s).scheme in ("http", "https", "file")


def _split(url: str) -> tuple[str, str | None]:
    """The URL without a ``#sha256=<hex>`` fragment, and that digest (lower case) or None."""
    base, _, fragment = url.partition("#")
    key, _, value = fragment.partition("=")
    return (base, value.lower()) if key == "sha256" and value else (url, None)


def cached_path(url: str) -> Path:
    """Where ``url`` lives in the cache: ``<cache>/<sha1[:12]>-<basename>`` (a digest fragment aside)."""
    url = _split(url)[0]
    name = os.path.basename(urllib.parse.urlparse(url).path) or "download"
    digest = hashlib.sha1(url.encode("utf-8")).hexdigest()[:12]
    return cache_dir() / f"{digest}-{name}"


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _record_path(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.sha256")


def _expected(url: str, sha256: str | None) -> tuple[str, str] | None:
    base, fragment = _split(url)
    if sha256 or fragment:
        return "sha256", (sha256 or fragment).lower()
    return KNOWN_DIGESTS.get(base)


def _cached_ok(dest: Path, expected: tuple[str, str] | None) -> bool:
    """Does the cached file match its expected digest, or the SHA-256 recorded when it was fetched?"""
    record = _record_path(dest)
    try:
        meta = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = None
    st = dest.stat()
    same_file = (
        isinstance(meta, dict) and meta.get("size") == st.st_size and meta.get("mtime_ns") == st.st_mtime_ns
    )
    if expected is None:
        if meta is None:  # cached before digests were recorded: record it now, nothing to compare with
            _write_record(dest, file_digest(dest))
            return True
        return same_file or file_digest(dest) == meta.get("sha256")
    algorithm, want = expected
    if same_file and algorithm == "sha256" and meta.get("sha256") == want:
        return True
    return file_digest(dest, algorithm) == want


def _write_record(dest: Path, sha256: str) -> None:
    st = dest.stat()
    text = json.dumps({"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    with contextlib.suppress(OSError):
        _record_path(dest).write_text(text, encoding="utf-8")


def _fetch(url: str, dest: Path, expected: tuple[str, str] | None, timeout: float, progress: bool) -> None:
    """Download ``url`` to a partial file beside ``dest``; check length and digest, then rename it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{dest.name}.", suffix=".partial", dir=dest.parent)
    partial = Path(tmp)
    sha256 = hashlib.sha256()
    check = hashlib.new(expected[0]) if expected and expected[0] != "sha256" else None
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as resp:
            total = resp.headers.get("Content-Length")
            total = int(total) if total and total.isdigit() else None
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=dest.name.split("-", 1)[-1],
                disable=not progress,
                file=sys.stderr,
                leave=False,
            ) as bar:
                done = 0
                for chunk in iter(lambda: resp.read(_CHUNK), b""):
                    f.write(chunk)
                    sha256.update(chunk)
                    if check is not None:
                        check.update(chunk)
                    done += len(chunk)
                    bar.update(len(chunk))
        if total is not None and done != total:
            raise DownloadError(f"could not download {url}: got {done} of {total} bytes (connection cut?)")
        if expected is not None:
            got = (check or sha256).hexdigest()
            if got != expected[1]:
                raise DownloadError(f"{url}: {expected[0]} {got} does not match the expected {expected[1]}")
        os.chmod(partial, 0o644)
        os.replace(partial, dest)
        _write_record(dest, sha256.hexdigest())
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


def resolve(
    path_or_url: str | os.PathLike,
    download: bool = True,
    timeout: float = 60.0,
    sha256: str | None = None,
    progress: bool = True,
) -> Path:
    """Return a local file for ``path_or_url``, downloading a URL into the cache if needed.

    A missing local file raises ``FileNotFoundError`` naming it. A URL is fetched only when
    ``download`` is true and it is not cached (or its cached copy is damaged); failures raise
    ``DownloadError``. ``sha256`` (or a ``#sha256=`` fragment) is the digest the file must have.
    """
    if not is_url(path_or_url):
        p = Path(path_or_url).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file or directory")
        return p
    url = str(path_or_url)
    expected = _expected(url, sha256)
    dest = cached_path(url)
    if dest.exists():
        if _cached_ok(dest, expected):
            return dest
        if not download:
            raise DownloadError(
                f"{dest}: the cached copy of {url} is damaged and downloading was not requested"
            )
        print(f"{dest}: damaged cached copy of {url}; fetching it again", file=sys.stderr)
    elif not download:
        raise DownloadError(f"{url} is not in the cache ({dest}) and downloading was not requested")
    try:
        _fetch(_split(url)[0], dest, expected, timeout, progress)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise DownloadError(
            f"could not download {url}: {e}. Offline? Fetch it "
            f"elsewhere and pass the local path, or copy it to {dest}"
        ) from e
    return dest
