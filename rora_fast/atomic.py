"""Atomic, verified writes: the adapter folders under :mod:`rora_fast.persistence` (what
they hold is decided there) and every single file rora-fast writes (results, plots,
cache entries).

**Atomic.** :func:`atomic_write_dir` writes the whole folder into a temporary sibling
(``.<name>.rora-tmp-<pid>-<rand>``, same parent directory), fsyncs every file and the
folder, then swaps it in by rename: an existing target is renamed to
``.<name>.rora-old-<pid>-<rand>``, the new folder to the target (the commit point), and
the old one is removed. A process killed at any instant leaves either the previous folder
or the new one complete under the target name -- or, killed between the two renames, no
target and the complete previous folder under its backup name, which the next save or
load of that target renames back (:func:`recover`). Temporaries of dead processes are
removed by the next save or load of the same target; a save that fails with an exception
removes its own. A target folder holding files the save would not write is refused (the
swap would drop them). Saves hold an exclusive ``flock`` on the parent folder, loads a
shared one: concurrent writers and readers are serialised.

**Single files** (results, plots, cache entries): :func:`atomic_write_file` writes into a
unique hidden temporary sibling (``.<name>.rora-tmp-<pid>-<rand>``, without the target's
extension, so that readers listing ``*.json`` never see a write in progress), fsyncs it
and renames it over the target, so a reader sees the old file or the new one, never a
part; a failed write removes its temporary and leaves the old file. :func:`write_text`, :func:`write_json` and
:func:`save_figure` are the common cases.

**Verified.** :func:`tensor_checksum` (XXH3-64 over dtype, shape and bytes) and the
checks that raise :class:`AdapterIntegrityError` naming the file and the tensor.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

__all__ = ["AdapterIntegrityError", "tensor_checksum", "recover", "atomic_write_dir",
           "atomic_write_file", "write_text", "write_json", "save_figure"]

_TMP_TAG = ".rora-tmp-"
_OLD_TAG = ".rora-old-"
_ACTIVE: set = set()  # temporaries this process is writing right now


class AdapterIntegrityError(ValueError):
    """A saved adapter that does not verify: a tensor that does not match its checksum,
    a config from another save, a file that does not parse."""


# ---------------------------------------------------------------------- checksums
def _xxh():
    import xxhash

    return xxhash.xxh3_64()


def tensor_checksum(t: torch.Tensor) -> str:
    """XXH3-64 of a tensor's dtype, shape and raw bytes (hex)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    h = _xxh()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _bytes_checksum(data: bytes) -> str:
    h = _xxh()
    h.update(data)
    return h.hexdigest()


def _verify_checksums(tensors: Dict[str, torch.Tensor], sums: Dict[str, str],
                      file: Path) -> None:
    missing = sorted(set(sums) - set(tensors))
    extra = sorted(set(tensors) - set(sums))
    if missing or extra:
        raise AdapterIntegrityError(f"{file}: tensors {missing} are recorded but missing, "
                                    f"{extra} present but not recorded")
    for name in sorted(tensors):
        if tensor_checksum(tensors[name]) != sums[name]:
            raise AdapterIntegrityError(f"{file}: tensor {name!r} does not match its "
                                        "checksum (the file is corrupted or was modified)")


def _read_safetensors(file: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # truncated, garbage, bad header
        raise AdapterIntegrityError(f"{file}: not a readable safetensors file ({e})") from e
    return tensors, meta


# ---------------------------------------------------------------------- atomic folders
def _fsync_path(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory
                                               else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _temp_kind(target: Path, entry: str) -> Optional[Tuple[str, int]]:
    """``("tmp" | "old", pid)`` when ``entry`` is one of our temporaries for ``target``."""
    prefix = "." + target.name
    if not entry.startswith(prefix):
        return None
    rest = entry[len(prefix):]
    for tag, kind in ((_TMP_TAG, "tmp"), (_OLD_TAG, "old")):
        if rest.startswith(tag):
            pid = rest[len(tag):].split("-", 1)[0]
            if pid.isdigit():
                return kind, int(pid)
    return None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, not ours
        return True
    return True


def recover(target: Union[str, Path]) -> None:
    """Finish or undo what an interrupted save left beside ``target``: when the target
    is missing and a previous version sits under its backup name (killed between the two
    renames), rename it back; remove every other temporary of a dead process (or of
    this process, not in use). Called by every save and load of ``target``."""
    target = Path(os.path.abspath(target))
    parent = target.parent
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    stale: List[Tuple[str, Path]] = []
    for e in entries:
        kind = _temp_kind(target, e.name)
        if kind is None or str(e) in _ACTIVE:
            continue
        if kind[1] != os.getpid() and _pid_alive(kind[1]):
            continue
        stale.append((kind[0], e))
    if not stale:
        return
    if not os.path.lexists(target):
        backups = sorted((e for k, e in stale if k == "old"),
                         key=lambda e: e.stat().st_mtime if e.exists() else 0, reverse=True)
        for b in backups:
            try:
                os.rename(b, target)
            except OSError:
                continue
            _fsync_path(parent, directory=True)
            stale = [(k, e) for k, e in stale if e != b]
            break
    for _, e in stale:
        shutil.rmtree(e, ignore_errors=True)
        if e.exists() and not e.is_dir():
            try:
                e.unlink()
            except OSError:
                pass


@contextlib.contextmanager
def _dir_lock(parent: Path, exclusive: bool):
    """An advisory ``flock`` on the parent folder: saves (and the recovery of a target)
    take it exclusively, reads shared, so that a save never swaps a folder under a
    reader or another writer of the same parent. Released by the kernel if the process
    dies. Where ``flock`` is unavailable (not POSIX, some network filesystems) the block
    runs unlocked."""
    try:
        import fcntl
        fd = os.open(str(parent), os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def atomic_write_dir(target: Union[str, Path], write: Callable[[Path], None]) -> Path:
    """Write a folder atomically: ``write(tmp)`` fills a temporary sibling folder, which
    then replaces ``target`` by rename (see the module docstring). Refuses a target that
    holds entries ``write`` did not produce."""
    given = target
    target = Path(os.path.abspath(target))  # "." or "out/" name the folder itself
    if target.parent == target:
        raise ValueError(f"cannot save into the file-system root {given!r}")
    cwd = Path(os.path.abspath(os.getcwd()))
    if cwd == target or target in cwd.parents:
        raise ValueError(f"cannot save into {given!r}: it is (or contains) the current "
                         "working directory, which the atomic folder swap would move; "
                         "save into a subfolder")
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _dir_lock(parent, exclusive=True):
        _write_dir_locked(target, parent, write)
    return Path(given)


def _write_dir_locked(target: Path, parent: Path, write: Callable[[Path], None]) -> None:
    recover(target)
    if os.path.lexists(target) and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder")
    tmp = parent / f".{target.name}{_TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}"
    _ACTIVE.add(str(tmp))
    try:
        tmp.mkdir()
        write(tmp)
        produced = {e.name for e in tmp.iterdir()}
        if target.is_dir():
            foreign = sorted(e.name for e in target.iterdir() if e.name not in produced)
            if foreign:
                raise FileExistsError(
                    f"{target} holds entries this save would not keep ({foreign[:5]}); a "
                    "save replaces the whole folder: save into a new or empty folder")
        for name in produced:
            _fsync_path(tmp / name)
        _fsync_path(tmp, directory=True)
        if target.is_dir():
            old = parent / f".{target.name}{_OLD_TAG}{os.getpid()}-{secrets.token_hex(4)}"
            _ACTIVE.add(str(old))
            try:
                os.rename(target, old)
                try:
                    os.rename(tmp, target)  # the commit point
                except BaseException:
                    os.rename(old, target)  # put the previous version back
                    raise
                _fsync_path(parent, directory=True)
                shutil.rmtree(old, ignore_errors=True)
            finally:
                _ACTIVE.discard(str(old))
        else:
            os.rename(tmp, target)  # the commit point
        _fsync_path(parent, directory=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _ACTIVE.discard(str(tmp))


def _prepare_read(path: Path) -> Path:
    """Recover an interrupted save of ``path`` (best effort on a read-only folder)."""
    path = Path(os.path.abspath(path))
    with _dir_lock(path.parent, exclusive=True):
        try:
            recover(path)
        except OSError:
            pass
    return path


def _read_locked(path: Path, read: Callable[[Path], object]):
    with _dir_lock(path.parent, exclusive=False):
        return read(path)


# ---------------------------------------------------------------------- atomic files
def atomic_write_file(target: Union[str, Path], write: Callable[[Path], None]) -> Path:
    """Write one file atomically: ``write(tmp)`` writes a temporary sibling of ``target``
    (same folder, hidden, no extension), which is fsynced and renamed over ``target``.
    Creates the parent folder. On any exception the temporary is removed and ``target`` is left
    as it was. Concurrent writers of one target each use their own temporary; the last
    rename wins. Temporaries left by killed writers of the same target are removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for entry in os.listdir(target.parent):  # temporaries of writers that were killed
        kind = _temp_kind(target, entry)
        if kind is not None and kind[0] == "tmp" and not _pid_alive(kind[1]):
            with contextlib.suppress(OSError):
                os.unlink(target.parent / entry)
    # hidden, and without the target's extension: a reader listing "*.json" (say)
    # never picks up a write in progress
    tmp = target.with_name(f".{target.name}{_TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        write(tmp)
        _fsync_path(tmp)
        os.replace(tmp, target)  # the commit point
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_path(target.parent, directory=True)
    return target


def write_text(target: Union[str, Path], text: str) -> Path:
    """``target`` holds ``text`` (UTF-8), written atomically."""
    return atomic_write_file(target, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(target: Union[str, Path], obj, **dump_kwargs) -> Path:
    """``target`` holds ``json.dumps(obj, **dump_kwargs)`` (default ``indent=1``),
    written atomically; serialisation errors raise before anything is written."""
    import json

    dump_kwargs.setdefault("indent", 1)
    return write_text(target, json.dumps(obj, **dump_kwargs))


def save_figure(fig, target: Union[str, Path], **savefig_kwargs) -> Path:
    """``fig.savefig(target, ...)`` written atomically; the format follows the target's
    extension, as with a plain ``savefig``."""
    fmt = Path(target).suffix.lstrip(".")
    if fmt and "format" not in savefig_kwargs:
        savefig_kwargs["format"] = fmt
    return atomic_write_file(target, lambda p: fig.savefig(p, **savefig_kwargs))
