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
from .configuration_vlora import VLoRAConfig
from .image_processing_vlora import VLoRAImageProcessor
from .modeling_vlora import VLoRAForConditionalGeneration, VLoRAModel, VLoRAPreTrainedModel
from .modeling_vlora_generator import VLoRAPerceptualWeightsGenerator
from .processing_vlora import VLoRAProcessor

__version__ = "0.1.0"

__all__ = [
    "TokenPackerConfig",
    "TokenPackerForConditionalGeneration",
    "TokenPackerImageProcessor",
    "TokenPackerModel",
    "TokenPackerPreTrainedModel",
    "TokenPackerProcessor",
    "TokenPackerProjector",
    "VLoRAConfig",
    "VLoRAForConditionalGeneration",
    "VLoRAImageProcessor",
    "VLoRAModel",
    "VLoRAPerceptualWeightsGenerator",
    "VLoRAPreTrainedModel",
    "VLoRAProcessor",
    "load_chat_template",
]


def _register(config_class, model_class, head_class, image_processor_class, processor_class):
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(config_class, model_class, exist_ok=True)
    AutoModelForCausalLM.register(config_class, head_class, exist_ok=True)
    AutoModelForImageTextToText.register(config_class, head_class, exist_ok=True)
    AutoImageProcessor.register(config_class, slow_image_processor_class=image_processor_class, exist_ok=True)
    AutoProcessor.register(config_class, processor_class, exist_ok=True)
    config_class.register_for_auto_class("AutoConfig")
    model_class.register_for_auto_class("AutoModel")
    head_class.register_for_auto_class("AutoModelForImageTextToText")
    image_processor_class.register_for_auto_class("AutoImageProcessor")
    processor_class.register_for_auto_class("AutoProcessor")


_register(TokenPackerConfig, TokenPackerModel, TokenPackerForConditionalGeneration, TokenPackerImageProcessor,
          TokenPackerProcessor)
_register(VLoRAConfig, VLoRAModel, VLoRAForConditionalGeneration, VLoRAImageProcessor, VLoRAProcessor)
