"""Results on disk: one JSONL file per suite, one row per case, appended as each case finishes.

Re-running with the same output directory skips the ids already there (resumable; a line cut
short by a crash is ignored). `meta.json` records what makes rows comparable -- the model, the
haystack corpus and the cache floor -- and a later run with another is refused rather than
mixed in (a row's id names none of them, so its rows would be resumed as if they matched).
"""

from __future__ import annotations

import json
from pathlib import Path


class ResultStore:
    """`<out>/<suite>.jsonl`: read once, appended to row by row."""

    def __init__(self, out: Path, suite: str) -> None:
        self.path = out / f"{suite}.jsonl"
        self._rows = {row["id"]: row for row in _read(self.path)}

    def __contains__(self, row_id: str) -> bool:
        return row_id in self._rows

    def add(self, row: dict) -> None:
        """Appends `row` (with its "id") and flushes, so a crash loses at most this row."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a+b") as file:
            if file.tell() > 0:  # after a crash the last line may lack its newline
                file.seek(-1, 2)
                if file.read(1) != b"\n":
                    file.write(b"\n")
            file.write((json.dumps(row, sort_keys=True) + "\n").encode())
        self._rows[row["id"]] = row

    def rows(self) -> list[dict]:
        return list(self._rows.values())


def _read(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the last line of an interrupted run
        if isinstance(row, dict) and "id" in row:
            rows.append(row)
    return rows


def check_meta(out: Path, meta: dict[str, object]) -> None:
    """Writes `<out>/meta.json`, or raises ValueError when the directory holds results made
    with a different model, corpus, dtype or cache floor (the same keys with other values; a
    key the old file lacks is added)."""
    path = out / "meta.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
        for key, value in meta.items():
            if key in old and old[key] != value:
                raise ValueError(
                    f"{out} holds results made with {key} {old[key]!r}, not {value!r}: "
                    "choose another --out"
                )
        meta = {**old, **meta}
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
