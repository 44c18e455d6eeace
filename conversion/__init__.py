"""Converter from original TokenPacker (LLaVA-1.5 fork) checkpoints to the 🤗 transformers TokenPacker format.

Not shipped inside checkpoints. Importing this package does not import `modeling_tokenpacker` (the converter's
verification child relies on that to load the output through the remote code only).
"""

CONVERTER_VERSION = "1.0.0"
