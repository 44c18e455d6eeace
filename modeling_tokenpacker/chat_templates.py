"""Chat templates shipped with the package (the converter and the demo write them into checkpoints).

Their source is processing/chat_templates/ at the repository's top level, beside the processor presets; a wheel
installs them as package data (`modeling_tokenpacker/chat_templates_data/`), and a source checkout reads them in
place.
"""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
TEMPLATE_DIRS = (PACKAGE_DIR / "chat_templates_data", PACKAGE_DIR.parent / "processing" / "chat_templates")


def template_dir():
    """The folder that holds the `.jinja` files: the installed copy, else the repository's."""
    for folder in TEMPLATE_DIRS:
        if folder.is_dir() and any(folder.glob("*.jinja")):
            return folder
    raise FileNotFoundError(f"No chat templates in {[str(folder) for folder in TEMPLATE_DIRS]}; reinstall the package.")


def load_chat_template(name="vicuna_v1"):
    """The Jinja text of a bundled chat template, e.g. `vicuna_v1`."""
    folder = template_dir()
    path = folder / f"{name}.jinja"
    if not path.is_file():
        available = sorted(item.stem for item in folder.glob("*.jinja"))
        raise ValueError(f"Unknown chat template {name!r}; available: {available}.")
    return path.read_text(encoding="utf-8")
