"""Results on disk, read and written by both sides: metrics.csv and repeats.csv (written atomically), and the
generated sections of a README. Neither torch nor a model is imported here: the engine writes rows through it and
the report reads them back, years later if need be.

Each metric declares whether lower or higher is better (`BETTER`), and field names carry their units.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path

from .errors import UserError
from .measure import records
from .measure.repeats import SAMPLE_COLUMNS

# The cell's identity first, then every record's fields (`peft_bench.measure.records`), then bookkeeping.
IDENTITY = ["method", "workload", "device", "status", "reason", "options", "method_config", "pretrained", "task",
            "family", "batch_size", "seq_len", "lr", "seed", "train_steps", "split", "tokenizer",
            "width", "depth", "vary", "vary_value",  # these four: a sweep's point (empty otherwise)
            "gradient_checkpointing"]  # True when asked (--gradient-checkpointing), else empty
BOOKKEEPING = ["suite", "cell_seconds", "cell_key"]
COLUMNS = IDENTITY + records.columns() + BOOKKEEPING
TEXT = {"method", "workload", "device", "status", "reason", "options", "method_config", "pretrained", "task", "family",
        "split", "tokenizer", "suite", "cell_key", "vary", *records.text_columns()}
REQUIRED = {"method", "workload", "status", "cell_key"}
BETTER = records.better()


# -- the CSV ------------------------------------------------------------------------------------------------
def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, fsync, then rename: readers never see a partial file. The file gets
    the mode any other new file gets (0666 less the umask, as the PNGs do), not mkstemp's private 0600."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_rows(path: Path, rows: list[dict]) -> None:
    extra = sorted({k for r in rows for k in r} - set(COLUMNS))
    _write_table(path, COLUMNS + extra, rows)


def _write_table(path: Path, columns: list[str], rows: list[dict]) -> None:
    """A CSV with exactly `columns` (other keys left out, None written empty), written atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def write_samples(path: Path, samples: list[dict]) -> None:
    """repeats.csv: one row per cell × repeat (the timing of each fresh process)."""
    _write_table(path, SAMPLE_COLUMNS, samples)


SERVING_KEYS = ["run_id", "cell_key", "method", "workload", "repeat", "used"]


def serving_columns() -> list[str]:
    import dataclasses

    from .measure.records import ServingRecord

    return SERVING_KEYS + [f.name for f in dataclasses.fields(ServingRecord)]


def write_serving(path: Path, rows: list[dict]) -> None:
    """serving.csv: one row per serving measurement (`peft_bench.engine.serve`), every repeat's."""
    _write_table(path, serving_columns(), rows)


def read_serving(path: Path) -> list[dict]:
    """Rows of an existing serving.csv ([] if none); a file that is not one is refused, untouched."""
    if not path.exists():
        return []
    header, rows = _read_csv(path)
    if not set(SERVING_KEYS) <= header:
        raise _malformed(path, "not a serving file")
    return rows


def _read_csv(path: Path) -> tuple[set[str], list[dict]]:
    """(header, rows) of a CSV; one that does not parse is refused, untouched."""
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            return set(reader.fieldnames or []), rows
    except (csv.Error, UnicodeDecodeError) as e:
        raise _malformed(path, str(e)) from None


def read_samples(path: Path) -> list[dict]:
    """Rows of an existing repeats.csv ([] if none); a file that is not one of ours is refused, untouched."""
    if not path.exists():
        return []
    header, rows = _read_csv(path)
    if not {"cell_key", "repeat", "step_time_s"} <= header or any(None in r for r in rows):
        raise _malformed(path, "not a repeats file")
    return rows


def read_environment(out: Path) -> dict:
    """A results folder's environment.json ({} if none); one that does not parse is refused in one line."""
    import json

    path = Path(out) / "environment.json"
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        raise UserError(f"{path} is not valid JSON; remove it or re-run") from None


def read_header(path: Path) -> set[str]:
    """The column names of an existing CSV (an empty set if none)."""
    return _read_csv(path)[0] if path.exists() else set()


def read_rows(path: Path) -> list[dict]:
    """Rows of an existing metrics.csv ([] if none). A file that is not one of ours is refused, untouched."""
    if not path.exists():
        return []
    header, rows = _read_csv(path)
    if not REQUIRED <= header:
        raise _malformed(path, f"missing columns {', '.join(sorted(REQUIRED - header))}")
    if any(None in r or not r.get("cell_key") for r in rows):
        raise _malformed(path, "a row has the wrong number of fields or no cell_key")
    return rows


def _malformed(path: Path, why: str) -> UserError:
    return UserError(f"{path} is not a peft-bench metrics file ({why}); it is left untouched — to run into this "
                     "folder, move it away (or pass --out with another directory)")


def update_readme(readme: Path, block: str, markers: tuple[str, str]) -> None:
    """Replace the README's generated section between `markers` with `block`."""
    begin, end = markers
    text = readme.read_text()
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        raise UserError(f"{readme} has no '{begin} ... {end}' section to replace")
    atomic_write_text(readme, text[:i] + block + text[j + len(end):])


# -- the output directory -----------------------------------------------------------------------------------
def check_out_dir(path: Path) -> Path:
    """Refuse an output path that is a file, lies under a file, is not writable, or contains '..'."""
    path = Path(path)
    if ".." in path.parts:
        raise UserError(f"output directory {str(path)!r} must not contain '..'")
    if path.exists() and not path.is_dir():
        raise UserError(f"output directory {str(path)!r} is a file; pass --out with a directory")
    parent = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        raise UserError(f"output directory {str(path)!r} lies under the file {str(parent)!r}")
    if not os.access(parent, os.W_OK):
        raise UserError(f"output directory {str(path)!r} is not writable")
    return path


def prepare_out_dir(path: Path) -> Path:
    """Create the (checked) output directory."""
    path = check_out_dir(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output directory {str(path)!r}: {e.strerror}") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"output directory {str(path)!r} is not writable")
    return path
