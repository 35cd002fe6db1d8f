"""Bad input data: negative costs and fully duplicated rows are bad rows (counted by reason); corrupt or
truncated .csv.gz / .parquet and list/struct columns are one line naming the file (CLI in-process)."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mtorl.cli import main
from mtorl.data.errors import DataError
from mtorl.data.prepare import prepare
from tests.unit.test_data_converters import JFMT, _invariant, journeys_rows, quiet, spec, write_table


def _rows() -> list[dict[str, Any]]:
    return journeys_rows()


def test_negative_cost_and_duplicate_rows_are_bad_rows(tmp_path: Path) -> None:
    rows = _rows()
    rows[3]["cost"] = -0.5
    rows.insert(8, dict(rows[7]))  # row 9 repeats row 8 in every column
    rows.append(dict(rows[0]))  # the last row repeats the first
    inp = write_table(tmp_path / "j.csv", list(rows[0]), [list(r.values()) for r in rows])
    with pytest.raises(DataError, match=r"row 4 .*field 'cost': negative cost \(value '-0.5'\)"):
        prepare(spec(tmp_path, "journeys", inp, journeys=JFMT), progress=quiet)
    m = prepare(spec(tmp_path, "journeys", inp, journeys=JFMT, on_bad_rows="quarantine"), progress=quiet)
    _invariant(m)
    assert {k: v for k, v in m.rows_dropped.items() if k.startswith("bad_row")} == {
        "bad_row:cost": 1,
        "bad_row:duplicate_row": 2,
    }
    q = pq.read_table(tmp_path / "ds" / m.quarantine.files[0])
    assert sorted(zip(q.column("_row").to_pylist(), q.column("_field").to_pylist())) == [
        (4, "cost"),
        (9, "duplicate_row"),
        (len(rows), "duplicate_row"),
    ]


def _csv_bytes() -> bytes:
    rows = _rows()
    return (",".join(rows[0]) + "\n" + "".join(",".join(str(v) for v in r.values()) + "\n" for r in rows)).encode()


def _parquet_bytes(**extra: Any) -> bytes:
    rows = _rows()
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    cols.update(extra)
    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf)
    return buf.getvalue()


def _gz(data: bytes) -> bytes:
    return gzip.compress(data)


N = len(_rows())
BAD_FILES: list[tuple[str, bytes, str]] = [
    ("truncated.csv.gz", _gz(_csv_bytes())[:-40], "corrupt or truncated CSV file"),
    ("half.csv.gz", _gz(_csv_bytes())[: len(_gz(_csv_bytes())) // 2], "corrupt or truncated CSV file"),
    ("notgzip.csv.gz", b"this is not gzip at all\n" * 20, "corrupt or truncated CSV file"),
    (
        "flipped.csv.gz",
        (lambda b: b[:30] + bytes([b[30] ^ 0xFF]) + b[31:])(_gz(_csv_bytes())),
        "corrupt or truncated CSV file",
    ),
    ("truncated.parquet", _parquet_bytes()[:-100], "corrupt or truncated Parquet file"),
    ("garbage.parquet", b"PAR1" + b"\x00" * 64, "corrupt or truncated Parquet file"),
    ("empty.parquet", b"", "corrupt or truncated Parquet file"),
    ("list.parquet", _parquet_bytes(price=[[1.0, 2.0]] * N), "column 'price' holds list<"),
    ("struct.parquet", _parquet_bytes(age=[{"a": 1}] * N), "column 'age' holds struct<a: int64> values"),
    ("listuid.parquet", _parquet_bytes(user_id=[["u"]] * N), "column 'user_id' holds list<"),
    ("empty.csv", b"", "empty file"),
    ("ragged.csv", b"user_id,timestamp,channel\nu1,1\n", "malformed CSV"),
]


@pytest.mark.parametrize("name,data,needle", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_input_file_is_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, data: bytes, needle: str
) -> None:
    f = tmp_path / name
    f.write_bytes(data)
    code = main(
        [
            "prepare",
            "--source",
            "journeys",
            "--input",
            str(f),
            "--output",
            str(tmp_path / "ds"),
            "--set",
            f"spec.journeys={json.dumps(JFMT.model_dump())}",
        ]
    )
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: {f}: ") and needle in lines[0], lines[0]
    assert not (tmp_path / "ds" / "manifest.json").exists()
