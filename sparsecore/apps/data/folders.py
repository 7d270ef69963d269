"""Where the readers look for data files: ``data_dir``, or ``$SPARSECORE_DATA``, ``./data`` and ``shared/data``
beside a source checkout."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

__all__ = ["PathLike", "default_data_dirs", "search_dirs", "find_file"]

PathLike = Union[str, "os.PathLike[str]"]


def default_data_dirs() -> List[Path]:
    """Folders searched when ``data_dir`` is None: ``$SPARSECORE_DATA`` (os.pathsep-separated), ``./data``,
    and ``shared/data`` beside the source checkout (``<repo>/../shared/data``), those that exist."""
    dirs: List[Path] = []
    env = os.environ.get("SPARSECORE_DATA")
    if env:
        dirs += [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    dirs.append(Path.cwd() / "data")
    dirs.append(Path(__file__).resolve().parents[4] / "shared" / "data")
    out: List[Path] = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


def search_dirs(data_dir: Optional[PathLike]) -> Tuple[List[Path], bool]:
    if data_dir is not None:
        return [Path(data_dir).expanduser()], True
    return default_data_dirs(), False


def find_file(spec: str, data_dir, suffix: str, subdirs: Sequence[str], what: str) -> Path:
    p = Path(spec).expanduser()
    if p.is_file():
        return p
    roots, explicit = search_dirs(data_dir)
    names = [spec] if spec.lower().endswith(suffix) else [spec, spec + suffix]
    folders: List[Path] = []
    if not p.is_absolute():
        for r in roots:
            folders += [r] + [r / s for s in subdirs]
    for folder in folders:
        if not folder.is_dir():
            continue
        for nm in names:
            if (folder / nm).is_file():
                return folder / nm
        lower = {nm.lower() for nm in names}
        for f in sorted(folder.iterdir()):
            if f.name.lower() in lower and f.is_file():
                return f
    avail = sorted({f.name for d in folders if d.is_dir() for f in d.iterdir() if f.name.lower().endswith(suffix)})
    where = ", ".join(str(f) for f in folders) if folders else "(absolute path, no search)"
    hint = "" if explicit or p.is_absolute() else " (pass data_dir=... or set SPARSECORE_DATA)"
    msg = f"{what} file not found: {spec!r}; looked for {' or '.join(names)} as a path and in: {where}{hint}"
    if avail:
        msg += f"; available there: {', '.join(avail)}"
    raise FileNotFoundError(msg)

