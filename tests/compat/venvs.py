"""Virtual environments with another transformers release beside this process's torch.

Each environment gets its own transformers (and what that release needs: huggingface_hub, tokenizers, ...) from
pip, whose cache keeps the wheels, while torch is reused from this interpreter: a `.pth` file points at a folder of
links to this torch and the distributions it requires, so no environment unpacks torch again. Packages installed in
the environment itself come first on its `sys.path`, the linked ones after.
"""

import contextlib
import fcntl
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

CACHE_ROOT = Path(os.environ.get("TOKENPACKER_VENV_ROOT", Path.home() / ".cache" / "modeling_tokenpacker"))
# Left to each environment's own pip: it brings its own versions, and linking them would shadow nothing useful.
NOT_LINKED = {"pip", "setuptools", "wheel"}


def _requirement_names(distribution):
    """Names of the distributions `distribution` requires, extras left out."""
    names = []
    for requirement in distribution.requires or []:
        if "extra ==" in requirement.replace("extra==", "extra =="):
            continue
        names.append(re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0])
    return names


def _closure(name):
    """`name` and every distribution it requires, recursively, as installed here."""
    seen, todo = {}, [name]
    while todo:
        current = todo.pop()
        key = current.lower().replace("_", "-")
        if key in seen or key in NOT_LINKED:
            continue
        distribution = importlib.metadata.distribution(current)
        seen[key] = distribution
        todo.extend(_requirement_names(distribution))
    return list(seen.values())


def torch_link_dir():
    """A folder of links to this interpreter's torch and its requirements (made once per torch version)."""
    import torch

    folder = CACHE_ROOT / f"torch-{torch.__version__}-links"
    with locked(CACHE_ROOT / f".torch-{torch.__version__}-links.lock"):
        return _link_torch(folder)


def _link_torch(folder):
    if (folder / ".complete").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for distribution in _closure("torch"):
        site = Path(distribution.locate_file(""))
        for top in {Path(str(item)).parts[0] for item in distribution.files or []}:
            if top in ("..", "__pycache__") or top.endswith(".pth"):
                continue
            link = folder / top
            if not link.exists() and (site / top).exists():
                link.symlink_to(site / top)
    (folder / ".complete").write_text("")
    return folder


def venv_python(venv):
    return Path(venv) / "bin" / "python"


def installed_version(python, package="transformers"):
    """The version of `package` that `python` imports, or None."""
    if not Path(python).exists():
        return None
    probe = subprocess.run([str(python), "-c", f"import torch, {package}; print({package}.__version__)"],
                           capture_output=True, text=True, timeout=300)
    return probe.stdout.strip() if probe.returncode == 0 else None


@contextlib.contextmanager
def locked(path):
    """An exclusive lock on `path` (a lock file), held by one process at a time (pytest-xdist workers, matrix jobs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_venv(venv, transformers_version, extra_requirements=(), timeout=1200):
    """Python of a virtual environment at `venv` with transformers `transformers_version`, this torch and
    `extra_requirements`; reused when it already imports that version. Raises RuntimeError with pip's output."""
    venv = Path(venv)
    with locked(venv.parent / f".{venv.name}.lock"):
        return _ensure_venv(venv, transformers_version, extra_requirements, timeout)


def _ensure_venv(venv, transformers_version, extra_requirements, timeout):
    python = venv_python(venv)
    marker = venv / ".tokenpacker-requirements"
    wanted = "\n".join([transformers_version, *extra_requirements])
    if installed_version(python) == transformers_version and marker.exists() and marker.read_text() == wanted:
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=300)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "tokenpacker-shared-torch.pth").write_text(f"{torch_link_dir()}\n")
    install = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
               f"transformers=={transformers_version}", *extra_requirements]
    result = subprocess.run(install, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0 or installed_version(python) != transformers_version:
        raise RuntimeError(f"could not build a transformers {transformers_version} environment at {venv}:\n"
                           f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    marker.write_text(wanted)
    return python
