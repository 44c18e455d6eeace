"""TokenPacker image processor: the original's CLIP preprocessing, with PIL and numpy only.

Shipped inside checkpoints as remote code (imports torch-free numpy/PIL code and transformers only); works from
transformers 4.46 to 5.x by overriding `preprocess` fully on `BaseImageProcessor` (design.md §5).
"""

import numpy as np
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SLICE_MODE = "slice"
SUPPORTED_MODES = "'pad' (letterbox to a square, then CLIP resize + centre crop) or any other value such as 'square' (CLIP resize + centre crop)"
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _is_torch_tensor(value):
    return type(value).__module__.split(".")[0] == "torch" and hasattr(value, "numpy")


def _array_to_pil(array):
    """`[H, W]`, `[H, W, C]` or `[C, H, W]` (C in 1, 3, 4) uint8 or float in [0, 1] -> PIL image."""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(
            f"Expected an image array of shape [H, W], [H, W, C] or [C, H, W] with C in (1, 3, 4); got {array.shape}."
        )
    if np.issubdtype(array.dtype, np.floating):
        if array.size and (np.nanmin(array) < 0 or np.nanmax(array) > 1):
            raise ValueError(
                f"Float image arrays must hold values in [0, 1]; got values in [{np.nanmin(array)}, {np.nanmax(array)}]."
            )
        array = np.round(np.nan_to_num(array) * 255)
    elif array.dtype == np.bool_:
        array = array * 255
    elif not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"Expected an integer, float or bool image array; got dtype {array.dtype}.")
    elif array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(
            f"Integer image arrays must hold values in [0, 255]; got values in [{array.min()}, {array.max()}]."
        )
    return Image.fromarray(array.astype(np.uint8))


def to_rgb_image(image):
    """Any PIL image (every mode; 16-bit data scaled to 8 bits), numpy array or torch tensor -> RGB PIL image."""
    if _is_torch_tensor(image):
        image = image.detach().cpu()
        if image.is_floating_point():
            image = image.float()  # numpy has no bfloat16
        image = image.numpy()
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"Expected a PIL image, a numpy array or a torch tensor; got {type(image).__name__}.")
    if image.mode in HIGH_BIT_DEPTH_MODES:
        # PIL's own conversion clips values above 255. 16-bit modes are scaled from their full range to 8 bits; a
        # 32-bit "I" image is taken as 16-bit data when a value exceeds 255, else as 8-bit values (e.g. "L" -> "I").
        values = np.asarray(image, dtype=np.float64)
        if image.mode != "I" or (values.size and values.max() > 255):
            values = values / 257.0
        image = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8))
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
        image = Image.fromarray(np.clip(np.round(np.nan_to_num(values) * scale), 0, 255).astype(np.uint8))
    return image if image.mode == "RGB" else image.convert("RGB")


def expand_to_square(image, background_color):
    """Letterbox an RGB image onto a square canvas of its longer side, centred (offset `(long - short) // 2`)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background_color)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def _flatten_images(images):
    if isinstance(images, (list, tuple)):
        flat = []
        for item in images:
            flat.extend(_flatten_images(item))
        return flat
    if (isinstance(images, np.ndarray) or _is_torch_tensor(images)) and images.ndim == 4:
        return list(images)
    return [images]


class TokenPackerImageProcessor(BaseImageProcessor):
    r"""Prepares images for TokenPacker as the original LLaVA-1.5 evaluation does.

    `image_aspect_ratio="pad"`: letterbox onto a square filled with the mean colour, then CLIP preprocessing
    (shortest edge to `size`, bicubic; centre crop to `crop_size`; rescale; normalise). Any other value except
    `"slice"`: CLIP preprocessing directly. Returns `pixel_values` `[num_images, 3, crop_h, crop_w]` float32.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size=None,
        crop_size=None,
        image_mean=None,
        image_std=None,
        image_aspect_ratio="pad",
        patch_num=9,
        resample=Image.BICUBIC,
        rescale_factor=1 / 255,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.size = dict(size) if size is not None else {"shortest_edge": 336}
        self.crop_size = dict(crop_size) if crop_size is not None else {"height": 336, "width": 336}
        self.image_mean = list(image_mean) if image_mean is not None else list(OPENAI_CLIP_MEAN)
        self.image_std = list(image_std) if image_std is not None else list(OPENAI_CLIP_STD)
        self.image_aspect_ratio = image_aspect_ratio
        self.patch_num = int(patch_num)
        self.resample = int(resample)
        self.rescale_factor = float(rescale_factor)
        self._check_settings()

    def _check_settings(self):
        if "shortest_edge" not in self.size:
            raise ValueError(f"size must be {{'shortest_edge': int}}; got {self.size}.")
        if set(self.crop_size) != {"height", "width"}:
            raise ValueError(f"crop_size must be {{'height': int, 'width': int}}; got {self.crop_size}.")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(f"image_mean and image_std need 3 values; got {self.image_mean} and {self.image_std}.")
        if self.image_aspect_ratio == SLICE_MODE:
            raise ValueError(
                "image_aspect_ratio='slice' (TokenPacker-HD) is not supported by this image processor yet; "
                f"supported: {SUPPORTED_MODES}."
            )

    @property
    def background_color(self):
        """The letterbox fill of 'pad' mode: the mean colour as 8-bit integers, truncated as the original does."""
        return tuple(int(mean * 255) for mean in self.image_mean)

    def clip_preprocess(self, image):
        """RGB PIL image -> `[3, crop_h, crop_w]` float32: CLIP resize, centre crop, rescale, normalise."""
        width, height = image.size
        shortest = self.size["shortest_edge"]
        if width <= height:
            new_size = (shortest, int(shortest * height / width))
        else:
            new_size = (int(shortest * width / height), shortest)
        pixels = np.asarray(image.resize(new_size, resample=self.resample), dtype=np.uint8)
        pixels = self.center_crop_array(pixels)
        pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        return ((pixels - mean) / std).transpose(2, 0, 1)

    def center_crop_array(self, pixels):
        """`[H, W, 3]` -> `[crop_h, crop_w, 3]`, zero-padded where the image is smaller than the crop."""
        crop_h, crop_w = self.crop_size["height"], self.crop_size["width"]
        height, width = pixels.shape[:2]
        if height < crop_h or width < crop_w:
            padded = np.zeros((max(height, crop_h), max(width, crop_w), 3), dtype=pixels.dtype)
            top, left = -(-(padded.shape[0] - height) // 2), -(-(padded.shape[1] - width) // 2)
            padded[top : top + height, left : left + width] = pixels
            pixels, height, width = padded, padded.shape[0], padded.shape[1]
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        return pixels[top : top + crop_h, left : left + crop_w]

    def preprocess(self, images, return_tensors=None, image_aspect_ratio=None, **kwargs):
        """images: one image or a (nested) list; PIL images of any mode, numpy arrays or torch tensors.

        Returns a `BatchFeature` with `pixel_values` `[num_images, 3, crop_h, crop_w]`.
        """
        mode = self.image_aspect_ratio if image_aspect_ratio is None else image_aspect_ratio
        if mode == SLICE_MODE:
            raise ValueError(
                f"image_aspect_ratio='slice' (TokenPacker-HD) is not supported yet; supported: {SUPPORTED_MODES}."
            )
        unknown = set(kwargs) - {"do_convert_rgb", "data_format", "input_data_format"}
        if unknown:
            raise TypeError(f"Unexpected arguments to TokenPackerImageProcessor.preprocess: {sorted(unknown)}.")
        batch = []
        for image in _flatten_images(images):
            image = to_rgb_image(image)
            if image.width < 1 or image.height < 1:
                raise ValueError(f"Images must be at least 1x1 pixels; got {image.width}x{image.height}.")
            if mode == "pad":
                image = expand_to_square(image, self.background_color)
            batch.append(self.clip_preprocess(image))
        if not batch:
            raise ValueError("No images were given to the image processor.")
        return BatchFeature(data={"pixel_values": np.stack(batch)}, tensor_type=return_tensors)
