"""nbhelpers.download: progress, partial files, digests and damaged caches, against a local HTTP server."""

from __future__ import annotations

import hashlib
import http.server
import threading

import pytest

from nbhelpers import download

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    hits: dict[str, int] = {}

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.hits[self.path] = self.hits.get(self.path, 0) + 1
        if self.path == "/cut.bin":  # announces more than it sends, then hangs up
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[:1000])
            return
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("NBHELPERS_CACHE", str(tmp_path / "cache"))
    _Handler.files = {"/weights.bin": PAYLOAD, "/small.txt": b"hello"}
    _Handler.hits = {}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _Handler
    httpd.shutdown()
    httpd.server_close()


def _cache_files(tmp_path):
    return sorted(p.name for p in (tmp_path / "cache").iterdir()) if (tmp_path / "cache").exists() else []


def test_download_shows_progress_and_leaves_no_partial_file(server, tmp_path, capsys):
    base, handler = server
    path = download.resolve(f"{base}/weights.bin")
    assert path.read_bytes() == PAYLOAD
    err = capsys.readouterr().err
    assert "weights.bin" in err and "%" in err  # the progress bar
    assert not [n for n in _cache_files(tmp_path) if n.endswith(".partial")]
    assert download.resolve(f"{base}/weights.bin") == path and handler.hits["/weights.bin"] == 1  # cached


def test_a_cut_connection_leaves_nothing_behind(server, tmp_path):
    base, _ = server
    with pytest.raises(download.DownloadError, match="1000 of"):
        download.resolve(f"{base}/cut.bin", progress=False)
    assert _cache_files(tmp_path) == []
    with pytest.raises(download.DownloadError, match="404"):
        download.resolve(f"{base}/missing.bin", progress=False)


def test_sha256_is_checked_when_known(server, tmp_path, monkeypatch):
    base, handler = server
    good = hashlib.sha256(PAYLOAD).hexdigest()
    with pytest.raises(download.DownloadError, match="does not match"):
        download.resolve(f"{base}/weights.bin", sha256="0" * 64, progress=False)
    assert _cache_files(tmp_path) == []  # nothing kept of a bad download
    assert download.resolve(f"{base}/weights.bin#sha256={good}", progress=False).read_bytes() == PAYLOAD
    url = f"{base}/small.txt"
    monkeypatch.setitem(download.KNOWN_DIGESTS, url, ("md5", hashlib.md5(b"other").hexdigest()))
    with pytest.raises(download.DownloadError, match="md5"):
        download.resolve(url, progress=False)
    monkeypatch.setitem(download.KNOWN_DIGESTS, url, ("md5", hashlib.md5(b"hello").hexdigest()))
    assert download.resolve(url, progress=False).read_bytes() == b"hello"


def test_a_damaged_cached_file_is_fetched_again(server, tmp_path):
    base, handler = server
    url = f"{base}/weights.bin"
    path = download.resolve(url, progress=False)
    path.write_bytes(PAYLOAD[:5000])  # truncated on disk (a full disk, a killed copy, ...)
    with pytest.raises(download.DownloadError, match="damaged"):
        download.resolve(url, download=False)
    assert download.resolve(url, progress=False).read_bytes() == PAYLOAD
    assert handler.hits["/weights.bin"] == 2
    path.write_bytes(b"x" * len(PAYLOAD))  # same size, other content
    assert download.resolve(url, progress=False).read_bytes() == PAYLOAD and handler.hits["/weights.bin"] == 3


def test_file_urls_and_a_known_digest_of_a_file_copied_in_by_hand(tmp_path, monkeypatch):
    monkeypatch.setenv("NBHELPERS_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "model.pt"
    src.write_bytes(b"abc" * 1000)
    url = src.as_uri()
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    local = download.resolve(f"{url}#sha256={digest}", progress=False)
    assert local.read_bytes() == src.read_bytes() and local == download.cached_path(url)
    # offline, a file copied into the cache by hand is used when its digest is right
    local.unlink()
    local.write_bytes(src.read_bytes())
    src.unlink()
    assert download.resolve(f"{url}#sha256={digest}", download=False) == local
    local.write_bytes(b"wrong")
    with pytest.raises(download.DownloadError, match="damaged"):
        download.resolve(f"{url}#sha256={digest}", download=False)
