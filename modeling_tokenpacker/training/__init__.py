"""Fine-tuning TokenPacker on your own data with the original's recipe: conversations read from the LLaVA format
or 🤗 datasets' vision-language convention, input ids and labels exactly as the original builds them, batches as
the model takes them. Not shipped inside checkpoints."""

from .collator import TokenPackerDataCollator
from .data import ConversationDataset, ExampleBuilder, StreamingConversationDataset, read_llava_json
from .labels import IGNORE_INDEX, LabelBuilder, SampleError

__all__ = [
    "IGNORE_INDEX",
    "ConversationDataset",
    "ExampleBuilder",
    "LabelBuilder",
    "SampleError",
    "StreamingConversationDataset",
    "TokenPackerDataCollator",
    "read_llava_json",
]
