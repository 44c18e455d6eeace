"""The files a checkpoint carries so that it loads with `trust_remote_code=True` (not shipped itself)."""

from pathlib import Path

from transformers.dynamic_module_utils import get_relative_import_files

PACKAGE_DIR = Path(__file__).resolve().parent
# The modules `save_pretrained` writes into a checkpoint of each family, with whatever they import relatively.
ENTRY_MODULES = ("configuration_tokenpacker", "modeling_tokenpacker", "processing_tokenpacker",
                 "image_processing_tokenpacker")
VLORA_ENTRY_MODULES = ("configuration_vlora", "modeling_vlora", "processing_vlora", "image_processing_vlora")


def shipped_files(entry_modules=ENTRY_MODULES):
    """`{file name: path}` of this release's remote-code modules for a family (TokenPacker's by default): the entry
    modules and their relative imports (found as `save_pretrained` finds them)."""
    files = {}
    for name in entry_modules:
        path = PACKAGE_DIR / f"{name}.py"
        for item in [str(path), *get_relative_import_files(str(path))]:
            files[Path(item).name] = Path(item)
    return files
