"""Writing a folder so that no write destroys what it did not make: every writer of this project
(pre-baked folders, and any exporter to come) makes its output through `new_folder`.

    with new_folder(out_dir, kind="prebaked", sources=checkpoint.paths(), force=force) as folder:
        save_file(tensors, folder / "model.safetensors")   # write everything into folder
    # complete: folder is now out_dir; on an exception nothing is left and out_dir is untouched

What it guarantees:
- The files go into a temporary folder beside out_dir, `.<name>.partial-<pid>-<random>`, holding a
  marker (MARKER_NAME) that says "partial": every loader refuses it (`refuse_unfinished_write`).
  The folder is renamed to out_dir only when the block ends without an exception.
- The rename never replaces a folder that appeared after the start: on Linux it is atomic
  (renameat2 RENAME_NOREPLACE), so of two writers at once exactly one wins and the other fails
  with FileExistsError, leaving the winner's folder as it is.
- An existing out_dir is refused (FileExistsError) unless force; force replaces only a folder this
  project wrote of the same kind (a complete marker naming it, or what `also_ours` recognises:
  folders of that kind written before markers existed), and only the folder that was there at the
  start. The old folder is moved aside and deleted only once the new one is in place; if the final
  rename fails it is moved back, byte for byte as it was.
- An out_dir that is one of the sources, contains one or lies inside one is always refused
  (ValueError), with or without force.
- A killed run's temporary folder is removed by the next run onto the same out_dir when its process
  is gone (on this host), and reported with its size otherwise; a live writer of the same out_dir
  makes the next one fail at once instead of after its work.
- Failures of the file system (read-only or uncreatable parent, disk full) are one readable line:
  WriteError, an OSError, naming the folder; out_dir is left as it was.

Every finished folder keeps its marker: a machine-readable note of who wrote it, of what kind, when.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..version import __version__

log = logging.getLogger(__name__)

MARKER_NAME = "written_by_llama_int8.json"
WRITER = "llama_int8"
PARTIAL, COMPLETE, REPLACING = "partial", "complete", "replacing"
# .<name>.partial-<pid>-<random>: a folder being written; .<name>.old-<pid>-<random>: holds the old
# folder while it is being replaced.
TEMPORARY_NAME = re.compile(r"\.(?P<name>.+)\.(?P<role>partial|old)-(?P<pid>\d+)-[0-9a-f]+")
RENAME_NOREPLACE = 1
AT_FDCWD = -100
# glibc's renameat2 (2.28 and later), or None where the C library has none.
RENAMEAT2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform.startswith("linux") else None


class WriteError(OSError):
    """The file system refused a write (read-only or missing folder, disk full...): one readable line."""


@dataclass(frozen=True)
class FolderIdentity:
    """What tells one folder from another at the same path: its inode, and the id its marker holds."""
    device: int
    inode: int
    write_id: str | None


# --- Markers ---------------------------------------------------------------------------------------

def read_marker(folder: Path) -> dict | None:
    """The folder's marker, or None when it has none or it is not one of ours."""
    try:
        data = json.loads((folder / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("written_by") != WRITER or not isinstance(data.get("kind"), str):
        return None
    return data


def write_marker(folder: Path, marker: dict) -> None:
    (folder / MARKER_NAME).write_text(json.dumps(marker, indent=1) + "\n")


def folder_kind(folder: Path) -> str | None:
    """The kind of a complete folder this project wrote ("prebaked", ...), else None."""
    marker = read_marker(folder)
    return marker["kind"] if marker is not None and marker.get("state") == COMPLETE else None


def unfinished_write(path: Path) -> str | None:
    """Why path is a folder a writer has not finished (named or marked so), or None."""
    folder = path if path.is_dir() else path.parent
    marker = read_marker(folder)
    if marker is not None and marker.get("state") != COMPLETE:
        return (f"an unfinished write by llama_int8 (pid {marker.get('pid')} on {marker.get('host')}, "
                f"started {marker.get('started')}, for {marker.get('target')})")
    if TEMPORARY_NAME.fullmatch(folder.name):
        return "a temporary folder of a llama_int8 writer"
    return None


def refuse_unfinished_write(path: Path, error: type[Exception]) -> None:
    """Raise error when path is (inside) a folder a writer has not finished: a killed run's leftovers."""
    why = unfinished_write(path)
    if why is not None:
        raise error(f"{path}: {why}; it is incomplete and cannot be loaded: run the writer again "
                    "(it removes the leftovers of a killed run) or delete this folder")


# --- Writing ---------------------------------------------------------------------------------------

@contextmanager
def new_folder(out_dir: str | Path, kind: str, sources: Iterable[Path], force: bool = False,
               also_ours: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """A temporary folder to write out_dir's files into, renamed to out_dir when the block ends
    (see the module's docstring for what is refused and what is never overwritten).

    kind names what the folder holds, for its marker; sources are the files and folders the
    writer reads (out_dir may be none of them, nor contain or lie inside one); also_ours recognises
    folders of this kind written before markers existed, which force may replace too.
    """
    out = Path(out_dir)
    check_outside_sources(out, sources)
    existing = check_replaceable(out, kind, force, also_ours)
    clear_leftovers(out)
    tmp = make_temporary_folder(out, kind)
    try:
        yield tmp
        marker = read_marker(tmp) or {}
        write_marker(tmp, {**marker, "state": COMPLETE, "finished": timestamp()})
        make_readable(tmp)
        move_into_place(tmp, out, existing)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (WriteError, FileExistsError)):
            raise
        raise WriteError(f"{out}: writing failed, nothing was changed ({e})") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.debug("Wrote %s (%s)", out, kind)


def check_outside_sources(out: Path, sources: Iterable[Path]) -> None:
    """out may not be a source, contain one, or lie inside one: replacing it would destroy the source."""
    target = out.resolve()
    for source in sources:
        src = Path(source).resolve()
        what = f"source checkpoint {'file' if src.is_file() else 'folder'} {source}"
        if target == src:
            raise ValueError(f"{out}: the output folder cannot be the {what}")
        if target in src.parents:
            raise ValueError(f"{out}: the output folder cannot contain the {what}")
        if src in target.parents:
            raise ValueError(f"{out}: the output folder cannot lie inside the {what}")


def check_replaceable(out: Path, kind: str, force: bool, also_ours: Callable[[Path], bool] | None
                      ) -> FolderIdentity | None:
    """The identity of the folder force may replace at out, or None when out does not exist."""
    if TEMPORARY_NAME.fullmatch(out.name):
        raise ValueError(f"{out}: names a writer's temporary folder; choose another output folder")
    if out.is_symlink():
        raise FileExistsError(f"{out} is a symbolic link; give the folder itself (or a new path) as the output")
    if not out.exists():
        return None
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is a file, not a folder this project wrote; choose another "
                              "output folder")
    found = folder_kind(out) or (kind if also_ours is not None and also_ours(out) else None)
    if found is None:
        raise FileExistsError(f"{out} already exists and was not written by llama_int8 (it holds "
                              f"{describe_contents(out)}), so --force does not replace it either; choose another "
                              "output folder or remove it yourself")
    if found != kind:
        raise FileExistsError(f"{out} holds a {found} folder written by llama_int8, not a {kind} one, and --force "
                              "replaces only a folder of the kind being written; choose another output folder or "
                              "remove it yourself")
    if not force:
        raise FileExistsError(f"{out} already exists (a {kind} folder written by llama_int8); pass --force to "
                              "replace it")
    return identity(out)


def describe_contents(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir())
    if not names:
        return "nothing"
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def identity(folder: Path) -> FolderIdentity:
    st = folder.stat()
    marker = read_marker(folder)
    return FolderIdentity(st.st_dev, st.st_ino, marker.get("write_id") if marker else None)


def clear_leftovers(out: Path) -> None:
    """Remove what killed writers of out left beside it; fail when a writer of out is still running."""
    if not out.parent.is_dir():
        return
    for leftover in sorted(out.parent.glob(f".{out.name}.*-*")):
        m = TEMPORARY_NAME.fullmatch(leftover.name)
        if m is None or m.group("name") != out.name or not leftover.is_dir():
            continue
        marker = read_marker(leftover) or {}
        size = f"{folder_bytes(leftover) / 1024**2:.1f} MiB"
        if marker.get("host") != socket.gethostname() or not isinstance(marker.get("pid"), int):
            log.warning("%s (%s) is left from an unfinished write of %s on another machine, or of unknown "
                        "origin; delete it if no writer is running", leftover, size, out)
        elif process_alive(marker["pid"]):
            raise FileExistsError(f"{out}: another writer (pid {marker['pid']}, since {marker.get('started')}) is "
                                  f"writing it in {leftover}; wait for it to end, or stop it")
        elif m.group("role") == "old":
            restore_or_remove_old(leftover, out, size)
        else:
            shutil.rmtree(leftover, ignore_errors=True)
            log.info("Removed %s (%s), left by a writer of %s that was stopped (pid %d)", leftover, size, out,
                     marker["pid"])


def restore_or_remove_old(aside: Path, out: Path, size: str) -> None:
    """A writer stopped while replacing out: its old folder goes back if out is missing, else away."""
    old = aside / out.name
    if old.is_dir() and not out.exists():
        rename_no_replace(old, out)
        log.warning("Put back %s from %s: a writer stopped while replacing it", out, aside)
    else:
        log.info("Removed %s (%s): the old copy of %s, replaced by a writer that was stopped", aside, size, out)
    shutil.rmtree(aside, ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def folder_bytes(folder: Path) -> int:
    return sum(f.lstat().st_size for f in folder.rglob("*") if not f.is_dir())


def make_temporary_folder(out: Path, kind: str) -> Path:
    """.<name>.partial-<pid>-<random> beside out, created with its "partial" marker."""
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        write_marker(tmp, {"written_by": WRITER, "kind": kind, "state": PARTIAL, "write_id": secrets.token_hex(8),
                           "target": str(out.resolve()), "pid": os.getpid(), "host": socket.gethostname(),
                           "started": timestamp(), "version": __version__})
    except OSError as e:
        raise WriteError(f"{parent}: cannot create the output folder there ({e.strerror or e})") from e
    return tmp


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def make_readable(folder: Path) -> None:
    """The usual permissions for the folder and its files (safetensors writes them private)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def move_into_place(tmp: Path, out: Path, existing: FolderIdentity | None) -> None:
    """Rename tmp to out. existing None: out must still not exist; else out must still be that
    folder, which is moved aside, deleted once tmp is in place, and moved back if that fails."""
    if existing is None:
        try:
            rename_no_replace(tmp, out)
        except FileExistsError:
            raise FileExistsError(f"{out} appeared while this run was writing it (another writer?); it is left "
                                  "as it is and this run's output is discarded") from None
        return
    if identity(out) != existing:
        raise FileExistsError(f"{out} was replaced by someone else while this run was writing; it is left as it is "
                              "and this run's output is discarded")
    aside = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    aside.mkdir()
    write_marker(aside, {"written_by": WRITER, "kind": "old", "state": REPLACING, "target": str(out.resolve()),
                         "pid": os.getpid(), "host": socket.gethostname(), "started": timestamp()})
    old = aside / out.name
    os.rename(out, old)
    try:
        if identity(old) != existing:  # another writer put its folder there since the check above
            raise FileExistsError(f"{out} was replaced by someone else while this run was writing; it is left as "
                                  "it is and this run's output is discarded")
        rename_no_replace(tmp, out)
    except BaseException:
        put_back(old, out)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def put_back(old: Path, out: Path) -> None:
    try:
        rename_no_replace(old, out)
    except FileExistsError:
        raise FileExistsError(f"{out} appeared while it was being replaced; the folder that was there before is "
                              f"kept at {old}") from None


def rename_no_replace(src: Path, dst: Path) -> None:
    """Rename src to dst, raising FileExistsError if dst exists, atomically where the system can
    (Linux renameat2); elsewhere os.rename, which refuses a non-empty folder but not an empty one."""
    if RENAMEAT2 is not None:
        if RENAMEAT2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            raise FileExistsError(code, os.strerror(code), str(dst))
        if code not in (errno.ENOSYS, errno.EINVAL):  # those two: this file system cannot; fall back below
            raise OSError(code, os.strerror(code), str(src), None, str(dst))
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from e
        raise
