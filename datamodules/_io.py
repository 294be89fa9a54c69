"""Located readers shared by the dataset parsers (amazon.py, steam.py, yoochoose.py).

Every problem in a raw file becomes a :class:`~recbench.data.DataFormatError` naming the file, the
line (1-based) and the reason, never a traceback from inside gzip, json, ast or polars:

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

# Anything outside this set in an id-sequence file is an error (see read_id_sequences).
_NOT_ID_TEXT = re.compile(r"[^0-9 \t\r\n]")
# int64 holds every 18-digit number; longer tokens are rejected instead of overflowing.
_MAX_ID_DIGITS = 18


def _open_binary(path: Path) -> io.BufferedIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


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
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise DataFormatError(path, number, f"not valid UTF-8 ({error.reason})") from None
                yield number, text.rstrip("\r\n")
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
    if not isinstance(value, dict):
        raise DataFormatError(path, line, f"expected a JSON object, got {type(value).__name__}")
    return value


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
        except json.JSONDecodeError:
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
    and ignored). Without it the first ``len(columns)`` fields of every row are named ``columns``
    (the official .dat files). Plain files go to polars directly (memory-mapped, so the 1.4 GB
    ``yoochoose-clicks.dat`` is not copied into Python); gzip files are decompressed with the
    located errors of :func:`read_text`. Polars keeps a blank or short line as a row with nulls, so
    row ``i`` is always line ``first_row + i`` and such a line is reported where it is.
    """
    if path.stat().st_size == 0:
        raise DataFormatError(path, 1, "empty file")
    source: Path | bytes = read_text(path).encode() if path.suffix == ".gz" else path
    first_row, width = 1, None
    if header is not None:
        if isinstance(source, bytes):
            first_line = source.split(b"\n", 1)[0].decode()
        else:
            with open(path, "rb") as handle:
                first_line = handle.readline().decode("utf-8", errors="replace")
        names = first_line.rstrip("\r\n").split(separator)
        if names[: len(header)] != header:
            raise DataFormatError(
                path, 1, f"header must start with {separator.join(header)!r}, got {first_line.rstrip()!r}"
            )
        first_row, width = 2, len(names)
    try:
        frame = polars.read_csv(
            source, separator=separator, has_header=header is not None, infer_schema=False, quote_char=None
        )
    except polars.exceptions.PolarsError as error:
        _locate_unreadable(path, separator, first_row, width)
        raise DataFormatError(path, None, f"unreadable delimited file ({error})") from None
    if frame.height == 0:
        raise DataFormatError(path, first_row, "no data rows")
    if header is None:
        if frame.width < len(columns):
            raise DataFormatError(path, 1, f"expected at least {len(columns)} fields, got {frame.width}")
        frame = frame.rename(dict(zip(frame.columns[: len(columns)], columns, strict=False)))
    frame = frame.select(columns).with_columns(
        line=polars.int_range(first_row, first_row + frame.height, dtype=polars.Int64)
    )
    missing = frame.filter(polars.any_horizontal(polars.col(columns).is_null()))
    if missing.height:
        row = missing.row(0, named=True)
        if all(row[c] is None for c in columns):
            raise DataFormatError(path, row["line"], "empty line")
        column = next(c for c in columns if row[c] is None)
        raise DataFormatError(path, row["line"], f"missing value for {column!r} (too few fields)")
    return frame


def _locate_unreadable(path: Path, separator: str, first_row: int, width: int | None) -> None:
    """After polars refused a file, find the first line that is not UTF-8 or has too many fields."""
    widths = width
    for number, line in iter_lines(path):
        if number < first_row or not line.strip():
            continue
        fields = line.split(separator)
        widths = widths or len(fields)
        if len(fields) > widths:
            raise DataFormatError(path, number, f"expected {widths} fields, got {len(fields)}")


def cast_int_column(frame: polars.DataFrame, path: Path, column: str, what: str) -> polars.Series:
    """A text column of ASCII integer ids as Int64; the first bad value is a located error."""
    text = frame[column].str.strip_chars()
    ok = text.str.contains(r"^[0-9]{1,18}$")
    if not ok.all():
        row = frame.filter(~ok).row(0, named=True)
        raise DataFormatError(path, row["line"], f"non-integer {what} {row[column]!r}")
    return text.cast(polars.Int64)
