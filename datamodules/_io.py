r"""Located readers shared by the dataset parsers (amazon.py, steam.py, yoochoose.py).

Every problem in a raw file becomes a :class:`~recbench.data.DataFormatError` naming the file, the
line (1-based) and the reason, never a traceback from inside gzip, json, ast or polars.

Rules shared by every reader (one rule per question, so no reader accepts what another rejects):

- Line ends: ``\n`` or ``\r\n``. A carriage return NOT followed by ``\n`` (old-Mac line ends, a
  pasted line) is a located error ("bare carriage return"), never whitespace and never a line end:
  taken as whitespace it merged two users of an id-sequence file into one, and taken as a line end
  it would shift every later line number away from what editors and ``wc -l`` show. The fix is
  one command (``tr '\r' '\n'``), and the error says where.
- A UTF-8 byte-order mark at the very start of a file is accepted and dropped (editors on Windows
  write one); anywhere else U+FEFF is an ordinary character (and not an id).
- Compression is chosen by the name: ``.gz`` is read as gzip, anything else as plain text. A plain
  name whose bytes start with the gzip magic is a located error that says to rename or decompress it
  (never the binary bytes in a message); a ``.gz`` name with plain bytes is a corrupt gzip stream.
- Integers must fit int64 (the canonical tables' type); a larger value is a located error, not an
  overflow inside polars. Structures nested beyond the parsers' limits are located errors too.

- :func:`iter_lines` streams the lines of a plain or gzip file; a truncated or corrupt gzip stream
  (``EOFError``, ``gzip.BadGzipFile``, ``zlib.error``) or bytes that are not UTF-8 are reported at
  the line where reading stopped; an empty file is an error.
- :func:`parse_json_line` / :func:`parse_literal_line` parse one JSON object or one Python dict
  literal (``ast.literal_eval``: the official UCSD metadata files are written with Python's
  ``repr``; ``eval`` is never used on data).
- :func:`read_id_sequences` reads ``[user] item item …`` lines (the S3Rec/SETRec/DreamRec text
  format) fully vectorised after one validation pass: only ASCII digits and blanks are allowed, so
  ``int()``'s leniency (``'1_0'``, non-ASCII digits, signs) can never sneak an id through.
- :func:`read_delimited` reads a TSV/CSV with polars (all columns as text first, so a bad value is
  located by its row instead of failing inside the CSV reader); :func:`cast_int_column` turns a
  text column of ids into Int64 with the first bad value located.
"""

from __future__ import annotations

import ast
import gzip
import io
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars

from recbench.data import DataFormatError

# Anything outside this set in an id-sequence file is an error (see read_id_sequences). A bare \r
# never reaches this check: read_text rejects it first.
_NOT_ID_TEXT = re.compile(r"[^0-9 \t\r\n]")
# int64 holds every 18-digit number; longer tokens are rejected instead of overflowing.
_MAX_ID_DIGITS = 18
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_BOM = b"\xef\xbb\xbf"
_GZIP_MAGIC = b"\x1f\x8b"
_BARE_CR = re.compile(rb"\r(?!\n)")
# Chunk size of the bare-CR scan over plain files that polars memory-maps.
_SCAN_CHUNK = 1 << 24


def _bare_cr_error(path: Path, line: int, column: int) -> DataFormatError:
    return DataFormatError(
        path,
        line,
        f"bare carriage return at column {column} (a \\r not followed by \\n: old-Mac line ends or a "
        "pasted line); recbench takes only \\n or \\r\\n as a line end, so convert the file's line ends "
        "to \\n (e.g. tr '\\r' '\\n')",
    )


def _check_bare_cr(path: Path, data: bytes, first_line: int = 1, line_start: int = 0) -> None:
    """Raise for the first ``\\r`` of ``data`` not followed by ``\\n`` (see the module docstring).

    ``first_line`` is the line number at ``data[0]`` and ``line_start`` the offset where that line
    began (negative when it began in an earlier chunk), for located errors in chunked scans.
    """
    bare = _BARE_CR.search(data)
    if bare is None:
        return
    position = bare.start()
    newlines = data.count(b"\n", 0, position)
    start = data.rfind(b"\n", 0, position) + 1 if newlines else line_start
    raise _bare_cr_error(path, first_line + newlines, position - start + 1)


def _reject_gzip_named_plain(path: Path, head: bytes) -> None:
    if head.startswith(_GZIP_MAGIC):
        raise DataFormatError(
            path,
            1,
            f"the file is gzip-compressed, but its name does not end in .gz: rename it to {path.name}.gz "
            "or decompress it",
        )


def _open_binary(path: Path) -> io.BufferedIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    handle = open(path, "rb")
    try:
        _reject_gzip_named_plain(path, handle.peek(2)[:2])
    except BaseException:
        handle.close()
        raise
    return handle


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` for every line (newline stripped), 1-based.

    Raises :class:`DataFormatError` for an empty file, a truncated/corrupt gzip stream or invalid
    UTF-8, located at the line where reading failed.
    """
    number = 0
    try:
        with _open_binary(path) as handle:
            for raw in handle:
                number += 1
                if number == 1 and raw.startswith(_BOM):
                    raw = raw[len(_BOM) :]
                # Only "\n" or "\r\n" ends a line; any other "\r" is bare (module docstring).
                body = raw[:-1] if raw.endswith(b"\n") else raw
                body = body[:-1] if body.endswith(b"\r") and raw.endswith(b"\n") else body
                if b"\r" in body:
                    raise _bare_cr_error(path, number, body.index(b"\r") + 1)
                try:
                    text = body.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise DataFormatError(path, number, f"not valid UTF-8 ({error.reason})") from None
                yield number, text
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise DataFormatError(
            path, number + 1, f"truncated or corrupt gzip stream after {number} lines ({error})"
        ) from None
    if number == 0:
        raise DataFormatError(path, 1, "empty file")


def read_text(path: Path) -> str:
    """The whole file as text (plain or gzip), with the same located errors as :func:`iter_lines`."""
    chunks: list[bytes] = []
    try:
        with _open_binary(path) as handle:
            # Chunked, so a broken gzip stream can be located by the lines read before it broke.
            while chunk := handle.read(1 << 22):
                chunks.append(chunk)
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        lines = sum(chunk.count(b"\n") for chunk in chunks)
        raise DataFormatError(
            path, lines + 1, f"truncated or corrupt gzip stream after {lines} lines ({error})"
        ) from None
    data = b"".join(chunks)
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    _check_bare_cr(path, data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataFormatError(path, line, f"not valid UTF-8 ({error.reason})") from None
    if not text.strip():
        raise DataFormatError(path, 1, "empty file")
    return text


def parse_json_line(path: Path, line: int, text: str) -> dict:
    """One strict JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataFormatError(path, line, f"malformed JSON ({error.msg} at column {error.colno})") from None
    except RecursionError:
        raise DataFormatError(path, line, "malformed JSON (nested too deeply to parse)") from None
    if not isinstance(value, dict):
        raise DataFormatError(path, line, f"expected a JSON object, got {type(value).__name__}")
    return value


def _too_deep(error: BaseException) -> bool:
    """Python's parser says "too many nested parentheses"; the evaluators raise RecursionError."""
    return isinstance(error, RecursionError) or "too many nested" in str(error)


def parse_literal_line(path: Path, line: int, text: str) -> dict:
    """One Python dict literal (``{u'id': u'1', 'price': 4.99}``), via ``ast.literal_eval``.

    Strict JSON objects that use ``true``/``false``/``null`` are accepted too (users sometimes
    re-save the metadata as JSON); anything else is a located error.
    """
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as error:
        try:
            value = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as json_error:
            if _too_deep(error) or _too_deep(json_error):
                reason = "nested too deeply to parse"
            else:
                reason = getattr(error, "msg", None) or str(error) or type(error).__name__
            raise DataFormatError(path, line, f"malformed Python literal ({reason})") from None
    if not isinstance(value, dict):
        raise DataFormatError(path, line, f"expected a dict literal, got {type(value).__name__}")
    return value


def require_str(path: Path, line: int, record: dict, key: str) -> str:
    """A required, non-empty string field."""
    if key not in record or record[key] is None:
        raise DataFormatError(path, line, f"missing required field {key!r}")
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise DataFormatError(path, line, f"field {key!r} must be a non-empty string, got {value!r}")
    return value


def require_int(path: Path, line: int, record: dict, key: str) -> int:
    """A required integer field (an int, or a string of ASCII digits as Steam writes its ids)."""
    if key not in record or record[key] is None:
        raise DataFormatError(path, line, f"missing required field {key!r}")
    value = record[key]
    if isinstance(value, bool):
        raise DataFormatError(path, line, f"field {key!r} must be an integer, got {value!r}")
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise DataFormatError(path, line, f"field {key!r} is out of the int64 range, got {str(value)[:40]}")
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= _MAX_ID_DIGITS:
        return int(value)
    raise DataFormatError(path, line, f"field {key!r} must be an integer, got {value!r}")


def optional_str(path: Path, line: int, record: dict, key: str) -> str | None:
    value = record.get(key)
    if value is None or isinstance(value, str):
        return value
    raise DataFormatError(path, line, f"field {key!r} must be a string, got {type(value).__name__}")


def optional_float(path: Path, line: int, record: dict, key: str) -> float | None:
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise DataFormatError(path, line, f"field {key!r} must be a number, got {value!r}")


def optional_str_list(path: Path, line: int, record: dict, key: str) -> list[str] | None:
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise DataFormatError(path, line, f"field {key!r} must be a list of strings, got {value!r:.80}")


def optional_str_list_list(path: Path, line: int, record: dict, key: str) -> list[list[str]] | None:
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, list) and all(
        isinstance(inner, list) and all(isinstance(v, str) for v in inner) for inner in value
    ):
        return value
    raise DataFormatError(path, line, f"field {key!r} must be a list of lists of strings, got {value!r:.80}")


@dataclass(frozen=True)
class IdSequences:
    """Sequences read from ``[user] item item …`` lines (numpy int64 arrays)."""

    keys: np.ndarray  # (S,) the user id written on the line, or the 1-based line index
    lengths: np.ndarray  # (S,) items per line
    items: np.ndarray  # (sum(lengths),) item ids, line after line
    lines: np.ndarray  # (S,) the 1-based line number of each sequence

    def positions(self) -> np.ndarray:
        """0-based position of every item within its line (the ``order`` of position-only sources)."""
        starts = np.cumsum(self.lengths) - self.lengths
        return np.arange(int(self.lengths.sum()), dtype=np.int64) - np.repeat(starts, self.lengths)

    def check_items(self, path: Path, n_items: int) -> None:
        """Every item id must lie in 1..n_items; the first one that does not is a located error."""
        bad = np.flatnonzero((self.items < 1) | (self.items > n_items))
        if bad.size:
            index = int(bad[0])
            row = int(np.searchsorted(np.cumsum(self.lengths), index, side="right"))
            item = int(self.items[index])
            reason = (
                "item id 0 is reserved for padding (ids start at 1)"
                if item == 0
                else f"unknown item id {item} at line {int(self.lines[row])} (the item table has ids 1..{n_items})"
            )
            raise DataFormatError(path, int(self.lines[row]), reason)


def read_id_sequences(path: Path, with_user: bool) -> IdSequences:
    """Read one sequence per line: ``user item item …`` (``with_user``) or ``item item …``.

    Blank lines, a user with no items and repeated users are errors (a repeated user would silently
    interleave two sequences). Vectorised: one regex scan validates the characters, one numpy call
    converts every token.
    """
    text = read_text(path)
    bad = _NOT_ID_TEXT.search(text)
    if bad:
        line = text.count("\n", 0, bad.start()) + 1
        line_text = text.split("\n")[line - 1].strip()
        token = next((t for t in line_text.split() if _NOT_ID_TEXT.search(t)), bad.group())
        raise DataFormatError(path, line, f"non-integer id {token!r} (ids are positive integers)")
    rows = text.split("\n")
    if rows and rows[-1].strip() == "":
        rows.pop()  # the final newline
    tokens: list[str] = []
    lengths = np.empty(len(rows), dtype=np.int64)
    for index, row in enumerate(rows):
        parts = row.split()
        if not parts:
            raise DataFormatError(path, index + 1, "empty sequence line")
        if with_user and len(parts) == 1:
            raise DataFormatError(path, index + 1, f"empty sequence: user {parts[0]} has no items")
        tokens.extend(parts)
        lengths[index] = len(parts)
    if max(map(len, tokens)) > _MAX_ID_DIGITS:
        index = next(i for i, t in enumerate(tokens) if len(t) > _MAX_ID_DIGITS)
        line = int(np.searchsorted(np.cumsum(lengths), index, side="right")) + 1
        raise DataFormatError(path, line, f"id {tokens[index]!r} is too large for int64")
    values = np.array(tokens, dtype=np.int64)
    line_numbers = np.arange(1, len(rows) + 1, dtype=np.int64)
    if not with_user:
        return IdSequences(keys=line_numbers, lengths=lengths, items=values, lines=line_numbers)
    starts = np.cumsum(lengths) - lengths
    keys = values[starts]
    is_item = np.ones(len(values), dtype=bool)
    is_item[starts] = False
    unique, first, counts = np.unique(keys, return_index=True, return_counts=True)
    if (counts > 1).any():
        user = unique[np.flatnonzero(counts > 1)[0]]
        rows_of_user = np.flatnonzero(keys == user)
        raise DataFormatError(
            path,
            int(rows_of_user[1]) + 1,
            f"user {int(user)} appears again (first at line {int(rows_of_user[0]) + 1})",
        )
    return IdSequences(keys=keys, lengths=lengths - 1, items=values[is_item], lines=line_numbers)


def read_delimited(
    path: Path, separator: str, columns: list[str], header: list[str] | None
) -> polars.DataFrame:
    """Read a delimited file with every column as text, plus ``line``: the 1-based line of each row.

    With ``header`` the first line must start with exactly those names (extra columns are allowed
    and ignored; a row may not have more fields than the header). Without it (the official .dat
    files) ``columns`` names EVERY field, and every row must have exactly ``len(columns)``
    non-empty fields: keeping the first columns of a wider row would silently lose what the rest
    holds (a file with CR-only line ends is one wide row), so a wrong width is a located error.
    Plain files go to polars directly (memory-mapped, so the 1.4 GB ``yoochoose-clicks.dat`` is not
    copied into Python) after a chunked scan for bare carriage returns; gzip files are decompressed
    with the located errors of :func:`read_text`. Polars keeps a blank or short line as a row with
    nulls, so row ``i`` is always line ``first_row + i`` and such a line is reported where it is.
    """
    if path.stat().st_size == 0:
        raise DataFormatError(path, 1, "empty file")
    if path.suffix == ".gz":
        source: Path | bytes = read_text(path).encode()
        first_line = source.split(b"\n", 1)[0]
    else:
        source = path
        first_line = _scan_plain(path)
    first_row, width = 1, len(columns) if header is None else None
    if header is not None:
        names = first_line.decode("utf-8", errors="replace").rstrip("\r").split(separator)
        if names[: len(header)] != header:
            shown = ascii(first_line.rstrip(b"\r")[:120].decode("utf-8", errors="replace"))
            raise DataFormatError(path, 1, f"header must start with {separator.join(header)!r}, got {shown}")
        first_row, width = 2, len(names)
    try:
        frame = polars.read_csv(
            source,
            separator=separator,
            has_header=header is not None,
            infer_schema=False,
            quote_char=None,
            # Without a header the width is fixed, so a wider row is an error instead of a wider frame.
            schema=None if header is not None else {name: polars.String() for name in columns},
        )
    except polars.exceptions.PolarsError as error:
        _locate_unreadable(path, separator, first_row, width, columns if header is None else None)
        raise DataFormatError(path, None, f"unreadable delimited file ({error})") from None
    if frame.height == 0:
        raise DataFormatError(path, first_row, "no data rows")
    required = columns if header is not None else frame.columns
    frame = frame.with_columns(line=polars.int_range(first_row, first_row + frame.height, dtype=polars.Int64))
    missing = frame.filter(polars.any_horizontal(polars.col(required).is_null()))
    if missing.height:
        row = missing.row(0, named=True)
        if all(row[c] is None for c in frame.columns if c != "line"):
            raise DataFormatError(path, row["line"], "empty line")
        if header is None:
            # Polars reads a missing trailing field and an empty one alike; the line says which.
            fields = _line_text(path, row["line"]).split(separator)
            if len(fields) != len(columns):
                raise DataFormatError(path, row["line"], _width_reason(len(columns), len(fields), columns))
            column = next(c for c in columns if row[c] is None)
            raise DataFormatError(path, row["line"], f"empty value for {column!r}")
        column = next(c for c in columns if row[c] is None)
        raise DataFormatError(path, row["line"], f"missing value for {column!r} (too few fields)")
    return frame.select(*columns, "line")


def _width_reason(expected: int, got: int, names: list[str] | None) -> str:
    reason = f"expected {expected} fields, got {got}"
    return f"{reason} (the columns are {', '.join(names)})" if names else reason


def _scan_plain(path: Path) -> bytes:
    """Check a plain file polars will memory-map: not gzip, no bare CR. Returns its first line.

    Chunked, so a 1.4 GB file is never held in memory; a BOM needs nothing here (polars drops it,
    as :func:`read_text` does) but is removed from the returned first line.
    """
    with open(path, "rb") as handle:
        head = handle.read(_SCAN_CHUNK)
        _reject_gzip_named_plain(path, head)
        first_line = head.split(b"\n", 1)[0]
        first_line = first_line[len(_BOM) :] if first_line.startswith(_BOM) else first_line
        line, line_start, chunk = 1, 0, head
        while chunk:
            if chunk.endswith(b"\r"):
                chunk += handle.read(1)  # is the \r at the chunk's end followed by \n?
            _check_bare_cr(path, chunk, line, line_start)
            newlines = chunk.count(b"\n")
            last = chunk.rfind(b"\n")
            line_start = last + 1 - len(chunk) if newlines else line_start - len(chunk)
            line += newlines
            chunk = handle.read(_SCAN_CHUNK)
    return first_line


def _line_text(path: Path, line: int) -> str:
    """The text of one line (error path only: reads up to it)."""
    for number, text in iter_lines(path):
        if number == line:
            return text
    return ""


def _locate_unreadable(
    path: Path, separator: str, first_row: int, width: int | None, names: list[str] | None = None
) -> None:
    """After polars refused a file, find the first line that is not UTF-8 or has a wrong width.

    With ``names`` (a headerless file of fixed width) a line with fewer fields is wrong too: polars
    refuses a file whose rows are ALL narrower than its schema.
    """
    widths = width
    for number, line in iter_lines(path):
        if number < first_row or not line.strip():
            continue
        fields = line.split(separator)
        widths = widths or len(fields)
        if len(fields) > widths or (names is not None and len(fields) != widths):
            raise DataFormatError(path, number, _width_reason(widths, len(fields), names))


def cast_int_column(frame: polars.DataFrame, path: Path, column: str, what: str) -> polars.Series:
    """A text column of ASCII integer ids as Int64; the first bad value is a located error."""
    text = frame[column].str.strip_chars()
    ok = text.str.contains(r"^[0-9]{1,18}$")
    if not ok.all():
        row = frame.filter(~ok).row(0, named=True)
        raise DataFormatError(path, row["line"], f"non-integer {what} {row[column]!r}")
    return text.cast(polars.Int64)
