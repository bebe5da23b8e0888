"""Open Reddit data files of every kind we accept and hand them out as blocks of lines or records.

Compression is recognised by magic bytes, not by file name: zstd (any window up to 2 GiB, as the
Pushshift / Arctic Shift dumps use), gzip, bz2, xz, or none. After decompression the content is
either NDJSON (one record per line; streamed in blocks) or one JSON document: a Reddit API
response (`/comments/<id>.json`, a listing, `/api/morechildren`), a BigQuery-style array of
records, or a recorded API cassette (`{"interactions": [...]}`).

Streaming keeps memory flat in the file size, apart from the zstd decoder's window: a frame
written with a 2 GiB window needs a buffer of min(2 GiB, decompressed size), as `zstd -d` does.
"""

from __future__ import annotations

import bz2
import json
import lzma
import queue
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import IO, Any

import orjson
import zstandard

BLOCK_BYTES = 16 << 20  # decompressed bytes per block handed to the parser
DOCUMENT_MAX_BYTES = 1 << 30  # a JSON document is read whole: API responses and cassettes are far smaller
_SNIFF_LINES = 16  # lines looked at to tell NDJSON from a pretty-printed document
_COMPRESSED_READ_MAX = 1 << 20
_DECODED_PER_CALL_MAX = 4 << 20
_QUEUE_BLOCKS = 2  # blocks decompressed ahead of the parser: bounds memory
ZSTD_MAX_WINDOW = 2**31
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class InputError(Exception):
    """A file that could not be read to its end; the message names the file and where it stopped."""


@dataclass
class LineBlock:
    """Complete NDJSON lines `first_line`..`first_line + n_lines - 1` (1-based).

    The block is the concatenation of `parts`, the decompressor's outputs as they came (the last
    one cut after its last newline): the fast path streams them to its parser without joining
    them, which saved two 16 MiB copies and their page faults per block. `data` joins them for
    the per-line path.
    """

    first_line: int
    parts: list[bytes | memoryview]
    n_lines: int

    @property
    def size(self) -> int:
        return sum(len(part) for part in self.parts)

    @cached_property
    def data(self) -> bytes:
        return bytes(self.parts[0]) if len(self.parts) == 1 else b"".join(self.parts)


@dataclass
class Document:
    """One whole JSON document (API response, BigQuery array, cassette)."""

    value: Any


_MAGIC = {"zstd": _ZSTD_MAGIC, "gzip": b"\x1f\x8b", "bz2": b"BZh", "xz": b"\xfd7zXZ\x00"}
_SUFFIX = {".zst": "zstd", ".zstd": "zstd", ".gz": "gzip", ".bz2": "bz2", ".xz": "xz"}


def compression_of(path: Path) -> str:
    """The compression by magic bytes; a name that promises one the bytes do not carry is an error
    (random bytes named `.zst` are not text to read line by line)."""
    with open(path, "rb") as fh:
        head = fh.read(6)
    kind = next((name for name, magic in _MAGIC.items() if head.startswith(magic)), "none")
    promised = _SUFFIX.get(path.suffix.lower())
    if promised and kind != promised:
        raise InputError(f"{path}: named as {promised} but not {promised}-compressed "
                         f"(its first bytes are {head.hex(' ') or 'none: the file is empty'})")
    return kind


def _decompressor(kind: str):
    """A fresh streaming decompressor: `decompress(data)`, `eof`, `unused_data` (one frame / member / stream)."""
    if kind == "zstd":
        return zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).decompressobj()
    if kind == "gzip":
        return zlib.decompressobj(wbits=31)
    if kind == "bz2":
        return bz2.BZ2Decompressor()
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ)


class _Decompressed:
    """A compressed file as a stream of decompressed parts that raises on damage, after handing out
    what was decoded before it (a truncated gzip, bz2, xz or zstd file keeps its records up to there).

    Concatenated frames (zstd), members (gzip) and streams (bz2, xz) go on in a fresh decompressor.
    `read_parts` returns at least `size` bytes (more when one compressed chunk expands past it) so that
    the output is copied once, into the joined result, and never re-buffered.
    """

    def __init__(self, path: Path, kind: str):
        self._raw = open(path, "rb")
        self._kind, self._path = kind, path
        self._obj = _decompressor(kind)
        self._frame_open = False  # the current frame has input but has not ended yet
        self._read_size: int | None = None  # compressed bytes per decompress call, adapted
        self._done = False
        self._error: InputError | None = None

    def read_parts(self, size: int) -> list[bytes]:
        """At least `size` decompressed bytes (fewer at the end), as the decompressor returned them."""
        if self._error:
            raise self._error
        parts: list[bytes] = []
        have = 0
        if self._read_size is None:
            self._read_size = max(4096, min(64 << 10, size // 16))
        while have < size and not self._done:
            chunk = self._raw.read(self._read_size)
            try:
                out = self._feed(chunk) if chunk else b""
            except InputError as error:
                self._fail(error, parts)
                break
            if not chunk:
                if self._frame_open:
                    self._fail(InputError(f"{self._path}: truncated {self._kind} stream at byte "
                                          f"{self._raw.tell()}"), parts)
                self._done = True
                break
            if out:
                parts.append(out)
                have += len(out)
            # decompressors have no output limit: keep each call's output near 1-4 MiB (a quarter
            # of a small block) by feeding less input when the data compresses well
            target = min(_DECODED_PER_CALL_MAX, max(size // 4, 4096))
            if len(out) > target and self._read_size > 4096:
                self._read_size //= 2
            elif len(out) < target // 4 and self._read_size < _COMPRESSED_READ_MAX:
                self._read_size *= 2
        return parts

    def _fail(self, error: InputError, parts: list) -> None:
        """Raise now if nothing was decoded in this call, else hand out `parts` and raise on the next."""
        self._done = True
        if not parts:
            raise error
        self._error = error

    def _feed(self, data: bytes) -> bytes:
        outputs = []
        while data:
            try:
                outputs.append(self._obj.decompress(data))
            except (zstandard.ZstdError, zlib.error, OSError, EOFError, lzma.LZMAError) as exc:
                raise InputError(f"{self._path}: corrupt {self._kind} data near byte {self._raw.tell()}: "
                                 f"{exc}") from exc
            self._frame_open = not self._obj.eof
            if self._frame_open:
                break
            # a frame ended: what follows starts the next one (or is padding, for gzip's trailing zeros)
            data = self._obj.unused_data
            if self._kind == "gzip" and not data.strip(b"\x00"):
                break
            self._obj = _decompressor(self._kind)
        return outputs[0] if len(outputs) == 1 else b"".join(outputs)

    def close(self) -> None:
        self._raw.close()


def open_decompressed(path: Path) -> _Decompressed | IO[bytes]:
    kind = compression_of(path)
    return open(path, "rb") if kind == "none" else _Decompressed(path, kind)


def _read(stream, size: int, path: Path) -> bytes:
    parts = _read_parts(stream, size, path)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _read_parts(stream, size: int, path: Path) -> list[bytes]:
    """At least `size` bytes (fewer at the end; [] at the end) without joining the decoder's outputs."""
    if isinstance(stream, _Decompressed):
        return stream.read_parts(size)
    try:
        data = stream.read(size)
    except OSError as exc:
        raise InputError(f"{path}: cannot be read: {exc}") from exc
    return [data] if data else []


def _items(path: Path, block_bytes: int) -> Iterator[LineBlock | bytes]:
    """Decompress and cut into blocks of whole lines; runs in the background thread.

    A whole JSON document is handed out as its raw bytes (parsed by the consumer). A block is a
    list of the decompressor's outputs: only the piece of a line split between two blocks is
    copied.
    """
    stream = open_decompressed(path)
    try:
        chunk = _read(stream, block_bytes, path)
        head = chunk
        while head and not head.lstrip():  # leading whitespace only: look further
            chunk = _read(stream, block_bytes, path)
            head += chunk
            if not chunk:
                break
        if _is_document(head, ended=not chunk):
            rest, size = [], len(head)
            while chunk:
                chunk = _read(stream, block_bytes, path)
                rest.append(chunk)
                size += len(chunk)
                if size > DOCUMENT_MAX_BYTES:
                    raise InputError(f"{path}: a JSON document over {DOCUMENT_MAX_BYTES >> 20} MiB; documents are "
                                     "read whole: convert it to NDJSON (one record per line)")
            yield b"".join([head, *rest])
            return
        pending: list[bytes | memoryview] = [head] if head else []
        pending_bytes = len(head)
        first_line = 1
        ended = not chunk
        while pending:
            if pending_bytes >= block_bytes or ended:
                block, n_lines, tail = _cut_lines(pending, final=ended)
                if block:
                    yield LineBlock(first_line, block, n_lines)
                    first_line += n_lines
                pending, pending_bytes = tail, sum(len(part) for part in tail)
                if ended:
                    break
            try:
                parts = _read_parts(stream, max(block_bytes - pending_bytes, 1), path)
            except InputError:
                block, n_lines, _ = _cut_lines(pending, final=False)  # the whole lines before the damage
                if block:
                    yield LineBlock(first_line, block, n_lines)
                raise
            ended = not parts
            pending.extend(parts)
            pending_bytes += sum(len(part) for part in parts)
    finally:
        stream.close()


def _cut_lines(parts: list, final: bool) -> tuple[list, int, list]:
    """Split buffered parts into (complete lines as parts, their line count, the unfinished last line)."""
    for i in range(len(parts) - 1, -1, -1):
        cut = parts[i].rfind(b"\n") + 1
        if cut:
            block = parts[:i] + [parts[i] if cut == len(parts[i]) else memoryview(parts[i])[:cut]]
            n_lines = sum(part.count(b"\n") for part in parts[:i]) + parts[i].count(b"\n", 0, cut)
            tail = [bytes(parts[i][cut:])] if cut < len(parts[i]) else []
            tail += parts[i + 1:]
            break
    else:
        block, n_lines, tail = [], 0, list(parts)
    if final and any(bytes(part).strip() for part in tail):
        block, n_lines, tail = block + tail + [b"\n"], n_lines + 1, []  # a last line without its newline
    return block, n_lines, tail


def _prefetched(path: Path, block_bytes: int) -> Iterator[LineBlock | bytes]:
    """Decompress and cut lines in a background thread (the codecs release the GIL) so parsing overlaps it."""
    items: queue.Queue = queue.Queue(maxsize=_QUEUE_BLOCKS)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in _items(path, block_bytes):
                if stop.is_set():
                    return
                items.put(item)
            items.put(done)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            items.put(exc)

    worker = threading.Thread(target=produce, name=f"decompress:{path.name}", daemon=True)
    worker.start()
    try:
        while True:
            item = items.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                items.get_nowait()
            except queue.Empty:
                worker.join(0.05)


def read_items(path: Path, block_bytes: int = BLOCK_BYTES) -> Iterator[LineBlock | Document]:
    """Yield the file's content as NDJSON line blocks, or as one Document."""
    for item in _prefetched(path, block_bytes):
        if isinstance(item, LineBlock):
            yield item
        else:
            yield Document(_load_document(item, path))


def _is_document(head: bytes, ended: bool) -> bool:
    """Whether the file is one JSON document rather than NDJSON, from its first lines (`head`, the
    whole file when `ended`), so that one bad line never decides it:

    - one line: a document when it is an array or an API envelope (`kind` + `data`, a cassette's
      `interactions`, `/api/morechildren`'s `json`); a record or a bad line is NDJSON;
    - several lines: a document only when none of the first `_SNIFF_LINES` parses on its own as an
      object (pretty-printed JSON has lines such as `"kind": "t1",` or a lone `"text"`); a line that
      does makes it NDJSON, whatever line 1 holds.
    """
    if head.lstrip()[:1] not in (b"[", b"{"):
        return False
    lines = head.split(b"\n", _SNIFF_LINES)
    complete = lines if ended and len(lines) <= _SNIFF_LINES else lines[:-1]  # the last may be cut short
    candidates = [line for line in complete if line.strip()]
    if not candidates:
        return True  # a first line longer than a whole block: no NDJSON record is that long
    values = [_parsed(line) for line in candidates]
    if len(candidates) == 1:
        value = values[0]
        return isinstance(value, list) or isinstance(value, dict) and (
            "kind" in value and "data" in value or "interactions" in value or "json" in value)
    return not any(isinstance(value, dict) for value in values)


_UNPARSED = object()


def _parsed(line: bytes):
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:  # also deeper than orjson's nesting limit
        return _UNPARSED


def _load_document(data: bytes, path: Path) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    # A lone surrogate escape ("\ud800") or a NaN in one record must not lose the whole document: the
    # standard library reads both, and the record that holds one is skipped or has it checked as any
    # value (mining.normalize). What neither reads is an error for the file.
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise InputError(f"{path}: not valid JSON: {exc}") from exc


def split_lines(block: LineBlock) -> Iterator[tuple[int, bytes]]:
    for offset, line in enumerate(block.data.split(b"\n")[: block.n_lines]):
        yield block.first_line + offset, line
