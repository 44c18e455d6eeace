"""Staging folders: whole-or-nothing replacement, the two-rename fallback and its repair, debris of dead runs."""

import json
import os
import subprocess
import sys

import pytest

from modeling_tokenpacker import staging
from modeling_tokenpacker.staging import OWNER_FILE, STAGING_PREFIX, StagingFolder, remove_dead_stagings


def dead_pid():
    """The pid of a process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def make_target(path, text="old"):
    path.mkdir()
    (path / "weights.bin").write_text(text)
    return path


def listing(parent):
    return sorted(os.listdir(parent))


@pytest.mark.parametrize("atomic_exchange", [True, False])
def test_commit_replaces_the_target_whole_and_keeps_its_mode(tmp_path, monkeypatch, atomic_exchange):
    if not atomic_exchange:
        monkeypatch.setattr(staging, "_exchange", lambda a, b: False)
    target = make_target(tmp_path / "out")
    os.chmod(target, 0o750)
    with StagingFolder(target, "test") as stage:
        (stage.path / "weights.bin").write_text("new")
        stage.commit()
    assert listing(tmp_path) == ["out"]
    assert listing(target) == ["weights.bin"] and (target / "weights.bin").read_text() == "new"
    assert target.stat().st_mode & 0o777 == 0o750


def test_an_exception_before_commit_removes_the_staging_folder_and_keeps_the_target(tmp_path):
    target = make_target(tmp_path / "out")
    with pytest.raises(RuntimeError):
        with StagingFolder(target, "test") as stage:
            (stage.path / "weights.bin").write_text("half")
            raise RuntimeError("disk full")
    assert listing(tmp_path) == ["out"] and (target / "weights.bin").read_text() == "old"


def test_a_new_target_gets_the_umask_default_mode(tmp_path):
    with StagingFolder(tmp_path / "fresh", "test") as stage:
        stage.commit()
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "fresh").stat().st_mode & 0o777 == 0o777 & ~umask


def test_debris_of_dead_runs_is_removed_and_live_runs_are_kept(tmp_path):
    dead = tmp_path / f"{STAGING_PREFIX}convert_dead"
    dead.mkdir()
    (dead / OWNER_FILE).write_text(json.dumps({"pid": dead_pid(), "started": None}))
    live = tmp_path / f"{STAGING_PREFIX}convert_live"
    live.mkdir()
    (live / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "started": staging._process_start_time(os.getpid())}))
    reused = tmp_path / f"{STAGING_PREFIX}convert_reused_pid"  # our pid, but another process's start time
    reused.mkdir()
    (reused / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "started": -1}))
    young_ownerless = tmp_path / f"{STAGING_PREFIX}convert_young"
    young_ownerless.mkdir()
    unrelated = make_target(tmp_path / "user_folder")
    said = remove_dead_stagings(tmp_path)
    assert listing(tmp_path) == sorted([live.name, young_ownerless.name, unrelated.name])
    assert len(said) == 2 and all("left behind by a run that ended" in sentence for sentence in said)
    old = 1_000_000_000
    os.utime(young_ownerless, (old, old))
    remove_dead_stagings(tmp_path)
    assert listing(tmp_path) == sorted([live.name, unrelated.name])


def interrupted_swap(tmp_path, moved_old):
    """The state a dead run leaves between the two renames of the fallback swap."""
    target = make_target(tmp_path / "out")
    old = tmp_path / f"{STAGING_PREFIX}replaced_x"
    new = tmp_path / f"{STAGING_PREFIX}convert_x"
    new.mkdir()
    (new / "weights.bin").write_text("new")
    journal = tmp_path / f"{STAGING_PREFIX}replaced_x.swap.json"
    journal.write_text(json.dumps({"pid": dead_pid(), "started": None, "target": str(target), "old": str(old),
                                   "new": str(new)}))
    if moved_old:
        os.rename(target, old)
    return target


def test_a_swap_killed_after_moving_the_old_folder_aside_is_undone(tmp_path):
    target = interrupted_swap(tmp_path, moved_old=True)
    assert not target.exists()
    said = remove_dead_stagings(tmp_path)
    assert listing(tmp_path) == ["out"] and (target / "weights.bin").read_text() == "old"
    assert said and said[0].startswith(f"restored {target}")


def test_a_swap_killed_before_any_rename_leaves_the_old_target(tmp_path):
    target = interrupted_swap(tmp_path, moved_old=False)
    remove_dead_stagings(tmp_path)
    assert listing(tmp_path) == ["out"] and (target / "weights.bin").read_text() == "old"


def test_a_child_process_ends_with_its_parent(tmp_path):
    marker = tmp_path / "child_pid"
    child_code = f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    parent_code = ("import sys; sys.path.insert(0, sys.argv[1]); from modeling_tokenpacker.staging import run_child; "
                   "run_child([sys.executable, '-c', sys.argv[2]])")
    parent = subprocess.Popen([sys.executable, "-c", parent_code, os.getcwd(), child_code])
    for _ in range(400):
        if marker.exists() and marker.read_text():
            break
        subprocess.run(["sleep", "0.05"])
    child = int(marker.read_text())
    parent.kill()
    parent.wait()
    for _ in range(100):
        if not is_running(child):
            break
        subprocess.run(["sleep", "0.05"])
    assert not is_running(child)


def is_running(pid):
    """Whether `pid` is a live process (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
