"""Output folders that appear whole or not at all, and leave nothing behind when their writer dies.

Used by the converter and by `tokenpacker-upgrade` (never shipped inside checkpoints). A tool writes into a
`StagingFolder` beside its target; `commit` swaps it into place (an atomic exchange where the OS has one, else two
renames whose interruption the next run repairs). Every staging folder carries an owner file naming its process, so
a later run can tell the debris of a dead run (SIGKILL, power loss) from a live one and remove it.
"""

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

STAGING_PREFIX = "tokenpacker_staging_"
OWNER_FILE = ".tokenpacker_owner.json"
SWAP_JOURNAL_SUFFIX = ".swap.json"
# A folder without an owner file younger than this may be one that is being created right now.
OWNERLESS_GRACE_S = 60
RENAME_EXCHANGE = 2  # linux/fs.h
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM/SIGHUP so that cleanup (`with`/`finally`) runs as on Ctrl-C."""


@contextmanager
def terminate_cleanly():
    """Within the block, SIGTERM and SIGHUP raise `Terminated` (exit status 128 + signal), as SIGINT raises
    KeyboardInterrupt, so temporary folders are removed and child processes ended."""

    def raise_terminated(signum, frame):
        raise Terminated(128 + signum)

    signals = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {signum: signal.signal(signum, raise_terminated) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _process_start_time(pid):
    """Start time of `pid` in clock ticks since boot (Linux), so a reused pid is not taken for its owner."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _is_alive(owner):
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = owner.get("started")
    return started is None or _process_start_time(pid) in (None, started)


def _owner_record(**extra):
    return {"pid": os.getpid(), "started": _process_start_time(os.getpid()), "created": time.time(), **extra}


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _write_json_atomically(path, data):
    path = Path(path)
    temporary = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(data, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _fsync_folder(folder):
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def recover_interrupted_swaps(parent):
    """Finish or undo the two-rename swaps (used where no atomic exchange exists) that a dead run left in `parent`.
    Returns one sentence per repair."""
    said = []
    for journal_path in sorted(Path(parent).glob(f"{STAGING_PREFIX}*{SWAP_JOURNAL_SUFFIX}")):
        journal = _read_json(journal_path)
        if journal is None or _is_alive(journal):
            continue
        target, old, new = Path(journal["target"]), Path(journal["old"]), Path(journal["new"])
        if not target.exists() and old.exists():
            os.rename(old, target)
            said.append(f"restored {target} from an interrupted replacement ({old.name}); the new output was lost")
        elif target.exists() and old.exists():
            shutil.rmtree(old, ignore_errors=True)
            said.append(f"finished an interrupted replacement of {target} (removed the old copy {old.name})")
        if new.exists() and new != target:
            shutil.rmtree(new, ignore_errors=True)
        journal_path.unlink(missing_ok=True)
    return said


def remove_dead_stagings(parent):
    """Remove the staging and scratch folders in `parent` whose owner process is gone (after repairing interrupted
    swaps there). Returns one sentence per folder removed or repair made."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    said = recover_interrupted_swaps(parent)
    for folder in sorted(parent.glob(f"{STAGING_PREFIX}*")):
        if not folder.is_dir() or folder.is_symlink():
            continue
        owner = _read_json(folder / OWNER_FILE)
        if owner is None:
            try:
                age = time.time() - folder.stat().st_mtime
            except OSError:
                continue
            if age < OWNERLESS_GRACE_S:
                continue
        elif _is_alive(owner):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        said.append(f"removed {folder.name}, left behind by a run that ended without cleaning up")
    return said


def _exchange(a, b):
    """Atomically swap the paths `a` and `b` (renameat2 RENAME_EXCHANGE). False where the OS or the filesystem has
    no such call."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: not supported here
        return False
    raise OSError(errno, os.strerror(errno), str(a))


class StagingFolder:
    """A folder beside `target`, owned by this process, removed on exit unless committed to `target`.

    `with StagingFolder(target, "convert") as staging: ... write into staging.path ...; staging.commit()`.
    On entry, dead runs' debris in the same parent is removed (`self.repairs` says what was done).
    """

    def __init__(self, target, purpose):
        self.target = Path(target).absolute()
        self.purpose = purpose
        self.path = None
        self.committed = False
        self.repairs = []

    def __enter__(self):
        parent = self.target.parent
        self.repairs = remove_dead_stagings(parent)
        self.path = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{self.purpose}_", dir=parent))
        _write_json_atomically(self.path / OWNER_FILE, _owner_record(target=str(self.target), purpose=self.purpose))
        return self

    def __exit__(self, *exc_info):
        if not self.committed and self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
        return False

    def commit(self):
        """Put the staged folder at `target`: replace an existing target whole, never leaving neither."""
        (self.path / OWNER_FILE).unlink()
        # mkdtemp made the folder private (0700); give it the old target's mode, or the umask's default.
        if self.target.exists():
            mode = self.target.stat().st_mode & 0o7777
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o777 & ~umask
        os.chmod(self.path, mode)
        _fsync_folder(self.path)
        if not self.target.exists():
            os.rename(self.path, self.target)
        elif _exchange(self.path, self.target):
            # The old folder now sits at the staging path, ownerless: a kill before it is removed leaves debris
            # that the next run's remove_dead_stagings clears.
            _write_json_atomically(self.path / OWNER_FILE, _owner_record(target=str(self.target), purpose="replaced"))
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            self._swap_by_renames()
        _fsync_folder(self.target.parent)
        self.committed = True

    def _swap_by_renames(self):
        old = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}replaced_", dir=self.target.parent))
        os.rmdir(old)
        journal = Path(str(old) + SWAP_JOURNAL_SUFFIX)
        _write_json_atomically(journal, _owner_record(target=str(self.target), old=str(old), new=str(self.path)))
        blocked = {signal.SIGINT, signal.SIGTERM} if hasattr(signal, "pthread_sigmask") else set()
        if blocked:
            signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            os.rename(self.target, old)
            os.rename(self.path, self.target)
        finally:
            if blocked:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
        journal.unlink()
        shutil.rmtree(old, ignore_errors=True)


def _die_with_parent():
    """In a child between fork and exec: receive SIGKILL when the parent dies (Linux)."""
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def run_child(command, timeout=None, **kwargs):
    """`subprocess.run(command, ...)` whose child is killed when this process dies, even by SIGKILL (Linux), and
    on any exception here (Ctrl-C, SIGTERM under `terminate_cleanly`)."""
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    return subprocess.run(command, timeout=timeout, preexec_fn=preexec, **kwargs)
