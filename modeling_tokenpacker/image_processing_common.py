"""Turning whatever a user passes as an image into an RGB PIL image, by one documented set of rules, or a clear error.

Shipped inside checkpoints as remote code with the image processors (imports numpy, PIL, torch and transformers
only). The rules (also in README, "Images"):

- strings: a local path, a `file://` URL, an `http(s)://` URL or base64 data (a `data:image/...;base64,` URI or
  bare) are decoded by transformers' own `load_image`, as every transformers processor decodes them: the EXIF
  orientation applied, converted to 8-bit RGB by PIL (as the original's `Image.open(f).convert("RGB")`);
- PIL images: the EXIF orientation applied; 16-bit modes (`I;16`, `I;16L`, `I;16B`, `I;16N`) scaled from 0..65535
  to 0..255; mode `I` (32-bit integers) and `F` (floats) follow the array rules below; every other mode converted by
  PIL (RGBA and LA drop alpha, as the original's conversion does; `La` goes through `LA`); animated images give their
  first frame;
- numpy arrays and torch tensors: `[H, W]` or `[H, W, C]` / `[C, H, W]` with C in 1, 3, 4 (a 4-D batch is a list of
  images). The channel axis: `input_data_format` ("channels_first" / "channels_last") when given; otherwise the one
  axis that can be channels, and when both ends can, the library's convention: last for numpy (as PIL), first for
  torch. dtypes: `bool` (False/True -> 0/255), `uint8`, `uint16` (16-bit, scaled as above), other integers holding
  8-bit values 0..255, floats (any precision) in [0, 1]; NaN or infinite values, values outside the range, complex
  or object arrays are refused;
- size: at least 1 x 1, at most `max_image_pixels` pixels (PIL's decompression-bomb limit by default) and
  `max_image_side` pixels on the longer side.
Every refusal is a ValueError or TypeError that names the image (its index in the flattened batch) and says what was
expected and what came.
"""

import os
from urllib.parse import unquote, urlparse

import numpy as np
from PIL import Image, ImageOps

# PIL's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS), applied to every image however it arrives.
MAX_IMAGE_PIXELS = 178_956_970
MAX_IMAGE_SIDE = 32_768
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
CHANNEL_COUNTS = (1, 3, 4)
CHANNELS_FIRST, CHANNELS_LAST = "channels_first", "channels_last"
EXIF_ORIENTATION = 0x0112


def is_torch_tensor(value):
    return type(value).__module__.split(".")[0] == "torch" and hasattr(value, "numpy")


def describe(item):
    """A short description of an input for error messages."""
    if isinstance(item, str):
        return repr(item if len(item) <= 80 else item[:77] + "...")
    if isinstance(item, Image.Image):
        return f"PIL image {item.width}x{item.height} mode {item.mode}"
    if isinstance(item, np.ndarray) or is_torch_tensor(item):
        return f"{type(item).__module__.split('.')[0]} array of shape {tuple(item.shape)} and dtype {item.dtype}"
    return type(item).__name__


def flatten_images(images):
    """A nested list/tuple of images (4-D arrays and tensors count as batches) -> a flat list, in order."""
    if isinstance(images, (list, tuple)):
        flat = []
        for item in images:
            flat.extend(flatten_images(item))
        return flat
    if (isinstance(images, np.ndarray) or is_torch_tensor(images)) and images.ndim == 4:
        return list(images)
    return [images]


def load_image_source(source, index):
    """A string image source -> PIL image, through transformers' `load_image` (paths, file:// and http(s) URLs,
    base64); a ValueError naming the source when it is none of those or does not decode."""
    from transformers.image_utils import load_image

    if source.startswith("file://"):
        source = unquote(urlparse(source).path)
    is_remote = source.startswith(("http://", "https://", "data:image/"))
    if not is_remote and not os.path.isfile(source):
        looks_like_path = len(source) < 256 and ("/" in source or os.sep in source or "." in source[-6:])
        if looks_like_path or os.path.exists(source):
            raise ValueError(f"Image {index}: {describe(source)} is not an existing image file.")
    try:
        return load_image(source)
    except (OSError, ValueError, SyntaxError) as error:  # PIL's decoders raise all three for broken data
        reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        raise ValueError(f"Image {index}: {describe(source)} could not be read as an image: {reason}.") from None


def _channel_axis(array, library, input_data_format, index, item):
    if input_data_format is not None:
        if input_data_format not in (CHANNELS_FIRST, CHANNELS_LAST):
            raise ValueError(f"input_data_format must be {CHANNELS_FIRST!r} or {CHANNELS_LAST!r}; got "
                             f"{input_data_format!r}.")
        axis = 0 if input_data_format == CHANNELS_FIRST else -1
        if array.shape[axis] not in CHANNEL_COUNTS:
            raise ValueError(f"Image {index}: {describe(item)} with input_data_format={input_data_format!r} has "
                             f"{array.shape[axis]} channels; expected 1, 3 or 4.")
        return axis
    first, last = array.shape[0] in CHANNEL_COUNTS, array.shape[-1] in CHANNEL_COUNTS
    if first and last:
        return 0 if library == "torch" else -1
    if first or last:
        return 0 if first else -1
    raise ValueError(f"Image {index}: {describe(item)} has no axis of 1, 3 or 4 channels; expected [H, W], "
                     "[H, W, C] or [C, H, W] with C in 1, 3, 4.")


def _to_uint8(values, dtype, index, item):
    """Array values -> uint8 by the dtype rules of the module docstring."""
    if dtype == np.bool_:
        return values.astype(np.uint8) * 255
    if dtype == np.uint8:
        return values
    if dtype == np.uint16:
        return np.round(values.astype(np.float64) / 257.0).astype(np.uint8)
    if np.issubdtype(dtype, np.integer):
        if values.size and (values.min() < 0 or values.max() > 255):
            raise ValueError(f"Image {index}: {describe(item)} holds values in [{values.min()}, {values.max()}]; "
                             "integer images other than uint16 must hold 8-bit values in [0, 255] (pass 16-bit data as "
                             "uint16, or PIL mode I;16).")
        return values.astype(np.uint8)
    if np.issubdtype(dtype, np.floating):
        if values.size and not np.isfinite(values).all():
            raise ValueError(f"Image {index}: {describe(item)} holds NaN or infinite values.")
        if values.size and (values.min() < 0 or values.max() > 1):
            raise ValueError(f"Image {index}: {describe(item)} holds values in [{values.min()}, {values.max()}]; "
                             "float images must hold values in [0, 1].")
        return np.round(values.astype(np.float64) * 255).astype(np.uint8)
    raise TypeError(f"Image {index}: {describe(item)} has dtype {dtype}; expected bool, an integer or a float dtype.")


def array_to_pil(array, index, input_data_format=None, library="numpy", item=None,
                 limits=(MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE)):
    """`[H, W]`, `[H, W, C]` or `[C, H, W]` array -> PIL image (L, RGB or RGBA) by the module's rules; `limits` are
    (max pixels, max side)."""
    item = array if item is None else item
    if array.dtype == object or np.issubdtype(array.dtype, np.complexfloating):
        raise TypeError(f"Image {index}: {describe(item)}; expected a real-valued image array.")
    if array.ndim == 3:
        if _channel_axis(array, library, input_data_format, index, item) == 0:
            array = np.moveaxis(array, 0, -1)
        if array.shape[-1] == 1:
            array = array[..., 0]
    elif array.ndim != 2:
        raise ValueError(f"Image {index}: {describe(item)}; expected [H, W], [H, W, C] or [C, H, W] (a batch of images "
                         "as [N, H, W, C] / [N, C, H, W]).")
    check_size(array.shape[1], array.shape[0], index, item, *limits)
    return Image.fromarray(np.ascontiguousarray(_to_uint8(array, array.dtype, index, item)))


def check_size(width, height, index, item, max_pixels=MAX_IMAGE_PIXELS, max_side=MAX_IMAGE_SIDE):
    if width < 1 or height < 1:
        raise ValueError(f"Image {index}: {describe(item)} is {width}x{height} pixels; expected at least 1x1.")
    if width * height > max_pixels:
        raise ValueError(f"Image {index}: {describe(item)} has {width * height} pixels, more than max_image_pixels="
                         f"{max_pixels} (raise it in the image processor to accept such images).")
    if max(width, height) > max_side:
        raise ValueError(f"Image {index}: {describe(item)} is {max(width, height)} pixels on its longer side, more "
                         f"than max_image_side={max_side} (raise it in the image processor to accept such images).")


def pil_to_rgb(image, index, item=None):
    """Any PIL image -> RGB PIL image by the module's rules (EXIF orientation applied)."""
    item = image if item is None else item
    try:
        image.load()
        if image.getexif().get(EXIF_ORIENTATION, 1) != 1:  # exif_transpose copies even an upright image
            image = ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError) as error:  # truncated data, a closed image
        raise ValueError(f"Image {index}: {describe(item)} cannot be read: {str(error).splitlines()[0][:160]}.") from None
    no_limits = (float("inf"), float("inf"))  # checked on the PIL image already
    if image.mode in SIXTEEN_BIT_MODES:
        return array_to_pil(np.asarray(image).astype(np.uint16), index, item=item, limits=no_limits).convert("RGB")
    if image.mode in ("I", "F"):
        values = np.asarray(image).astype(np.int64 if image.mode == "I" else np.float64)
        return array_to_pil(values, index, item=item, limits=no_limits).convert("RGB")
    if image.mode == "La":  # PIL converts La (premultiplied alpha) to nothing but LA
        image = image.convert("LA")
    # PIL's own conversion, as the original's Image.open(f).convert("RGB") (alpha dropped, palettes expanded).
    return image if image.mode == "RGB" else image.convert("RGB")


def to_rgb_image(image, index=0, input_data_format=None, max_pixels=MAX_IMAGE_PIXELS, max_side=MAX_IMAGE_SIDE):
    """One input (string source, PIL image, numpy array or torch tensor) -> RGB PIL image, or a ValueError/TypeError
    naming input `index`."""
    item = image
    if isinstance(image, str):
        image = load_image_source(image, index)
    elif is_torch_tensor(image):
        tensor = image.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()  # numpy has no bfloat16
        try:
            array = tensor.numpy()
        except TypeError as error:  # a dtype numpy lacks
            raise TypeError(f"Image {index}: {describe(item)} cannot become a numpy array ({error}).") from None
        limits = (max_pixels, max_side)
        return array_to_pil(array, index, input_data_format, "torch", item, limits).convert("RGB")
    if isinstance(image, np.ndarray):
        limits = (max_pixels, max_side)
        return array_to_pil(image, index, input_data_format, "numpy", item, limits).convert("RGB")
    if not isinstance(image, Image.Image):
        raise TypeError(f"Image {index}: got {describe(item)}; expected a PIL image, a numpy array, a torch tensor, a "
                        "path, a file:// or http(s) URL, or base64 data.")
    check_size(image.width, image.height, index, item, max_pixels, max_side)
    return pil_to_rgb(image, index, item)
