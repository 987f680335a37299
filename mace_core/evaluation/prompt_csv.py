"""User-supplied prompt CSVs: I2P (explicit suite) and MS-COCO captions (coco suite).

Expected columns (a header row, comma-separated, UTF-8; other columns are ignored):

- I2P (``explicit``): ``prompt`` required; ``sd_seed``, ``sd_guidance_scale``,
  ``sd_image_width``, ``sd_image_height`` used when present (the public I2P CSV has them);
  ``categories`` is carried into the per-image scores.
- COCO (``coco``): ``caption`` required; ``image_id`` used when present (it names the images
  and keeps rows apart when one image has several captions).

A missing file, a missing column or an unparsable number is one ``EvalInputError`` line that
names the file (and the line and column).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from mace_core.evaluation.errors import EvalInputError

I2P_COLUMN = "prompt"  # required
I2P_OPTIONAL = ("sd_seed", "sd_guidance_scale", "sd_image_width", "sd_image_height", "categories")
COCO_COLUMN = "caption"  # required
COCO_OPTIONAL = ("image_id",)


@dataclass(frozen=True)
class CsvPrompt:
    """One usable row of a prompt CSV."""

    line: int  # line number in the file (the header is line 1)
    text: str
    key: str  # what keeps identical texts apart: image_id, else the line number
    seed: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    categories: str = ""  # I2P
    image_id: str = ""  # COCO


def read_csv_rows(
    path: str | Path, required: tuple[str, ...], optional: tuple[str, ...], what: str
) -> tuple[list[tuple[int, dict[str, str]]], set[str]]:
    """(line number, row) pairs and the header's known columns; checks ``required`` columns."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise EvalInputError(f"{what} {str(path)!r} does not exist or is not a file")
    try:
        with p.open(newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets write a BOM
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            missing = [c for c in required if c not in header]
            if missing:
                raise EvalInputError(
                    f"{what} {str(path)!r} lacks column(s) {', '.join(missing)} "
                    f"(required: {', '.join(required)}; optional: {', '.join(optional)}; "
                    f"found: {', '.join(header) or 'no header'})"
                )
            # reader.line_num is the physical line just read: right even for quoted newlines.
            rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise EvalInputError(f"{what} {str(path)!r} cannot be read: {e}") from None
    return rows, set(header) & set(required + optional)


def _number(row: dict[str, str], col: str, kind: type, where: str) -> int | float | None:
    raw = (row.get(col) or "").strip()
    if not raw or raw.lower() == "nan":
        return None
    try:
        if kind is int:
            try:
                return int(raw)
            except ValueError:  # "42.0" as some spreadsheets write it
                value = float(raw)
                if not value.is_integer():
                    raise
                return int(value)
        return float(raw)
    except ValueError:
        raise EvalInputError(
            f"{where}: column {col!r} is not a{'n integer' if kind is int else ' number'}: {raw!r}"
        ) from None


def _guidance(row: dict[str, str], where: str) -> float | None:
    """A row's CFG scale, or None when absent: finite and >= 0, as --guidance-scale must be
    (a row's own scale wins over it: -inf here was used unchecked, and the eval completed)."""
    value = _number(row, "sd_guidance_scale", float, where)
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise EvalInputError(
            f"{where}: column 'sd_guidance_scale' is {value}: a guidance scale is a finite number >= 0"
        )
    return value


def _size(row: dict[str, str], col: str, where: str) -> int | None:
    """An image side of a row: a positive multiple of 8 (the VAE's), or None when absent;
    refused here, naming the file and line, not once the workers meet it."""
    value = _number(row, col, int, where)
    if value is None:
        return None
    if value <= 0 or value % 8:
        raise EvalInputError(f"{where}: column {col!r} is {value}: an image side is a positive multiple of 8")
    return int(value)


def _rows_with_text(
    path: str | Path, column: str, optional: tuple[str, ...], what: str
) -> tuple[list[tuple[int, dict[str, str], str]], int]:
    """(line number, row, text) of every row whose ``column`` has text (spaces folded) and the
    number of rows skipped for an empty one; a file without any text is an EvalInputError."""
    rows, _ = read_csv_rows(path, (column,), optional, what)
    out, skipped = [], 0
    for line, row in rows:
        text = " ".join((row.get(column) or "").split())
        if not text:
            skipped += 1
            continue
        out.append((line, row, text))
    if not out:
        raise EvalInputError(f"{what} {str(path)!r} has no non-empty {column}")
    return out, skipped


def read_i2p_csv(path: str | Path) -> tuple[list[CsvPrompt], int]:
    """I2P prompts (explicit suite, paper Sec. 4) and the number of rows skipped for an empty prompt."""
    rows, skipped = _rows_with_text(path, I2P_COLUMN, I2P_OPTIONAL, "I2P prompts CSV")
    out = []
    for line, row, text in rows:
        where = f"{path}:{line}"
        out.append(
            CsvPrompt(
                line=line,
                text=text,
                key=f"line{line}",
                seed=_number(row, "sd_seed", int, where),
                guidance=_guidance(row, where),
                width=_size(row, "sd_image_width", where),
                height=_size(row, "sd_image_height", where),
                categories=(row.get("categories") or "").strip(),
            )
        )
    return out, skipped


def read_coco_csv(path: str | Path) -> tuple[list[CsvPrompt], int]:
    """MS-COCO captions (coco suite, paper Sec. 4) and the number of rows skipped for an empty caption."""
    rows, skipped = _rows_with_text(path, COCO_COLUMN, COCO_OPTIONAL, "COCO captions CSV")
    out = []
    for line, row, text in rows:
        image_id = (row.get("image_id") or "").strip()
        # Several captions share an image_id: the line number keeps their seeds apart.
        key = f"{image_id}-line{line}" if image_id else f"line{line}"
        out.append(CsvPrompt(line=line, text=text, key=key, image_id=image_id))
    return out, skipped
