"""Files written safely: atomic writes that never overwrite silently, JSON, content hashes."""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from contextlib import suppress
from pathlib import Path
from typing import Any, BinaryIO, Callable

# atomic_write's temporary names: ".<target name>.<12 hex digits>.tmp" beside the target.
_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")


def atomic_write(
    path: str | os.PathLike, write_fn: Callable[[BinaryIO], Any], overwrite: bool = False
) -> Path:
    """Write a file atomically: ``write_fn`` fills a binary file object, then it is moved into place.

    The temporary file lives in the target folder so the final move is a same-filesystem
    rename. Parent folders are created. Without ``overwrite`` an existing target raises
    :class:`FileExistsError` and is left untouched; the final step is a hard link, which
    fails atomically even if another writer created the target meanwhile. On any error
    the temporary file is removed. Returns the target path.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(exists_message(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")  # _TEMPORARY's pattern
    # os.open with 0o666 (not mkstemp's 0o600) so the result gets the usual umask permissions.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(exists_message(path)) from None
    except OSError as err:
        if err.filename is None:  # write() and fsync() errors, a full disk among them, name no file
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    finally:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


def remove_temporaries(folder: str | os.PathLike) -> None:
    """Delete the temporary files atomic_write left anywhere under ``folder`` (a killed writer runs no
    cleanup). Only names of atomic_write's pattern are touched; symbolic links to folders are not followed."""
    for parent, _, names in os.walk(folder):
        for name in filter(_TEMPORARY.fullmatch, names):
            with suppress(FileNotFoundError):
                os.unlink(os.path.join(parent, name))


def exists_message(path: Path) -> str:
    return f"{path} exists; pass overwrite=True to replace it"


def save_json(obj: Any, path: str | os.PathLike, overwrite: bool = False, indent: int | None = 2,
              allow_nan: bool = True, sort_keys: bool = False) -> Path:
    """Write ``obj`` as UTF-8 JSON through :func:`atomic_write`. ``allow_nan=False`` refuses NaN/inf
    (strict JSON) instead of writing the non-standard ``NaN``; ``sort_keys`` makes the bytes independent of
    insertion order."""
    data = json.dumps(obj, indent=indent, allow_nan=allow_nan, sort_keys=sort_keys).encode("utf-8")
    return atomic_write(path, lambda f: f.write(data), overwrite)


def save_csv(rows: list[dict], fields: list[str], path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``rows`` as a CSV with the header ``fields`` (a missing field is empty) through :func:`atomic_write`."""
    import csv
    import io

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields, restval="")
    writer.writeheader()
    writer.writerows(rows)
    data = text.getvalue().encode("utf-8")
    return atomic_write(path, lambda f: f.write(data), overwrite)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
