"""CSV files: one sample per line, numeric features, the label in one column (the last by default)."""
from __future__ import annotations

import csv
from typing import List, Optional, Union

import numpy as np

from .dataset import Dataset, split_all
from .folders import find_file

__all__ = ["load_csv"]


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def load_csv(spec: str, data_dir, *, label_column: Union[int, str], delimiter: str, header: Optional[bool],
              **kw) -> Dataset:
    path = find_file(spec, data_dir, ".csv", (), "CSV")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file ({e})") from e
    rows = [(i + 1, r) for i, r in enumerate(csv.reader(text.splitlines(), delimiter=delimiter))
            if r and any(f.strip() for f in r)]
    if not rows:
        raise ValueError(f"{path}: no data rows")
    width = len(rows[0][1])
    if width < 2:
        raise ValueError(f"{path}: line {rows[0][0]} has {width} column; need at least one feature and a label "
                         f"(delimiter {delimiter!r})")
    names: Optional[List[str]] = None
    if isinstance(label_column, str):
        if header is False:
            raise ValueError(f"{path}: label_column={label_column!r} is a name but header=False")
        names = [f.strip() for f in rows[0][1]]
        if label_column not in names:
            raise ValueError(f"{path}: no column {label_column!r} in the header ({', '.join(names)})")
        lc = names.index(label_column)
        header = True
    else:
        lc = int(label_column)
        if not -width <= lc < width:
            raise ValueError(f"{path}: label_column {lc} out of range for {width} columns")
        lc %= width
    if header is None:  # a header if any feature field of the first line is not a number
        header = any(not _is_number(f) for j, f in enumerate(rows[0][1]) if j != lc)
    if header:
        rows = rows[1:]
        if not rows:
            raise ValueError(f"{path}: only a header line, no data rows")
    feats = np.empty((len(rows), width - 1), dtype=np.float64)
    labels: List[str] = []
    for i, (line, r) in enumerate(rows):
        if len(r) != width:
            raise ValueError(f"{path}: line {line} has {len(r)} fields, expected {width}")
        vals = r[:lc] + r[lc + 1:]
        try:
            feats[i] = [float(v) for v in vals]
        except ValueError:
            j = next(j for j, v in enumerate(vals) if not _is_number(v))
            col = j if j < lc else j + 1
            raise ValueError(f"{path}: line {line}, column {col + 1}: feature {vals[j]!r} is not a number "
                             f"(missing values are not supported)") from None
        labels.append(r[lc].strip())
    if any(lab == "" for lab in labels):
        line = rows[labels.index("")][0]
        raise ValueError(f"{path}: line {line}: empty label")
    if all(_is_number(lab) for lab in labels):
        lv = np.array([float(lab) for lab in labels])
        y = lv.astype(np.int64) if np.all(lv == np.round(lv)) else lv
    else:
        y = np.array(labels)
    return split_all(f"csv:{path.stem}", feats, y, info={"source": [str(path)], "csv_header": bool(header),
                                                          "csv_label_column": lc}, **kw)
