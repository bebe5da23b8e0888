"""Open Reddit data files of every kind we accept and hand them out as blocks of lines or records.

Compression is recognised by magic bytes, not by file name: zstd (any window up to 2 GiB, as the
Pushshift / Arctic Shift dumps use), gzip, bz2, xz, or none. After decompression the content is
either NDJSON (one record per line; streamed in blocks, memory flat in the file size) or one JSON
document: a Reddit API response (`/comments/<id>.json`, a listing, `/api/morechildren`), a
BigQuery-style array of records, or a recorded API cassette (`{"interactions": [...]}`).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson
import zstandard

BLOCK_BYTES = 8 << 20
ZSTD_MAX_WINDOW = 2**31
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class InputError(Exception):
    """A file that could not be read to its end; the message names the file and where it stopped."""


@dataclass
class LineBlock:
    """Complete NDJSON lines `first_line`..`first_line + n_lines - 1` (1-based)."""

    first_line: int
    data: bytes
    n_lines: int


@dataclass
class Document:
    """One whole JSON document (API response, BigQuery array, cassette)."""

    value: Any


def compression_of(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(6)
    if head.startswith(_ZSTD_MAGIC):
        return "zstd"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"BZh"):
        return "bz2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    return "none"


class _ZstdStream:
    """python-zstandard stream that raises on a truncated final frame instead of ending quietly."""

    def __init__(self, path: Path):
        self._raw = open(path, "rb")
        self._decompressor = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
        self._obj = self._decompressor.decompressobj()
        self._path = path
        self._done = False

    def read(self, size: int) -> bytes:
        out = bytearray()
        while len(out) < size and not self._done:
            chunk = self._raw.read(1 << 20)
            if not chunk:
                if not self._obj.eof:
                    raise InputError(f"{self._path}: truncated zstd stream at byte {self._raw.tell()}")
                self._done = True
                break
            try:
                out += self._obj.decompress(chunk)
            except zstandard.ZstdError as exc:
                raise InputError(f"{self._path}: corrupt zstd data near byte {self._raw.tell()}: {exc}") from exc
            if self._obj.eof:
                # concatenated frames: start a new decompressor on what follows
                rest = self._obj.unused_data
                self._obj = self._decompressor.decompressobj()
                if rest:
                    out += self._obj.decompress(rest)
                elif not self._peek_more():
                    self._done = True
        return bytes(out)

    def _peek_more(self) -> bool:
        position = self._raw.tell()
        more = bool(self._raw.read(1))
        self._raw.seek(position)
        return more

    def close(self) -> None:
        self._raw.close()


def open_decompressed(path: Path) -> IO[bytes] | _ZstdStream:
    kind = compression_of(path)
    if kind == "zstd":
        return _ZstdStream(path)
    if kind == "gzip":
        return gzip.open(path, "rb")
    if kind == "bz2":
        return bz2.open(path, "rb")
    if kind == "xz":
        return lzma.open(path, "rb")
    return open(path, "rb")


def _read(stream, size: int, path: Path) -> bytes:
    try:
        return stream.read(size)
    except InputError:
        raise
    except (EOFError, OSError, lzma.LZMAError, zstandard.ZstdError) as exc:
        raise InputError(f"{path}: compressed stream ended early or is corrupt: {exc}") from exc


def _prefetched(path: Path, block_bytes: int) -> Iterator[bytes]:
    """Decompress in a background thread (the codecs release the GIL) so parsing overlaps it."""
    chunks: queue.Queue = queue.Queue(maxsize=3)
    stop = threading.Event()

    def produce() -> None:
        stream = open_decompressed(path)
        try:
            while not stop.is_set():
                data = _read(stream, block_bytes, path)
                chunks.put(data)
                if not data:
                    return
        except BaseException as exc:  # handed to the consumer, which re-raises it
            chunks.put(exc)
        finally:
            stream.close()

    worker = threading.Thread(target=produce, name=f"decompress:{path.name}", daemon=True)
    worker.start()
    try:
        while True:
            item = chunks.get()
            if isinstance(item, BaseException):
                raise item
            if not item:
                return
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                chunks.get_nowait()
            except queue.Empty:
                worker.join(0.05)


def read_items(path: Path, block_bytes: int = BLOCK_BYTES) -> Iterator[LineBlock | Document]:
    """Yield the file's content as NDJSON line blocks, or as one Document."""
    chunks = _prefetched(path, block_bytes)
    pending = b""
    first_line = 1
    looked = False
    for chunk in chunks:
        pending += chunk
        if not looked:
            start = pending.lstrip()[:1]
            if not start:
                continue
            looked = True
            if start == b"[" or (start == b"{" and _is_document(pending)):
                yield Document(_load_document(pending + b"".join(chunks), path))
                return
        cut = pending.rfind(b"\n") + 1
        if cut:
            block, pending = pending[:cut], pending[cut:]
            n_lines = block.count(b"\n")
            yield LineBlock(first_line, block, n_lines)
            first_line += n_lines
    if pending.strip():
        yield LineBlock(first_line, pending + b"\n", 1)


def _is_document(head: bytes) -> bool:
    """A JSON object is a document (not an NDJSON record) if it spans lines or is an API envelope."""
    first = head.lstrip().split(b"\n", 1)[0]
    try:
        value = orjson.loads(first)
    except orjson.JSONDecodeError:
        return True  # pretty-printed over several lines
    return isinstance(value, dict) and ("kind" in value and "data" in value or "interactions" in value
                                        or "json" in value)


def _load_document(data: bytes, path: Path) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON: {exc}") from exc


def split_lines(block: LineBlock) -> Iterator[tuple[int, bytes]]:
    for offset, line in enumerate(block.data.split(b"\n")[: block.n_lines]):
        yield block.first_line + offset, line
