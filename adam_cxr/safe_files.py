"""Writing safely: one writer per output, room checked before writing, fsync before every rename, and a folder that
appears whole or not at all. data_prep's caches and adam.py's run folder (adam_cxr/runs.py) are written with these.

    write_atomic(path, write)   one file: written under a unique temporary name, fsynced, renamed into place
    FolderLock(path, busy)      one writer per output: a second process is refused at once (or waits)
    check_room, reserve         a full disk found before anything is written, and never as a SIGBUS mid-way
    DiskFull                    the one-line error of a full disk, naming the output and the fix
    start_tmp / finish_tmp / abort_tmp   a folder built in a hidden sibling (.<name>.tmp-<pid>) and renamed into
                                place, its meta.json written last, so that a killed run never leaves a folder that
                                reads as finished; recover() clears what dead runs left

Standard library only.
"""
import atexit
import errno
import json
import os
import re
import secrets
import shutil
from pathlib import Path

try:
    import fcntl  # the output locks (FolderLock); absent on Windows, where there is no lock
except ImportError:
    fcntl = None


class DiskFull(OSError):
    """No room for an output: the message names it and the fix (one line, no traceback, like every error a user
    can fix)."""


def _gib(n):
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def disk_full(error, folder):
    """Did `error` come from a full disk under `folder`? ENOSPC or EDQUOT, or any error while that disk has under
    1 MiB free: torch.save reports a full disk as "enforce fail ... unexpected pos", not as an OSError."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(folder).free < 2 ** 20
    except OSError:
        return False


def check_room(folder, need, what, fix):
    """DiskFull, before anything is written, when `folder`'s disk has less than `need` bytes (+5 %) free."""
    free = shutil.disk_usage(folder).free
    if free < need * 1.05:
        raise DiskFull(f"disk full: {what} needs about {_gib(need)} and {folder} has {_gib(free)} free; {fix}")


def reserve(path):
    """Allocate a file's blocks now (posix_fallocate): a write through a memory map to a full disk would kill the
    process with SIGBUS, with no message and no clean-up. ENOSPC is raised here instead."""
    if hasattr(os, "posix_fallocate"):
        with open(path, "r+b") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # no fallocate here: go on
                    raise


def fsync(path):
    """Flush a file (or a folder's entries) to the disk, so that a rename after it never publishes an empty or
    partial file after a crash or power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not os.path.isdir(path):                  # some file systems cannot sync folders: nothing to do
            raise
    finally:
        os.close(fd)


class FolderLock:
    """An exclusive lock on an output (a run folder, a cache being written), held by this process until release()
    or its end: a POSIX record lock (fcntl.lockf) on the lock file `path`, so a second process is refused at once
    (or waits, wait=True), a killed process never leaves a stale lock, and forked DataLoader workers hold nothing.
    `busy` is the refusal, with {pid} for the holder. The lock file is removed on release."""

    def __init__(self, path, busy, wait=False):
        self.path, self.fd = Path(path), None
        if fcntl is None:
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                if e.errno in (errno.EACCES, errno.EAGAIN):
                    raise BlockingIOError(busy.format(pid=holder)) from None
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):   # a file system without locks
                    return
                raise
            try:                                     # the file we locked may have been removed by its last holder
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        atexit.register(self.release)                # a run stopped by an error leaves no lock file either

    def release(self):
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None
            atexit.unregister(self.release)


def write_atomic(path, write, again="run the same command again"):
    """write(tmp path), fsync, then rename it onto path (made with its folder): a reader or a crash sees the old file
    or the new one, never half of one, and two writers never share a temporary name. A full disk raises DiskFull
    naming the file and what to do once there is room (`again`, e.g. the --resume that continues a run); the
    temporary file is removed and the previous file kept. The writer of every checkpoint, result and figure.
    Returns str(path)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)
    except BaseException as e:
        full = isinstance(e, Exception) and disk_full(e, path.parent)
        tmp.unlink(missing_ok=True)
        if full:
            raise disk_full_error(path, again) from None
        raise
    return str(path)


def disk_full_error(path, then="run the same command again"):
    """DiskFull naming the file that did not fit, whether its previous version is kept, and `then`: how to go on.
    Its .path is the file, so a caller that knows better how to go on can say it (runs.RunFolder: --resume)."""
    kept = "; the previous one is kept" if Path(path).exists() else ""
    e = DiskFull(f"disk full while writing {path}{kept}: free some space (or pick another folder), then {then}")
    e.path = path
    return e


# ----------------------------------------------------------------------------------------------------
# A folder written whole: built in a hidden temporary sibling, renamed into place at the end

TMP_FOLDER = re.compile(r"\.(.+)\.(tmp|old)-(\d+)")   # data_prep's hidden siblings of a cache being written
_LOCKS = {}                                               # temporary folder -> the lock on its output
# What to do about a full disk: a conversion keeps nothing of a failed try, so it starts again from the beginning.
AGAIN = "free space and run the same command again, or pick another --out or a smaller --size"


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(out):
    """Clear what dead runs left beside `out`: their temporary folders are deleted; the old cache of a --force
    swap cut between its two renames (.<name>.old-<pid>, and no `out`) is put back."""
    for old in sorted(Path(out).parent.glob(f".{Path(out).name}.*-*")):
        m = TMP_FOLDER.fullmatch(old.name)
        if not m or m.group(1) != Path(out).name or _pid_alive(int(m.group(3))):
            continue
        if m.group(2) == "old" and not Path(out).exists() and (old / "meta.json").is_file():
            os.rename(old, out)
        else:
            shutil.rmtree(old, ignore_errors=True)


def start_tmp(out, force=False, need=0, wait=False):
    """Lock `out` (another process writing it: refused, or waited for with wait=True), check that `need` bytes fit
    on its disk, clear what dead runs left, and return a fresh temporary sibling folder to build the cache in."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(out.parent / f".{out.name}.lock", f"{out} is being written by another data_prep.py (pid "
                      f"{{pid}}): wait for it to end, or pick another --out", wait)
    try:
        recover(out)
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"--out {out} is a file, not a folder; pick a folder for the cache")
        if out.exists() and not (out / "meta.json").exists() and any(out.iterdir()):
            raise FileExistsError(f"{out} exists, is not empty and is not a cache (no meta.json)"
                                  f"{': --force replaces caches only' if force else ''}; move it away or pick --out")
        if (out / "meta.json").exists() and not force:
            raise FileExistsError(f"{out} already holds a cache; pass --force to rebuild it")
        check_room(out.parent, need, f"writing {out}", AGAIN)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except BaseException:
        lock.release()
        raise
    _LOCKS[tmp] = lock
    return tmp


def finish_tmp(tmp, out, meta, force=False):
    """Write the dict `meta` as meta.json last (itself via temp + rename), fsync every file, then rename the folder
    into place and release the lock. A --force rebuild swaps: the old cache waits in .<name>.old-<pid> until the new
    one is in place (a kill in between: recover puts it back), then is deleted."""
    (tmp / "meta.json.tmp").write_text(json.dumps(meta, indent=1))
    for f in [*tmp.rglob("*"), tmp]:
        fsync(f)
    os.replace(tmp / "meta.json.tmp", tmp / "meta.json")
    fsync(tmp)
    out = Path(out)
    if (out / "meta.json").exists() and not force:             # a concurrent run finished first: keep its cache
        raise FileExistsError(f"{out} was completed by another process meanwhile; pass --force to replace it")
    if (out / "meta.json").exists():                             # --force: swap, then delete the old cache
        trash = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, trash)
        os.rename(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        if out.exists():
            out.rmdir()                                         # empty placeholder folder
        os.rename(tmp, out)
    fsync(out.parent)
    _LOCKS.pop(tmp).release()
    return out


def abort_tmp(tmp, out, error):
    """A build failed: delete its temporary folder and release the lock; a full disk becomes one clear DiskFull."""
    full = isinstance(error, Exception) and not isinstance(error, DiskFull) and disk_full(error, tmp.parent)
    shutil.rmtree(tmp, ignore_errors=True)
    lock = _LOCKS.pop(tmp, None)
    if lock:
        lock.release()
    if full:
        raise DiskFull(f"disk full while writing {out}: nothing was written; {AGAIN}") from None


