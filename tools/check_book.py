#!/usr/bin/env python
"""Check the built HTML book in a real browser (headless Chromium) and take a screenshot of every page.

    python tools/check_book.py [--html _build/html] [--screenshots _build/screenshots]

For each page it checks that the maths was typeset by the vendored MathJax (one ``mjx-container``
per maths element, no TeX errors), that every ``<img>`` points at a non-empty file of the book, that
no asset the page loads is missing, that the page neither references nor requests anything
outside this machine (Chromium's network log, with every host name made unresolvable), and that
nothing overflows the content column horizontally at the window width (1280 px): no element of the
article reaches past its edges and none needs a horizontal scroll bar or clips its content (the
server adds a small script to each page that measures the laid-out page and writes what it found
into the DOM, which Chromium dumps). It installs nothing: Chromium comes from the system
(``apt-get install -y chromium``). Exits 1 with a list of failures, 2 when Chromium or the book is
missing.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import functools
import html as html_lib
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parent.parent
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
)
# Tags whose attribute makes the browser fetch something (plain <a href> links do not).
FETCHING = {
    "script": ("src",),
    "img": ("src", "srcset"),
    "iframe": ("src",),
    "source": ("src", "srcset"),
    "video": ("src", "poster"),
    "audio": ("src",),
    "embed": ("src",),
    "object": ("data",),
    "input": ("src",),
}
FETCHING_LINK_RELS = {
    "stylesheet",
    "preload",
    "modulepreload",
    "prefetch",
    "preconnect",
    "dns-prefetch",
    "icon",
    "shortcut",
    "apple-touch-icon",
    "manifest",
}


# Measures the laid-out article after the page (and MathJax) settled; the outermost offenders only.
LAYOUT_ID = "nbh-layout-check"
LAYOUT_SCRIPT = """<script>(function () {
  function name(el) {
    var s = el.tagName.toLowerCase() + (el.id ? "#" + el.id : "");
    var c = (el.getAttribute("class") || "").trim().split(/\\s+/).slice(0, 2).join(".");
    var text = (el.textContent || "").trim().replace(/\\s+/g, " ").slice(0, 40);
    return s + (c ? "." + c : "") + (text ? " '" + text + "'" : "");
  }
  function check() {
    var col = document.querySelector("article.bd-article") || document.querySelector("main") || document.body;
    var box = col.getBoundingClientRect(), found = [], outer = null, all = col.querySelectorAll("*");
    for (var i = 0; i < all.length && found.length < 20; i++) {
      var el = all[i];
      if (outer && outer.contains(el)) continue;
      var st = getComputedStyle(el), r = el.getBoundingClientRect();
      if (st.display === "none" || st.visibility === "hidden" || st.position === "fixed" || r.width === 0)
        continue;
      var block = st.display.indexOf("inline") < 0;  // inline maths may overhang its box by a glyph
      var clipped = block && el.clientWidth > 0 && el.scrollWidth > el.clientWidth + 1
                    && st.overflowX !== "visible";
      var past = r.right > box.right + 1 || r.left < box.left - 1;
      if (clipped || past) {
        outer = el;
        found.push(name(el) + (clipped ? " needs " + el.scrollWidth + " px, shows " + el.clientWidth
                                       : " spans x = " + Math.round(r.left) + ".." + Math.round(r.right)));
      }
    }
    var out = document.getElementById("__ID__") || document.createElement("script");
    out.type = "application/json"; out.id = "__ID__";
    var column = [Math.round(box.left), Math.round(box.right)];
    out.textContent = JSON.stringify({width: window.innerWidth, column: column, overflow: found});
    document.body.appendChild(out);
  }
  window.addEventListener("load", function () { check(); setTimeout(check, 2500); setTimeout(check, 6000); });
})();</script>""".replace("__ID__", LAYOUT_ID)


def layout_report(dom: str) -> dict | None:
    """What ``LAYOUT_SCRIPT`` wrote into a dumped DOM: width, column edges, overflowing elements."""
    marker = f'id="{LAYOUT_ID}"'
    start = dom.find(marker)
    if start < 0:
        return None
    start = dom.find(">", start) + 1
    end = dom.find("</script>", start)
    with contextlib.suppress(json.JSONDecodeError):
        return json.loads(html_lib.unescape(dom[start:end]))
    return None


def is_remote(url: str) -> bool:
    """True for an absolute or protocol-relative URL to another machine."""
    url = url.strip()
    if url.startswith("//"):
        url = "http:" + url
    parts = urlsplit(url)
    return parts.scheme in ("http", "https", "ws", "wss", "ftp") and (parts.hostname or "") not in LOOPBACK


class _PageParser(HTMLParser):
    """Collects fetched URLs, image sources and maths elements of one HTML document."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.fetched: list[tuple[str, str]] = []  # (tag, url)
        self.images: list[str] = []
        self.maths = 0
        self.mjx = 0
        self.mjx_errors = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "mjx-container":
            self.mjx += 1
        if tag == "mjx-merror" or "mjx-merror" in values.get("class", ""):
            self.mjx_errors += 1
        classes = values.get("class", "").split()
        if "math" in classes and tag in ("span", "div"):
            self.maths += 1
        for attr in FETCHING.get(tag, ()):
            for url in _split_srcset(values.get(attr, "")) if attr == "srcset" else [values.get(attr, "")]:
                if url:
                    self.fetched.append((tag, url))
        if tag == "img" and values.get("src"):
            self.images.append(values["src"])
        if tag == "link" and FETCHING_LINK_RELS & set(values.get("rel", "").lower().split()):
            if values.get("href"):
                self.fetched.append(("link", values["href"]))

    handle_startendtag = handle_starttag


def _split_srcset(value: str) -> list[str]:
    return [item.strip().split()[0] for item in value.split(",") if item.strip()]


def parse_page(html: str) -> _PageParser:
    """Parse one HTML document."""
    parser = _PageParser()
    parser.feed(html)
    parser.close()
    return parser


def list_pages(html_dir: Path, patterns: list[str] | None = None) -> list[Path]:
    """The book's HTML pages (not Sphinx's ``_static``/``_sources``/``_images`` folders)."""
    pages = []
    for path in sorted(html_dir.rglob("*.html")):
        rel = path.relative_to(html_dir)
        if any(part.startswith(("_", ".")) for part in rel.parts):
            continue
        if patterns and not any(fnmatch.fnmatch(rel.as_posix(), p) for p in patterns):
            continue
        pages.append(path)
    return pages


def scan_static(html_dir: Path) -> list[str]:
    """Network references in the built files themselves: fetching tags in pages, ``url()`` in CSS."""
    problems = []
    for page in list_pages(html_dir):
        parsed = parse_page(page.read_text(encoding="utf-8", errors="replace"))
        for tag, url in parsed.fetched:
            if is_remote(url):
                problems.append(f"{page.relative_to(html_dir)}: <{tag}> loads {url}")
    for css in sorted(html_dir.rglob("*.css")):
        text = css.read_text(encoding="utf-8", errors="replace")
        for marker in ("url(http", "url('http", 'url("http', "url(//", "@import 'http", '@import "http'):
            if marker in text:
                problems.append(f"{css.relative_to(html_dir)}: CSS loads a remote resource ({marker}...)")
    return problems


@contextlib.contextmanager
def serve(html_dir: Path, inject_layout: bool = True) -> Iterator[tuple[str, list[tuple[str, int]]]]:
    """Serve ``html_dir`` on a loopback port; yield (base URL, log of (path, status) requests).

    With ``inject_layout`` every HTML page gets ``LAYOUT_SCRIPT`` before ``</body>``."""
    log: list[tuple[str, int]] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def send_head(self):  # pages get the layout script; everything else is served as it is
            path = self.translate_path(self.path)
            if os.path.isdir(path):
                path = os.path.join(path, "index.html")
            if not path.endswith(".html") or not os.path.isfile(path) or not inject_layout:
                return super().send_head()
            body = Path(path).read_bytes()
            at = body.rfind(b"</body>")
            body = (
                body[:at] + LAYOUT_SCRIPT.encode() + body[at:] if at >= 0 else body + LAYOUT_SCRIPT.encode()
            )
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            return io.BytesIO(body)

        def log_request(self, code="-", size="-") -> None:  # noqa: ARG002 - signature of the base class
            log.append((unquote(urlsplit(self.path).path), int(code) if str(code).isdigit() else 0))

        def log_message(self, format, *args) -> None:  # noqa: A002 - signature of the base class
            return

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(html_dir))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", log
    finally:
        server.shutdown()
        server.server_close()


def find_browser(name: str | None) -> str | None:
    """Path of the Chromium executable (``name`` or the first of the usual names on PATH)."""
    for candidate in [name] if name else BROWSERS:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def remote_requests(netlog: Path) -> list[str]:
    """URLs that the page (not the browser itself) asked for from another machine, per the net log."""
    try:
        data = json.loads(netlog.read_text(encoding="utf-8", errors="replace"))
    except (OSError, json.JSONDecodeError):
        # Chromium may leave the log's closing brackets unwritten; the events are still complete lines.
        text = netlog.read_text(encoding="utf-8", errors="replace") if netlog.exists() else ""
        urls = []
        for line in text.splitlines():
            line = line.strip().rstrip(",")
            if '"url"' in line and '"initiator"' in line:
                with contextlib.suppress(json.JSONDecodeError):
                    params = json.loads(line).get("params", {})
                    if params.get("initiator") != "not an origin" and is_remote(params.get("url", "")):
                        urls.append(params["url"])
        return sorted(set(urls))
    urls = set()
    for event in data.get("events", []):
        params = event.get("params") or {}
        url = params.get("url", "")
        if url and params.get("initiator", "not an origin") != "not an origin" and is_remote(url):
            urls.add(url)
    return sorted(urls)


def _local_file(html_dir: Path, page: Path, src: str, base: str) -> Path | None:
    """Map an image URL seen in the DOM to a file of the book (None for data: URIs)."""
    if src.startswith("data:"):
        return None
    if src.startswith(base):
        return html_dir / unquote(urlsplit(src).path).lstrip("/")
    parts = urlsplit(src)
    if parts.scheme == "file":
        return Path(unquote(parts.path))
    if parts.scheme in ("http", "https"):
        return html_dir / unquote(parts.path).lstrip("/")
    return (page.parent / unquote(parts.path)).resolve()


def check_page(
    browser: str,           # Chromium executable
    html_dir: Path,         # root of the built HTML
    page: Path,             # the page to check
    url: str,               # its URL (http://127.0.0.1:port/... or file://...)
    base: str,              # base URL of html_dir
    screenshot: Path,       # PNG to write
    budget_ms: int,         # Chromium's --virtual-time-budget
    width: int = 1280,      # window size in pixels
    height: int = 2000,
    layout: bool = True,    # check horizontal overflow (needs the served page's LAYOUT_SCRIPT)
) -> list[str]:  # fmt: skip
    """Load one page in headless Chromium; return its failures (empty when it is fine)."""
    rel = page.relative_to(html_dir).as_posix()
    failures = []
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="check-book-") as tmp:
        netlog = Path(tmp) / "netlog.json"
        command = [
            browser,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={Path(tmp) / 'profile'}",
            f"--window-size={width},{height}",
            f"--screenshot={screenshot}",
            "--dump-dom",
            f"--virtual-time-budget={budget_ms}",
            f"--log-net-log={netlog}",
            url,
        ]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=180)
        except subprocess.TimeoutExpired:
            return [f"{rel}: Chromium did not finish within 180 s"]
        if proc.returncode != 0:
            return [f"{rel}: Chromium exited with {proc.returncode}: {proc.stderr.strip()[-400:]}"]
        requested = remote_requests(netlog)
    dom = parse_page(proc.stdout)
    source = parse_page(page.read_text(encoding="utf-8", errors="replace"))
    if not proc.stdout.strip():
        failures.append(f"{rel}: Chromium returned an empty DOM")
    if source.maths and dom.mjx < source.maths:
        failures.append(f"{rel}: MathJax typeset {dom.mjx} of {source.maths} maths elements")
    if dom.mjx_errors:
        failures.append(f"{rel}: {dom.mjx_errors} maths element(s) with TeX errors")
    for tag, ref in dom.fetched:
        if is_remote(ref):
            failures.append(f"{rel}: <{tag}> loads {ref}")
    for url_requested in requested:
        failures.append(f"{rel}: the page requested {url_requested} from the network")
    for src in dom.images:
        path = _local_file(html_dir, page, src, base)
        if path is None:
            continue
        if not path.is_file():
            failures.append(f"{rel}: image {src} does not exist ({path})")
        elif path.stat().st_size == 0:
            failures.append(f"{rel}: image {src} is an empty file")
    if not screenshot.is_file() or screenshot.stat().st_size == 0:
        failures.append(f"{rel}: no screenshot was written to {screenshot}")
    if layout:
        report = layout_report(proc.stdout)
        if report is None:
            failures.append(f"{rel}: the layout check did not run (no #{LAYOUT_ID} in the DOM)")
        else:
            edges = report.get("column", [0, 0])
            for item in report.get("overflow", []):
                failures.append(
                    f"{rel}: overflows the content column (x = {edges[0]}..{edges[1]} at "
                    f"{report.get('width')} px): {item}"
                )
    return failures


def check_book(
    html_dir: Path,                 # built HTML (…/_build/html)
    screenshots: Path,              # folder for one PNG per page
    browser: str,                   # Chromium executable
    serve_mode: str = "http",       # http: a loopback server (with the layout check); file: file:// URLs
    budget_ms: int = 10000,         # virtual time each page gets to finish scripts (MathJax)
    patterns: list[str] | None = None,  # glob filters on page paths relative to html_dir
    height: int = 2000,             # screenshot height in pixels (width 1280)
) -> tuple[list[Path], list[str]]:  # fmt: skip
    """Check every page; return (pages checked, failures)."""
    pages = list_pages(html_dir, patterns)
    failures = list(scan_static(html_dir))
    if not pages:
        return pages, [f"{html_dir}: no HTML pages found", *failures]
    with contextlib.ExitStack() as stack:
        if serve_mode == "http":
            base, log = stack.enter_context(serve(html_dir))
        else:
            base, log = html_dir.resolve().as_uri() + "/", []
        for page in pages:
            rel = page.relative_to(html_dir).as_posix()
            shot = screenshots / (rel.replace("/", "__").removesuffix(".html") + ".png")
            start = len(log)
            page_failures = check_page(
                browser,
                html_dir,
                page,
                base + rel,
                base,
                shot,
                budget_ms,
                height=height,
                layout=serve_mode == "http",
            )
            missing = sorted({p for p, status in log[start:] if status >= 400 and p != "/favicon.ico"})
            page_failures += [f"{rel}: {p} is missing from the book (HTTP 404)" for p in missing]
            print(f"{'FAIL' if page_failures else 'ok  '} {rel}", flush=True)
            failures += page_failures
    return pages, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="check_book.py",
        description="Screenshot and check every page of the built book in headless Chromium.",
    )
    parser.add_argument("--html", type=Path, default=ROOT / "_build" / "html", help="built HTML folder")
    parser.add_argument(
        "--screenshots", type=Path, default=ROOT / "_build" / "screenshots", help="PNG folder"
    )
    parser.add_argument("--browser", default=None, help="Chromium executable (default: chromium on PATH)")
    parser.add_argument("--serve", choices=("http", "file"), default="http", help="how pages are opened")
    parser.add_argument("--budget-ms", type=int, default=10000, help="virtual time budget per page")
    parser.add_argument("--height", type=int, default=2000, help="screenshot height in pixels (width 1280)")
    parser.add_argument("--pages", default="", help="comma-separated globs of pages to check (default: all)")
    args = parser.parse_args(argv)

    browser = find_browser(args.browser)
    if browser is None:
        print("error: Chromium not found; install it with `apt-get install -y chromium`", file=sys.stderr)
        return 2
    if not (args.html / "index.html").is_file():
        print(
            f"error: {args.html} holds no built book; run `python tools/build_book.py html`", file=sys.stderr
        )
        return 2
    patterns = [p.strip() for p in args.pages.split(",") if p.strip()] or None
    pages, failures = check_book(
        args.html, args.screenshots, browser, args.serve, args.budget_ms, patterns, args.height
    )
    print(f"{len(pages)} page(s) checked, screenshots in {args.screenshots}")
    if failures:
        print(f"{len(failures)} failure(s):", file=sys.stderr)
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
