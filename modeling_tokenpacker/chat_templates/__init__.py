"""Chat templates shipped with the package (the converter writes them into checkpoints)."""

from pathlib import Path

TEMPLATE_DIR = Path(__file__).parent


def load_chat_template(name="vicuna_v1"):
    """The Jinja text of a bundled chat template, e.g. `vicuna_v1`."""
    path = TEMPLATE_DIR / f"{name}.jinja"
    if not path.is_file():
        available = sorted(item.stem for item in TEMPLATE_DIR.glob("*.jinja"))
        raise ValueError(f"Unknown chat template {name!r}; available: {available}.")
    return path.read_text(encoding="utf-8")
