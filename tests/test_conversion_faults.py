"""The converter under faults: outputs that overlap inputs, runs killed at several points (by signal, timed on the
converter's progress markers), interrupted replacements, broken inputs, a full disk, a read-only folder. After every
case: no input changed, the output either as it was or complete, no temporary folder and no process left, and a
one-line error instead of a traceback."""

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path.insert(0, str(REPO_ROOT))

from conversion import writing  # noqa: E402
from conversion.common import ConversionError  # noqa: E402
from conversion.tokenpacker_converter import convert  # noqa: E402
from conversion_inputs import make_clip_folder, make_original  # noqa: E402
from modeling_tokenpacker.staging import OWNER_FILE, OWNERLESS_GRACE_S, STAGING_PREFIX  # noqa: E402

CLI = [sys.executable, str(REPO_ROOT / "conversion" / "convert_tokenpacker_to_hf.py")]
# The CLI with every tensor write slowed down (test-side only), so that a signal sent on a progress marker lands while
# the weights are still being written.
SLOW_CLI = [sys.executable, "-c", (
    "import sys, time; sys.path.insert(0, sys.argv[1]); import conversion.writing as w; write = w.write_tensor; "
    "w.write_tensor = lambda *a: (time.sleep(0.005), write(*a)); "
    "from conversion.convert_tokenpacker_to_hf import main; sys.exit(main(sys.argv[2:]))"), str(REPO_ROOT)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault_inputs")
    return {"checkpoint": Path(make_original(str(root / "orig"), "safetensors")),
            "clip": Path(make_clip_folder(str(root / "clip")))}


@pytest.fixture(scope="module")
def converted_once(tmp_path_factory, inputs):
    """A finished conversion of `inputs`, to stand for an output that a later run replaces."""
    output = tmp_path_factory.mktemp("fault_converted") / "out"
    result = run_cli(inputs, output, "--no-verify")
    assert result.returncode == 0, result.stderr[-2000:]
    return output


def digest(folder):
    """{relative path: sha256} of every file under `folder` (None when it does not exist)."""
    folder = Path(folder)
    if not folder.exists():
        return None
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def debris(*folders):
    """Temporary folders (ours or the old converter's) left in `folders` or in the system's temp folder."""
    import tempfile

    found = []
    for folder in [*folders, Path(tempfile.gettempdir())]:
        if Path(folder).is_dir():
            found += [name for name in os.listdir(folder)
                      if name.startswith((STAGING_PREFIX, "_tmp_convert", "_tmp_replaced", "tokenpacker_verify_"))]
    return found


def live_processes(text):
    """Live (not zombie) processes whose command line mentions `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if text in (entry / "cmdline").read_bytes().decode(errors="replace") and \
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def wait_until(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def cli_args(inputs, output, *extra):
    return ["--input", str(inputs["checkpoint"]), "--vision-tower", str(inputs["clip"]), "--output", str(output),
            "--no-progress", *extra]


def run_cli(inputs, output, *extra, command=CLI, timeout=300):
    return subprocess.run(command + cli_args(inputs, output, *extra), capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result):
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def assert_complete_output(folder):
    names = set(os.listdir(folder))
    assert {"config.json", "model.safetensors", "tokenizer.json", "modeling_tokenpacker.py", "README.md"} <= names
    assert not [name for name in names if name.endswith(".tmp") or name.startswith(STAGING_PREFIX)]


# ---------------------------------------------------------------------------------------------------------------
# 1. outputs that are, contain or lie inside an input


@pytest.mark.parametrize("where", ["is the input", "contains the input", "inside the input", "is the vision tower",
                                   "inside the vision tower", "is the tokenizer"])
def test_an_output_overlapping_an_input_is_refused_whatever_the_flags(tmp_path, where):
    checkpoint = Path(make_original(str(tmp_path / "parent" / "orig"), "safetensors"))
    clip = Path(make_clip_folder(str(tmp_path / "clip")))
    output = {"is the input": checkpoint, "contains the input": checkpoint.parent,
              "inside the input": checkpoint / "converted", "is the vision tower": clip,
              "inside the vision tower": clip / "out", "is the tokenizer": checkpoint}[where]
    extra = ["--tokenizer", str(checkpoint)] if where == "is the tokenizer" else []
    before = {"checkpoint": digest(checkpoint), "clip": digest(clip)}
    result = subprocess.run(CLI + ["--input", str(checkpoint), "--vision-tower", str(clip), "--output", str(output),
                                   "--overwrite", "--no-progress", *extra], capture_output=True, text=True, timeout=300)
    line = assert_one_line_error(result)
    assert str(output) in line and ("is" in line or "contains" in line or "lies inside" in line)
    assert {"checkpoint": digest(checkpoint), "clip": digest(clip)} == before
    assert debris(tmp_path, tmp_path / "parent", checkpoint, clip) == []


# ---------------------------------------------------------------------------------------------------------------
# 2 and 3. killed or interrupted runs


KILL_POINTS = ["converted 30%", "converted 50%", "converted 60%", "verifying", "committing"]


def marker(line):
    """The kill point a progress line stands for, if any."""
    if "progress: converted" in line:
        return "converted " + line.rsplit("(", 1)[1].rstrip(")\n")
    for word in ("verifying", "committing"):
        if f"progress: {word}" in line:
            return word
    return None


STOPS = [(point, stop) for point in KILL_POINTS for stop in (signal.SIGTERM, signal.SIGKILL)] + [
    ("converted 50%", signal.SIGINT), ("verifying", signal.SIGINT)]


@pytest.mark.parametrize("point, stop", STOPS, ids=[f"{point}-{stop.name}" for point, stop in STOPS])
def test_a_run_stopped_at_any_point_leaves_the_old_output_or_the_new_one_and_no_debris(tmp_path, inputs,
                                                                                      converted_once, point, stop):
    output = tmp_path / "out"
    shutil.copytree(converted_once, output)  # an existing output, to be replaced with --overwrite
    (output / "MARKER_OF_THE_OLD_OUTPUT").write_text("old")
    before = digest(output)
    process = subprocess.Popen(SLOW_CLI + cli_args(inputs, output, "--overwrite"), stderr=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, text=True)
    seen = []
    for line in process.stderr:
        seen.append(marker(line))
        if seen[-1] == point:
            break
    assert point in seen, f"the run ended before {point!r}: {seen}"
    staging = [name for name in os.listdir(tmp_path) if name.startswith(STAGING_PREFIX)]
    if point == "verifying":  # the verification child is there to be ended with its parent
        assert wait_until(lambda: live_processes(str(tmp_path / "tokenpacker_staging_convert")))
    process.send_signal(stop)
    code = process.wait(timeout=120)
    process.stderr.close()
    assert wait_until(lambda: live_processes(str(tmp_path)) == [], timeout=10), live_processes(str(tmp_path))

    after = digest(output)
    if after == before:
        assert code != 0
    else:  # the swap happened just before the signal: the new output is complete
        assert point == "committing" and "MARKER_OF_THE_OLD_OUTPUT" not in after
        assert_complete_output(output)
    if stop == signal.SIGKILL:
        assert code == -signal.SIGKILL
        left = [name for name in staging if (tmp_path / name).exists() and not name.endswith(".json")]
        for name in left:
            if not (tmp_path / name / OWNER_FILE).exists():
                # Killed inside commit, after it gave up ownership: a later run removes the ownerless folder once
                # its grace (for a run still creating it) is over. Age it past the grace instead of waiting.
                past = time.time() - OWNERLESS_GRACE_S - 1
                os.utime(tmp_path / name, (past, past))
        rerun = run_cli(inputs, tmp_path / "second", "--no-verify")
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        # What the killed run left is removed by the next one (a run killed just after its own clean-up left none).
        assert all(f"removed {name}" in rerun.stderr for name in left), rerun.stderr
    else:
        assert code in (143, 130), code
    assert debris(tmp_path) == []


def test_a_replacement_interrupted_between_its_two_renames_is_undone_by_the_next_run(tmp_path, inputs,
                                                                                     converted_once):
    """Where no atomic exchange exists, the old output is moved aside and the new one moved in: a run killed in
    between leaves a journal, and the next run puts the old output back before it starts."""
    import json

    output = tmp_path / "out"
    shutil.copytree(converted_once, output)
    before = digest(output)
    aside = tmp_path / f"{STAGING_PREFIX}replaced_dead"
    output.rename(aside)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"{aside.name}.swap.json").write_text(json.dumps(
        {"pid": dead.pid, "started": None, "target": str(output), "old": str(aside),
         "new": str(tmp_path / f"{STAGING_PREFIX}convert_dead")}))
    result = run_cli(inputs, output, "--no-verify")  # no --overwrite: the restored output must be found
    assert f"restored {output}" in result.stderr
    assert "exists; pass --overwrite" in assert_one_line_error(result)
    assert digest(output) == before and debris(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# 4. inputs checked up front, errors that show later


def broken_copy(inputs, tmp_path, damage):
    source = tmp_path / "broken"
    shutil.copytree(inputs["checkpoint"], source)
    damage(source)
    return source


def truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:keep])


DAMAGES = {
    "truncated model.safetensors": (lambda s: truncate(s / "model.safetensors", -1000), "is truncated"),
    "safetensors header cut": (lambda s: truncate(s / "model.safetensors", 20), "is truncated"),
    "safetensors header not JSON": (lambda s: (s / "model.safetensors").write_bytes(
        (100).to_bytes(8, "little") + b"{" * 100 + b"\0" * 50), "header is not JSON"),
    "config.json not JSON": (lambda s: (s / "config.json").write_text('{"model_type": "llava",'), "not valid JSON"),
    "config.json not UTF-8": (lambda s: (s / "config.json").write_bytes(b"\xff\xfe\x00{"), "not UTF-8"),
    "empty pytorch_model.bin": (lambda s: ((s / "model.safetensors").unlink(), (s / "pytorch_model.bin").write_bytes(b"")),
                                "is empty"),
    "truncated pytorch_model.bin": (lambda s: _truncated_bin(s), "Could not read"),
}


def _truncated_bin(source):
    import torch
    from safetensors.torch import load_file

    state = load_file(str(source / "model.safetensors"))
    (source / "model.safetensors").unlink()
    torch.save(state, source / "pytorch_model.bin")
    truncate(source / "pytorch_model.bin", -5000)


@pytest.mark.parametrize("case", sorted(DAMAGES))
def test_a_broken_input_fails_in_the_first_second_with_one_line_naming_the_file(tmp_path, inputs, case):
    damage, message = DAMAGES[case]
    source = broken_copy(inputs, tmp_path, damage)
    start = time.perf_counter()
    with pytest.raises(ConversionError) as raised:
        convert(str(tmp_path / "out"), input=str(source), vision_tower=str(inputs["clip"]), progress=False)
    assert time.perf_counter() - start < 1.0
    text = str(raised.value)
    assert message in text and str(source) in text and "\n" not in text
    assert not (tmp_path / "out").exists() and debris(tmp_path) == []
    result = subprocess.run(CLI + ["--input", str(source), "--vision-tower", str(inputs["clip"]), "--output",
                                   str(tmp_path / "out"), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert message in assert_one_line_error(result)


def test_too_little_free_space_is_found_before_anything_is_written(tmp_path, inputs, monkeypatch):
    import shutil as shutil_module

    real = shutil_module.disk_usage
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: real(path)._replace(free=1000))
    start = time.perf_counter()
    with pytest.raises(ConversionError, match=r"Not enough free space .* needs about [0-9.]+ MB .* 0.0 MB free"):
        convert(str(tmp_path / "out"), input=str(inputs["checkpoint"]), vision_tower=str(inputs["clip"]),
                progress=False)
    assert time.perf_counter() - start < 1.0
    assert not (tmp_path / "out").exists() and debris(tmp_path) == []


@pytest.mark.parametrize("after_tensors", [1, 200])
def test_a_disk_that_fills_up_mid_write_gives_one_line_and_leaves_nothing(tmp_path, inputs, monkeypatch,
                                                                           after_tensors):
    written = []
    real_write = writing.write_tensor

    def write_until_full(handle, name, tensor):
        written.append(name)
        if len(written) > after_tensors:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), handle.name)
        real_write(handle, name, tensor)

    monkeypatch.setattr(writing, "write_tensor", write_until_full)
    output = tmp_path / "out"
    output.mkdir()
    (output / "previous.txt").write_text("keep me")
    with pytest.raises(ConversionError) as raised:
        convert(str(output), input=str(inputs["checkpoint"]), vision_tower=str(inputs["clip"]), progress=False,
                overwrite=True)
    text = str(raised.value)
    assert "no space left on the device" in text and "\n" not in text
    assert digest(output) == {"previous.txt": hashlib.sha256(b"keep me").hexdigest()}
    assert debris(tmp_path) == []


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nobody may write into (chmod for ordinary users; the immutable flag for root, which ignores modes)."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("running as root without chattr +i: no way to make a folder read-only here")
    yield folder
    subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_a_read_only_output_folder_fails_at_once_with_one_line(read_only_folder, inputs):
    result = run_cli(inputs, read_only_folder / "out")
    line = assert_one_line_error(result)
    assert f"{read_only_folder} is not writable" in line and "nothing was written" in line
    assert os.listdir(read_only_folder) == []
