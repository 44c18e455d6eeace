"""`tokenpacker-upgrade`: a checkpoint written by the previous release's shipped files (kept in
tests/fixtures/shipped_0_1_0, the files that broke on transformers 5.24 and warn on 5.25) gets this release's remote code,
weights untouched, checked in a fresh process; killed or interrupted runs leave the folder as it was."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version

from modeling_tokenpacker import upgrade as upgrade_module
from modeling_tokenpacker.demo import synthesize_image
from modeling_tokenpacker.staging import STAGING_PREFIX
from modeling_tokenpacker.upgrade import UpgradeError, checksums, plan_upgrade, shipped_files
from test_remote_code import PROMPTS, run_child

OLD_FILES = Path(__file__).parent / "fixtures" / "shipped_0_1_0"
UPGRADE = [sys.executable, "-m", "modeling_tokenpacker.upgrade"]


@pytest.fixture
def old_checkpoint(tmp_path, checkpoint):
    """The tiny checkpoint with the previous release's shipped modules in place of this release's."""
    folder = tmp_path / "old_ckpt"
    shutil.copytree(checkpoint, folder)
    for path in OLD_FILES.glob("*.py"):
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory):
    folder = tmp_path_factory.mktemp("upgrade_images")
    paths = [folder / "a.png", folder / "b.png"]
    synthesize_image(480, 360).save(paths[0])
    synthesize_image(300, 500).save(paths[1])
    return paths


def all_files(folder):
    return checksums(folder)


def debris(parent):
    return sorted(path.name for path in Path(parent).iterdir() if path.name.startswith(STAGING_PREFIX))


def processes_mentioning(text):
    """Pids of live processes whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def old_files_symptom():
    """What release 0.1.0's files do on the installed transformers, by release: 5.24 refuses them; 5.25 brought back the
    old cache name behind a deprecation warning (`utils/generic.py`'s `_rename_kwargs_for_bc`), so they run but warn.
    None: before 5.24 they ran silently."""
    installed = Version(transformers.__version__)
    if installed < Version("5.24"):
        return None
    if installed < Version("5.25"):
        return "unexpected keyword argument 'cache'"
    return "`past_key_values`/`cache_params` are deprecated"


def test_upgrade_makes_a_previous_release_checkpoint_generate_like_the_package(old_checkpoint, image_paths, tiny_model,
                                                                               processor):
    symptom = old_files_symptom()
    if symptom is not None:
        before = subprocess.run([sys.executable, "-I", "-c", "import sys, transformers, torch\n"
                                 "m = transformers.AutoModelForImageTextToText.from_pretrained(sys.argv[1], "
                                 "trust_remote_code=True)\n"
                                 "m.generate(input_ids=torch.tensor([[1, 5, 6]]), max_new_tokens=2)", str(old_checkpoint)],
                                capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
        assert symptom in before.stderr, before.stderr[-3000:]
        assert (before.returncode != 0) == ("unexpected keyword" in symptom), before.stderr[-3000:]
    weights_before = {name: digest for name, digest in all_files(old_checkpoint).items() if not name.endswith(".py")}
    inode_before = (old_checkpoint / "model.safetensors").stat().st_ino

    result = subprocess.run(UPGRADE + [str(old_checkpoint)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "verified:" in result.stdout and "have the same sha256 as before" in result.stdout

    for name, path in shipped_files().items():
        assert (old_checkpoint / name).read_bytes() == path.read_bytes(), name
    after = all_files(old_checkpoint)
    assert {name: after[name] for name in weights_before} == weights_before
    assert (old_checkpoint / "model.safetensors").stat().st_ino == inode_before  # the very same file
    assert debris(old_checkpoint.parent) == []

    child = run_child(old_checkpoint, image_paths, cwd=old_checkpoint.parent)
    from PIL import Image

    inputs = processor(images=[Image.open(p) for p in image_paths], text=PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = tiny_model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert child["tokens"] == expected[:, inputs["input_ids"].shape[1]:].tolist()


def test_an_up_to_date_folder_is_left_alone(tmp_path, checkpoint):
    folder = tmp_path / "current"
    shutil.copytree(checkpoint, folder)
    before = all_files(folder)
    lines = []
    summary = upgrade_module.upgrade(folder, log=lines.append)
    assert summary["changed"] == [] and "already up to date" in lines[-1]
    assert all_files(folder) == before


def test_stale_auto_map_entries_are_rewritten_and_others_kept(tmp_path, checkpoint):
    folder = tmp_path / "stale_map"
    shutil.copytree(checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_tokenpacker.TokenPackerConfig",
                          "AutoModel": "someone/other--modeling_tokenpacker.TokenPackerModel"}
    (folder / "config.json").write_text(json.dumps(config))
    changes = plan_upgrade(folder)
    assert set(changes) == {"config.json"}
    auto_map = json.loads(changes["config.json"])["auto_map"]
    assert auto_map["AutoModel"] == "modeling_tokenpacker.TokenPackerModel"
    assert auto_map["AutoModelForImageTextToText"] == "modeling_tokenpacker.TokenPackerForConditionalGeneration"


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_a_run_stopped_while_verifying_leaves_the_folder_as_it_was(old_checkpoint, stop):
    before = all_files(old_checkpoint)
    process = subprocess.Popen(UPGRADE + [str(old_checkpoint)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True)
    for line in process.stdout:
        if line.startswith("verifying"):
            break
    staged = debris(old_checkpoint.parent)
    assert len(staged) == 1
    # wait until the verification child runs, so that it is there to be ended with its parent
    for _ in range(600):
        if processes_mentioning(staged[0]):
            break
        subprocess.run(["sleep", "0.05"])
    process.send_signal(stop)
    code = process.wait(timeout=120)
    assert code != 0
    for _ in range(100):  # the child gets SIGKILL when its parent dies; give the kernel a moment
        if not processes_mentioning(staged[0]):
            break
        subprocess.run(["sleep", "0.05"])
    assert processes_mentioning(staged[0]) == []
    assert all_files(old_checkpoint) == before
    if stop == signal.SIGKILL:
        assert debris(old_checkpoint.parent) == staged
        rerun = subprocess.run(UPGRADE + [str(old_checkpoint), "--no-verify"], capture_output=True, text=True,
                               timeout=600)
        assert rerun.returncode == 0, rerun.stderr
        assert f"removed {staged[0]}, left behind by a run that ended without cleaning up" in rerun.stdout
    else:
        assert code == (143 if stop == signal.SIGTERM else 130)
    assert debris(old_checkpoint.parent) == []


def test_a_failed_check_leaves_the_folder_as_it_was(old_checkpoint, monkeypatch):
    before = all_files(old_checkpoint)

    def mismatch(folder, scratch):
        raise UpgradeError("the upgraded folder generates [[1]] as remote code but this package's classes ...")

    monkeypatch.setattr(upgrade_module, "verify", mismatch)
    with pytest.raises(UpgradeError, match="generates"):
        upgrade_module.upgrade(old_checkpoint, log=lambda line: None)
    assert all_files(old_checkpoint) == before
    assert debris(old_checkpoint.parent) == []


@pytest.mark.parametrize("content, message", [
    ('{"model_type": "llama"}', "has model_type 'llama'; this tool upgrades 'tokenpacker' checkpoints"),
    ("{not json", "is not readable JSON"),
])
def test_a_folder_that_is_no_tokenpacker_checkpoint_gets_a_one_line_error(tmp_path, content, message):
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "config.json").write_text(content)
    result = subprocess.run(UPGRADE + [str(folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith("tokenpacker-upgrade: error:") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert os.listdir(folder) == ["config.json"]


def test_push_to_hub_uploads_only_the_changed_files(old_checkpoint, monkeypatch):
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls.append(("create_repo", repo_id, exist_ok))

        def upload_folder(self, repo_id, folder_path, allow_patterns, commit_message):
            calls.append(("upload_folder", repo_id, folder_path, allow_patterns))

    import huggingface_hub

    changed = sorted(plan_upgrade(old_checkpoint))
    assert "modeling_tokenpacker.py" in changed and "model.safetensors" not in changed
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    upgrade_module.upgrade(old_checkpoint, verify_result=False, push_to_hub="someone/tokenpacker-tiny",
                           log=lambda line: None)
    assert calls == [("create_repo", "someone/tokenpacker-tiny", True),
                     ("upload_folder", "someone/tokenpacker-tiny", str(old_checkpoint), changed)]
    with pytest.raises(UpgradeError, match="not a Hub repository id"):
        upgrade_module.upgrade(old_checkpoint, push_to_hub="not a repo//id", log=lambda line: None)
