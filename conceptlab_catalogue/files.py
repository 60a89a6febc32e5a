"""Atomic files and hashes.

A file is written to a temporary name in its own folder, flushed to disk, then renamed over the
final name (``os.replace`` is atomic on POSIX and Windows), and the folder is flushed too: after
a crash the file is either whole or absent, never half written.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)


def write_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=str(path.parent))
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)      # mkstemp makes 0600; the file is an ordinary output
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(str(path.parent), os.O_RDONLY)
    except OSError:   # Windows: folders cannot be opened
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def safetensors_payload_hash(data: bytes) -> str:
    """The hash of a .safetensors file's tensors (names, shapes, types and bytes), leaving out
    its free-text metadata. A concept file's metadata holds the extraction's wall time, so two
    runs that found the same neurons write files with different hashes but the same payload hash."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
    except (struct.error, ValueError):
        return sha256(data)
    header.pop("__metadata__", None)
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    h.update(data[8 + n:])
    return h.hexdigest()
