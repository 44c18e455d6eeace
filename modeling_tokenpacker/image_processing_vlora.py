"""VLoRA image processor: LLaVA-1.5's preprocessing, as the original VLoRA runs it.

Shipped inside checkpoints as remote code (imports numpy, PIL, torch, transformers and sibling modules only).
"""

# transformers 4.46 copies only the relative imports an entry module names itself into its module cache: every
# module this one needs, directly or not, is named here.
from .image_processing_common import flatten_images  # noqa: F401
from .image_processing_tokenpacker import SLICE_MODE, TokenPackerImageProcessor


class VLoRAImageProcessor(TokenPackerImageProcessor):
    r"""Prepares images for VLoRA as the original does (its `process_images`, LLaVA-1.5's).

    `image_aspect_ratio="pad"` (the fine-tuned checkpoints): letterbox onto a square of side max(W, H) filled with
    the mean colour (as 8-bit integers, truncated), image centred; then CLIP preprocessing (shortest edge to `size`,
    bicubic; centre crop to `crop_size`; rescale; normalise). Any other value (stage 1's `"square"`): CLIP
    preprocessing directly. Returns `pixel_values` `[num_images, 3, crop_h, crop_w]` float32. Inputs of every kind
    follow image_processing_common.py's rules. TokenPacker-HD's `"slice"` mode does not exist for VLoRA.
    """

    model_input_names = ["pixel_values"]

    def _check_settings(self):
        if self.image_aspect_ratio == SLICE_MODE:
            raise ValueError("VLoRA has no 'slice' (high-resolution) mode; use image_aspect_ratio='pad' or 'square'.")
        super()._check_settings()

    def preprocess(self, images, return_tensors=None, image_aspect_ratio=None, **kwargs):
        """As `TokenPackerImageProcessor.preprocess` in 'pad' or plain mode: `pixel_values` `[num_images, 3, H, W]`."""
        if image_aspect_ratio == SLICE_MODE or kwargs.get("patch_num") is not None:
            raise ValueError("VLoRA has no 'slice' (high-resolution) mode: image_aspect_ratio must be 'pad' or "
                             f"another plain mode and patch_num unset; got {image_aspect_ratio!r}.")
        return super().preprocess(images, return_tensors=return_tensors, image_aspect_ratio=image_aspect_ratio,
                                  **kwargs)
