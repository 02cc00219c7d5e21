"""Files written safely (layer 0, private): one place for atomic writes, temporary names and output checks.

A final file is only ever created by renaming a complete temporary file beside it, so a killed process never leaves
a half-written file under the final name; temporary names carry the process id, so two processes writing the same
target never share one; an existing file is replaced only when the caller says so.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text", "check_input", "check_output", "disk_full_hint", "finish", "partial_path",
           "remove_stale_partials"]


def partial_path(path: Path, *, suffix: str | None = None) -> Path:
    """The temporary name of ``path`` while it is written: hidden, beside it, unique to this process."""
    suffix = path.suffix if suffix is None else suffix
    return path.with_name(f".{path.stem}.{os.getpid()}.partial{suffix}")


def remove_stale_partials(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of ``path`` (see :func:`partial_path`) left by processes that no longer run -- a
    writer killed with SIGKILL cannot clean up after itself. A partial file of a live process (another rank writing
    now) is kept. Returns what was removed."""
    path = Path(path)
    removed = []
    for p in path.parent.glob(f".{path.stem}.*.partial*"):
        pid = p.name[len(path.stem) + 2:].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _umask() -> int:
    """The process umask, read without changing it where the system tells (Linux), else by setting and restoring."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def finish(tmp: Path, path: Path, *, overwrite: bool) -> Path:
    """Move a finished temporary file to ``path`` in one step. Without ``overwrite`` the step refuses to replace a
    file (a hard link, which fails if the name exists, then the temporary name removed): a file that appeared
    after the up-front check -- another process writing the same output -- is never clobbered; the loser gets
    ``FileExistsError`` and its temporary file is removed."""
    if overwrite:
        os.replace(tmp, path)
        return path
    try:
        os.link(tmp, path)
    except FileExistsError:
        tmp.unlink(missing_ok=True)
        raise FileExistsError(f"{path} appeared while this was being written (another process writing the same "
                              "output?); it was left as it is -- pass overwrite=True (CLI: --overwrite) to replace "
                              "it") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
            raise
        if path.exists():  # a file system without hard links: the best check there is, then the rename
            tmp.unlink(missing_ok=True)
            raise FileExistsError(f"{path} appeared while this was being written; it was left as it is") from None
        os.replace(tmp, path)
        return path
    tmp.unlink()
    return path


def atomic_write(path: str | os.PathLike, write, *, overwrite: bool = True) -> Path:
    """Call ``write(tmp)`` to write a temporary file beside ``path``, then rename it to ``path``: readers see the
    old file or the whole new one, never a half-written one, and a failed write leaves nothing behind (a writer
    killed with SIGKILL leaves its temporary file, which the next write of the same file removes). The file
    gets the permissions a plain ``open(path, "w")`` would give (the user's umask), whatever the writer chose
    (safetensors writes 0600). With ``overwrite=False`` an existing ``path`` is never replaced, even one that
    another process finished while this one was writing (see :func:`finish`)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a file")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the folder to write {path.name} into does not exist: {path.parent}")
    remove_stale_partials(path)  # what a killed writer of this file left
    tmp = partial_path(path)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        finish(tmp, path, overwrite=overwrite)
    except OSError:
        raise
    except Exception as e:
        # Writers outside Python's io report OS errors in their own types (safetensors: "SafetensorError: I/O
        # error: No space left on device (os error 28)"); give them back as the OSError they are, so a full disk
        # gets its hint (disk_full_hint) and callers need one except clause.
        code = _os_error_code(str(e))
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(path)) from e
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _os_error_code(message: str) -> int | None:
    """The errno in a Rust-style "(os error N)" message, if any."""
    import re

    m = re.search(r"\(os error (\d+)\)", message)
    return int(m.group(1)) if m else None


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=overwrite)


def check_output(path: str | os.PathLike, name: str, *, overwrite: bool, suffixes: tuple[str, ...] | None = None) -> Path:
    """Everything that can be known about an output path before any work: suffix, not a folder, no silent
    overwrite, an existing and writable folder. Raises ValueError / FileExistsError / FileNotFoundError /
    PermissionError naming ``name``."""
    path = Path(path)
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise ValueError(f"`{name}` must end in one of {suffixes}, got {path.name!r}")
    if path.is_dir():
        raise IsADirectoryError(f"`{name}` is a folder, not a file: {path}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"the folder of `{name}` does not exist: {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"the folder of `{name}` is not writable: {parent}")
    return path


def check_input(path: str | os.PathLike, what: str = "file") -> Path:
    """An existing, non-empty regular file (else FileNotFoundError / IsADirectoryError / ValueError naming it)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a {what}")
    if not path.is_file():
        raise FileNotFoundError(f"no such {what}: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes): not a {what}")
    return path


def disk_full_hint(e: OSError, where: Path) -> str | None:
    """A one-line explanation when ``e`` is 'no space left on device', else None."""
    if getattr(e, "errno", None) != errno.ENOSPC:
        return None
    try:
        st = os.statvfs(where)
        free = f"{st.f_bavail * st.f_frsize / 2**20:.0f} MiB free"
    except OSError:
        free = "free space unknown"
    return f"the disk holding {where} is full ({free}): free some space and run the same command again"
