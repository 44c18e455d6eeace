"""TokenPacker for 🤗 transformers.

Importing the package registers the classes with the Auto factories, so local use needs no `trust_remote_code`;
`save_pretrained` writes the four model modules into the checkpoint so it also loads without the package.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

# From its module rather than the top level: transformers 5.4 ... 5.17 gate the top-level name on torchvision, for
# every model, although the class needs no torchvision (docs/private-surface.md).
from transformers.models.auto.image_processing_auto import AutoImageProcessor

from .chat_templates import load_chat_template
from .configuration_tokenpacker import TokenPackerConfig
from .image_processing_tokenpacker import TokenPackerImageProcessor
from .modeling_tokenpacker import TokenPackerForConditionalGeneration, TokenPackerModel, TokenPackerPreTrainedModel
from .modeling_tokenpacker_projector import TokenPackerProjector
from .processing_tokenpacker import TokenPackerProcessor

__version__ = "0.1.0"

__all__ = [
    "TokenPackerConfig",
    "TokenPackerForConditionalGeneration",
    "TokenPackerImageProcessor",
    "TokenPackerModel",
    "TokenPackerPreTrainedModel",
    "TokenPackerProcessor",
    "TokenPackerProjector",
    "load_chat_template",
]


def _register():
    AutoConfig.register(TokenPackerConfig.model_type, TokenPackerConfig, exist_ok=True)
    AutoModel.register(TokenPackerConfig, TokenPackerModel, exist_ok=True)
    AutoModelForCausalLM.register(TokenPackerConfig, TokenPackerForConditionalGeneration, exist_ok=True)
    AutoModelForImageTextToText.register(TokenPackerConfig, TokenPackerForConditionalGeneration, exist_ok=True)
    AutoImageProcessor.register(TokenPackerConfig, slow_image_processor_class=TokenPackerImageProcessor, exist_ok=True)
    AutoProcessor.register(TokenPackerConfig, TokenPackerProcessor, exist_ok=True)
    TokenPackerConfig.register_for_auto_class("AutoConfig")
    TokenPackerModel.register_for_auto_class("AutoModel")
    TokenPackerForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    TokenPackerImageProcessor.register_for_auto_class("AutoImageProcessor")
    TokenPackerProcessor.register_for_auto_class("AutoProcessor")


_register()
