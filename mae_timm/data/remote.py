"""Reading over the network, bounded: every connection and read has a timeout, a failed read is retried a bounded
number of times with a doubling backoff, and a body shorter than its ``Content-Length`` is an error, never data.

- :func:`download`: a source file (the Tiny-ImageNet zip) into a folder, via ``NAME.part`` renamed only when the
  length (and a known md5) is right.
- :func:`read_url`: a whole shard (local path, ``file:``, ``http(s):``, or ``pipe:`` command) into memory.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from mae_timm.data.sources import DataError

__all__ = ["RemoteError", "TIMEOUT_S", "RETRIES", "download", "read_url"]

TIMEOUT_S = 30.0  # seconds any one connect or read may wait for the server before it counts as failed
RETRIES = 3  # further tries of a failed network read (after 0.5 s, 1 s, 2 s), then it fails for good
BACKOFF_S = 0.5  # wait before the first retry; doubled for each next one


class RemoteError(OSError):
    """A url that could not be read in full after its retries (an OSError: the loader counts it as a bad shard)."""


NETWORK_ERRORS = (OSError, http.client.HTTPException, ValueError)  # what urllib raises for a failed request


def _md5(path: Path) -> str:
    from mae_timm.data.shards import file_digest  # noqa: PLC0415 (shards imports nothing of this module)

    return file_digest(path, "md5")


def _fetch(url: str, timeout: float, sink=None, progress: bool = False) -> bytes:
    """One try: the body of an http(s) or file url; OSError for a refused connection, an HTTP error status, a
    timeout, or a body shorter than its Content-Length. With ``sink`` (a file), blocks go there instead."""
    chunks, got = [], 0
    with urllib.request.urlopen(url, timeout=timeout) as response:
        expected = response.headers.get("Content-Length")
        expected = int(expected) if expected and expected.isdigit() else None
        with tqdm(total=expected, unit="B", unit_scale=True, desc=Path(url).name, disable=not progress) as bar:
            while block := response.read(1 << 20):
                got += len(block)
                sink.write(block) if sink is not None else chunks.append(block)
                bar.update(len(block))
    if expected is not None and got != expected:
        raise OSError(f"the body holds {got} bytes, its Content-Length says {expected} (cut short)")
    return b"".join(chunks)


def _pipe(command: str, timeout: float) -> bytes:
    """The standard output of a ``pipe:`` command; OSError when it fails or outlives ``timeout``."""
    try:
        done = subprocess.run(command, shell=True, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise OSError(f"pipe command ran past {timeout:g} s") from None
    if done.returncode != 0:
        raise OSError(f"pipe command exited {done.returncode}: {done.stderr.decode(errors='replace').strip()[:200]}")
    return done.stdout


def read_url(url: str, timeout: float | None = None, retries: int | None = None, backoff: float | None = None) -> bytes:
    """The bytes of a shard: a local path, ``file:``, ``http(s):`` (each try bounded by ``timeout``, retried
    ``retries`` times with a doubling ``backoff``) or ``pipe:CMD`` (its stdout). :class:`RemoteError` names the
    url and the last failure; a 404 is not retried (the server said the file is not there). None: the module's
    ``TIMEOUT_S``, ``RETRIES``, ``BACKOFF_S``."""
    timeout = TIMEOUT_S if timeout is None else timeout
    retries = RETRIES if retries is None else retries
    backoff = BACKOFF_S if backoff is None else backoff
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("", "file") or len(parsed.scheme) == 1:
        path = urllib.parse.unquote(parsed.path) if parsed.scheme == "file" else url
        with open(path, "rb") as f:
            return f.read()
    if parsed.scheme not in ("http", "https", "pipe"):
        raise RemoteError(f"{url}: unsupported url scheme {parsed.scheme!r} (use a path, file:, http(s): or pipe:)")
    for attempt in range(retries + 1):
        try:
            return _pipe(url[len("pipe:") :], timeout) if parsed.scheme == "pipe" else _fetch(url, timeout)
        except NETWORK_ERRORS as exn:
            last = exn
            if isinstance(exn, urllib.error.HTTPError) and exn.code == 404:
                break
        if attempt < retries:
            time.sleep(backoff * 2**attempt)
    raise RemoteError(f"{url}: {_describe(last)} (after {attempt + 1} tries)")


def _describe(exn: BaseException) -> str:
    if isinstance(exn, urllib.error.HTTPError):
        return f"HTTP {exn.code} {exn.reason}"
    if isinstance(exn, urllib.error.URLError):
        return str(exn.reason)
    return str(exn) or type(exn).__name__


def download(url: str, directory: str | os.PathLike, md5: str | None = None, progress: bool = True,
             timeout: float = TIMEOUT_S, retries: int = RETRIES) -> Path:
    """Download ``url`` (http, https or file) into ``directory``; returns the file's path.

    Bytes go to ``<name>.part`` (started afresh each try), renamed only when the body has its ``Content-Length``
    and, with ``md5``, that md5; so an interrupted or cut-short download never looks finished and a rerun never
    reuses one. Each connect and read waits at most ``timeout`` seconds. A complete file already there is reused.
    """
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    target = Path(directory) / name
    if target.is_file() and (md5 is None or _md5(target) == md5):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    for attempt in range(retries + 1):
        try:
            with open(part, "wb") as f:
                _fetch(url, timeout, sink=f, progress=progress)
            break
        except NETWORK_ERRORS as exn:
            if isinstance(exn, urllib.error.HTTPError) and exn.code == 404 or attempt == retries:
                part.unlink(missing_ok=True)
                raise DataError(f"cannot download {url}: {_describe(exn)} (after {attempt + 1} tries)") from None
            time.sleep(BACKOFF_S * 2**attempt)
    if md5 is not None and (got := _md5(part)) != md5:
        raise DataError(f"{url} has md5 {got}, expected {md5}; the download is left at {part} "
                        "(--md5 none skips the check)")
    os.replace(part, target)
    return target
