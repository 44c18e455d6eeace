"""TokenPacker image processor: the original's CLIP preprocessing with PIL and numpy, and its HD ('slice') tiling.

Shipped inside checkpoints as remote code (imports numpy, PIL, torch and transformers only; never torchvision);
works from transformers 4.46 to 5.x by overriding `preprocess` fully on `BaseImageProcessor` (design.md §5).
'slice' mode uses torch where parity with the original's torch ops demands it (float32 normalisation, bilinear
resampling with `F.interpolate`'s exact source coordinates and weights).
"""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from .image_processing_common import MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE, describe, flatten_images, to_rgb_image

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SLICE_MODE = "slice"

# TokenPacker-HD's candidate block grids (rows, columns) per maximum block count (`patch_num`), in the original's
# table order: when two grids score the same the earlier one wins. Grouped by number of blocks. The 25-block table
# repeats (4, 6) and (6, 4); the repeats can never win (an earlier equal score does) and are kept for fidelity.
_GRIDS_UP_TO_9 = (
    (1, 1),
    (1, 2), (2, 1),
    (1, 3), (3, 1),
    (2, 2), (1, 4), (4, 1),
    (1, 5), (5, 1),
    (1, 6), (6, 1), (2, 3), (3, 2),
    (1, 7), (7, 1),
    (4, 2), (2, 4), (1, 8), (8, 1),
    (3, 3), (1, 9), (9, 1),
)
_GRIDS_10_TO_16 = (
    (2, 5), (5, 2),
    (2, 6), (6, 2), (3, 4), (4, 3),
    (2, 7), (7, 2),
    (3, 5), (5, 3),
    (2, 8), (8, 2), (4, 4),
)
_GRIDS_17_TO_25 = (
    (3, 6), (6, 3), (2, 9), (9, 2),
    (4, 5), (5, 4), (2, 10), (10, 2),
    (3, 7), (7, 3),
    (11, 2), (2, 11),
    (4, 6), (6, 4), (12, 2), (2, 12), (3, 8), (8, 3), (4, 6), (6, 4),
    (5, 5),
)
SLICE_GRID_CANDIDATES = {
    9: _GRIDS_UP_TO_9,
    16: _GRIDS_UP_TO_9 + _GRIDS_10_TO_16,
    25: _GRIDS_UP_TO_9 + _GRIDS_10_TO_16 + _GRIDS_17_TO_25,
}
SLICE_PATCH_NUMS = tuple(SLICE_GRID_CANDIDATES)
# Bytes of 8-bit source rows read at once while resizing in 'slice' mode (bounds memory for huge images).
SLICE_STRIP_BYTES = 1 << 24
# 'pad' mode builds its letterbox canvas whole up to this size, in bands beyond (letterbox_resize).
CANVAS_BYTES = 1 << 25


def letterbox_resize(image, background_color, size, resample, canvas_bytes=CANVAS_BYTES):
    """The RGB `image` letterboxed onto a square canvas of its longer side (centred at offset `(long - short) // 2`,
    filled with `background_color`) and resized to `size` x `size` by PIL with `resample` ('pad' mode).

    A canvas of more than `canvas_bytes` is never built (a 1 x 50000 image would need 7.5 GB): PIL resizes in two
    passes, horizontal first, and each row of the first pass depends on one canvas row only, so the first pass runs
    over bands of canvas rows (rows outside the image are one background row) and the second, vertical pass over
    its `side x size` result. The pixels equal PIL's resize of the whole canvas (tests/test_image_processing.py).
    """
    width, height = image.size
    side = max(width, height)
    left, top = (side - width) // 2, (side - height) // 2
    if side * side * 3 <= canvas_bytes:
        canvas = Image.new("RGB", (side, side), background_color)
        canvas.paste(image, (left, top))
        return canvas.resize((size, size), resample=resample)
    background_row = Image.new("RGB", (side, 1), background_color).resize((size, 1), resample, box=(0, 0, side, 1))
    first_pass = np.empty((side, size, 3), dtype=np.uint8)
    first_pass[:] = np.asarray(background_row)[0]
    rows_per_band = max(1, canvas_bytes // (side * 3))
    for start in range(top, top + height, rows_per_band):
        stop = min(start + rows_per_band, top + height)
        band = Image.new("RGB", (side, stop - start), background_color)
        band.paste(image.crop((0, start - top, width, stop - top)), (left, 0))
        first_pass[start:stop] = np.asarray(band.resize((size, stop - start), resample, box=(0, 0, side, stop - start)))
    return Image.fromarray(first_pass).resize((size, size), resample, box=(0, 0, size, side))


def choose_block_grid(height, width, patch_num=9, block_size=336):
    """TokenPacker-HD's block grid `(rows, cols)` for an image of `height` x `width` pixels.

    Every candidate grid of `SLICE_GRID_CANDIDATES[patch_num]` is scored as the original does, in float32:
    the fraction of the grid's `rows*block_size` x `cols*block_size` area the image covers once scaled to fit it
    (scaled sides rounded half to even), plus 0.1 x the IoU of the grid's box with the image box scaled by 1.4
    (IoU denominator + 1e-5). The first best candidate wins.
    """
    if patch_num not in SLICE_GRID_CANDIDATES:
        raise ValueError(f"patch_num must be one of {SLICE_PATCH_NUMS} for 'slice' mode; got {patch_num!r}.")
    if height < 1 or width < 1:
        raise ValueError(f"Images must be at least 1x1 pixels; got {width}x{height}.")
    f32 = np.float32
    grids = np.asarray(SLICE_GRID_CANDIDATES[patch_num], dtype=np.int64)
    grid_h = (grids[:, 0] * block_size).astype(f32)
    grid_w = (grids[:, 1] * block_size).astype(f32)
    grid_area = (grids[:, 0] * grids[:, 1] * block_size * block_size).astype(f32)
    image_h, image_w = f32(height), f32(width)
    fit = np.minimum(grid_h / image_h, grid_w / image_w)
    coverage = np.round(image_h * fit) * np.round(image_w * fit) / grid_area
    scaled_h, scaled_w = image_h * f32(1.4), image_w * f32(1.4)
    intersection = np.minimum(grid_h, scaled_h) * np.minimum(grid_w, scaled_w)
    union = grid_area + scaled_h * scaled_w - intersection
    iou = intersection / (union + f32(1e-5))
    score = coverage + iou * f32(0.1)
    rows, cols = SLICE_GRID_CANDIDATES[patch_num][int(np.argmax(score))]
    return rows, cols


def fit_size(height, width, box_height, box_width):
    """`(h, w)` of an image scaled to fit inside `box_height` x `box_width` keeping its aspect ratio, as the original
    computes it (Python floats, the free side `round`ed half to even and capped by the box). The free side is at
    least 1 pixel: the original asks for a 0-pixel side (and fails) for extreme aspect ratios such as 1 x 10000."""
    height_ratio, width_ratio = box_height / height, box_width / width
    if height_ratio <= width_ratio:
        return box_height, max(1, min(box_width, round(width * height_ratio)))
    return max(1, min(box_height, round(height * width_ratio))), box_width


def bilinear_source_weights(input_size, output_size):
    """Source indices and weights of `F.interpolate(mode="bilinear", align_corners=False)` with a target `size` on
    one axis, computed with PyTorch's float32 formulas: output i = `w0[i] * x[i0[i]] + w1[i] * x[i1[i]]`.

    Returns `(i0, i1, w0, w1)`: int64 and float32 tensors of length `output_size`.
    """
    positions = torch.arange(output_size)
    if input_size == output_size:  # PyTorch copies such an axis
        return positions, positions.clone(), torch.ones(output_size), torch.zeros(output_size)
    scale = torch.tensor(input_size, dtype=torch.float32) / torch.tensor(output_size, dtype=torch.float32)
    # PyTorch's (x86 AVX2/AVX-512) CPU kernels compute `scale * (i + 0.5) - 0.5` as one fused multiply-add: the exact
    # value rounded once to float32. In float64 the product of a float32 and `i + 0.5` and the subtraction are exact.
    source = (scale.to(torch.float64) * (positions.to(torch.float64) + 0.5) - 0.5).to(torch.float32).clamp(min=0)
    i0 = source.floor().to(torch.int64).clamp(max=input_size - 1)
    w1 = (source - i0.to(torch.float32)).clamp(0, 1)
    i1 = i0 + (i0 < input_size - 1).to(torch.int64)
    return i0, i1, 1 - w1, w1


def _fused_multiply_add(a, b, c):
    """`a * b + c` rounded once to float32 (float32 inputs): a fused multiply-add, emulated in float64, where
    `a * b` is exact."""
    return (a.to(torch.float64) * b.to(torch.float64) + c.to(torch.float64)).to(torch.float32)


def resize_normalized(image, height, width, mean, std, divisor=255.0, strip_bytes=SLICE_STRIP_BYTES):
    """`[3, height, width]` float32: the RGB PIL `image` normalised (`x / divisor`, then `(x - mean) / std`, float32,
    per pixel as torchvision's ToTensor + Normalize) and bilinearly resized as `F.interpolate(..., "bilinear")`.

    The arithmetic follows PyTorch's generic CPU kernel (the one a multi-threaded run uses for such sizes): along
    the width `t = x0*w0 + (x1*w1)`, then along the height `t0*h0 + (t1*h1)`, each sum a fused multiply-add. The
    result equals `F.interpolate` on the normalised full image bit for bit there, and to ~1 float32 ulp for its
    other kernels. Memory stays bounded for any image size: source rows are read in strips of at most `strip_bytes`
    8-bit bytes (at least the two rows an output row needs), output rows in strips of about a million pixels, and
    only the pixels the interpolation reads are converted to float.
    """
    source_width, source_height = image.size
    rows0, rows1, row_w0, row_w1 = bilinear_source_weights(source_height, height)
    cols0, cols1, col_w0, col_w1 = bilinear_source_weights(source_width, width)
    columns = torch.cat([cols0, cols1]).numpy()
    col_w0, col_w1 = col_w0[:, None], col_w1[:, None]
    mean = torch.tensor(mean, dtype=torch.float32)
    std = torch.tensor(std, dtype=torch.float32)
    row_bytes = source_width * 3
    max_output_rows = max(1, (1 << 20) // width)
    output = torch.empty(height, width, 3)
    start = 0
    while start < height:
        first = int(rows0[start])
        stop = start + 1
        while (stop < height and stop - start < max_output_rows
               and (int(rows1[stop]) - first + 1) * row_bytes <= strip_bytes):
            stop += 1
        last = int(rows1[stop - 1])
        strip = np.asarray(image.crop((0, first, source_width, last + 1)))
        needed = torch.unique(torch.cat([rows0[start:stop], rows1[start:stop]]))
        pixels = torch.from_numpy(strip[np.ix_((needed - first).numpy(), columns)])
        del strip
        pixels = pixels.to(torch.float32).div(divisor).sub(mean).div(std)
        across = _fused_multiply_add(pixels[:, :width], col_w0, pixels[:, width:] * col_w1)  # [len(needed), width, 3]
        top = across[torch.searchsorted(needed, rows0[start:stop])]
        bottom = across[torch.searchsorted(needed, rows1[start:stop])]
        weight0, weight1 = row_w0[start:stop, None, None], row_w1[start:stop, None, None]
        output[start:stop] = _fused_multiply_add(top, weight0, bottom * weight1)
        start = stop
    return output.permute(2, 0, 1)


class TokenPackerImageProcessor(BaseImageProcessor):
    r"""Prepares images for TokenPacker as the original LLaVA-1.5 evaluation does.

    Inputs of every kind (paths, URLs, arrays, PIL modes) follow the rules of image_processing_common.py;
    `max_image_pixels` and `max_image_side` bound what is accepted.

    `image_aspect_ratio="pad"`: letterbox onto a square filled with the mean colour, then CLIP preprocessing
    (shortest edge to `size`, bicubic; centre crop to `crop_size`; rescale; normalise). Any other value except
    `"slice"`: CLIP preprocessing directly. Both return `pixel_values` `[num_images, 3, crop_h, crop_w]` float32.

    `image_aspect_ratio="slice"` (TokenPacker-HD, the original's evaluation pipeline): the image is rescaled and
    normalised at its own size, a `(rows, cols)` grid of at most `patch_num` (9, 16 or 25) blocks is chosen
    (`choose_block_grid`), the image is bilinearly resized to fit `rows*B` x `cols*B` (B = `crop_size`, 336) keeping
    its aspect ratio, placed top-left on a zero canvas and cut row-major into B x B blocks. With more than one block a
    global view follows: the whole padded canvas resized to fit the *image's* aspect ratio into B x B, top-left on a
    zero B x B canvas (the original's quirk, reproduced). Returns `pixel_values` `[total_blocks, 3, B, B]` (every
    image's blocks, then its global view, image after image) and `image_grids` int64 `[num_images, 2]` (rows, cols).
    """

    model_input_names = ["pixel_values", "image_grids"]

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
        max_image_pixels=MAX_IMAGE_PIXELS,
        max_image_side=MAX_IMAGE_SIDE,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.max_image_pixels = int(max_image_pixels)
        self.max_image_side = int(max_image_side)
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
            self._check_slice_settings(self.patch_num)

    def _check_slice_settings(self, patch_num):
        if patch_num not in SLICE_GRID_CANDIDATES:
            raise ValueError(
                f"patch_num must be one of {SLICE_PATCH_NUMS} with image_aspect_ratio='slice' (TokenPacker-HD); "
                f"got {patch_num!r}."
            )
        if self.crop_size["height"] != self.crop_size["width"]:
            raise ValueError(
                f"image_aspect_ratio='slice' needs square blocks: crop_size height == width; got {self.crop_size}."
            )

    @property
    def background_color(self):
        """The letterbox fill of 'pad' mode: the mean colour as 8-bit integers, truncated as the original does."""
        return tuple(int(mean * 255) for mean in self.image_mean)

    def clip_preprocess(self, image, index=0, letterbox=False):
        """RGB PIL image -> `[3, crop_h, crop_w]` float32: CLIP resize (shortest edge to `size`, `resample`),
        centre crop, rescale, normalise; with `letterbox` ('pad' mode) the image is first letterboxed onto a square of
        the mean colour (`letterbox_resize`, memory bounded)."""
        width, height = image.size
        shortest = self.size["shortest_edge"]
        if letterbox:
            resized = letterbox_resize(image, self.background_color, shortest, self.resample)
        else:
            if width <= height:
                new_size = (shortest, int(shortest * height / width))
            else:
                new_size = (int(shortest * width / height), shortest)
            if new_size[0] * new_size[1] > self.max_image_pixels:
                raise ValueError(
                    f"Image {index}: {describe(image)} would be resized to {new_size[0]}x{new_size[1]} before its "
                    f"centre crop in image_aspect_ratio={self.image_aspect_ratio!r} mode, more than max_image_pixels="
                    f"{self.max_image_pixels}; use 'pad' or 'slice' mode for such aspect ratios."
                )
            resized = image.resize(new_size, resample=self.resample)
        pixels = self.center_crop_array(np.asarray(resized, dtype=np.uint8))
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

    def slice_grid(self, height, width, patch_num=None):
        """`(rows, cols)` block grid that 'slice' mode uses for a `height` x `width` image."""
        patch_num = self.patch_num if patch_num is None else int(patch_num)
        return choose_block_grid(height, width, patch_num, self.crop_size["height"])

    def slice_preprocess(self, image, patch_num=None):
        """RGB PIL image -> (`[blocks (+1 global view), 3, B, B]` float32 tensor, `(rows, cols)`): 'slice' mode."""
        block = self.crop_size["height"]
        rows, cols = self.slice_grid(image.height, image.width, patch_num)
        canvas_h, canvas_w = rows * block, cols * block
        height, width = fit_size(image.height, image.width, canvas_h, canvas_w)
        canvas = torch.zeros(3, canvas_h, canvas_w)
        canvas[:, :height, :width] = resize_normalized(
            image, height, width, self.image_mean, self.image_std, divisor=1.0 / self.rescale_factor
        )
        blocks = canvas.reshape(3, rows, block, cols, block).permute(1, 3, 0, 2, 4)
        blocks = blocks.reshape(rows * cols, 3, block, block)
        if rows * cols == 1:
            return blocks, (rows, cols)
        # The global view resizes the padded canvas, but to the size that fits the original image's aspect ratio.
        height, width = fit_size(image.height, image.width, block, block)
        view = torch.zeros(1, 3, block, block)
        view[:, :, :height, :width] = F.interpolate(canvas[None], size=(height, width), mode="bilinear",
                                                    align_corners=False)
        return torch.cat([blocks, view]), (rows, cols)

    def preprocess(self, images, return_tensors=None, image_aspect_ratio=None, patch_num=None, input_data_format=None,
                   **kwargs):
        """images: one image or a (nested) list of them: PIL images, numpy arrays, torch tensors, paths, file:// or
        http(s) URLs, base64 data (the rules: image_processing_common.py). `input_data_format` ("channels_first" /
        "channels_last") says where arrays keep their channels when their shape leaves it open.

        Returns a `BatchFeature` with `pixel_values` `[num_images, 3, crop_h, crop_w]`; in 'slice' mode
        `pixel_values` `[total_blocks, 3, B, B]` and `image_grids` int64 `[num_images, 2]` (see the class docstring).
        """
        mode = self.image_aspect_ratio if image_aspect_ratio is None else image_aspect_ratio
        patch_num = self.patch_num if patch_num is None else patch_num
        if mode == SLICE_MODE:
            self._check_slice_settings(patch_num)
        unknown = set(kwargs) - {"do_convert_rgb", "data_format"}
        if unknown:
            raise TypeError(f"Unexpected arguments to TokenPackerImageProcessor.preprocess: {sorted(unknown)}.")
        flat = flatten_images(images)
        if not flat:
            raise ValueError("No images were given to the image processor (an empty list).")
        batch, grids = [], []
        for index, image in enumerate(flat):
            image = to_rgb_image(image, index, input_data_format, self.max_image_pixels, self.max_image_side)
            if mode == SLICE_MODE:
                blocks, grid = self.slice_preprocess(image, patch_num)
                batch.append(blocks.numpy())
                grids.append(grid)
            else:
                batch.append(self.clip_preprocess(image, index, letterbox=mode == "pad")[None])
        data = {"pixel_values": np.concatenate(batch)}
        if mode == SLICE_MODE:
            data["image_grids"] = np.asarray(grids, dtype=np.int64).reshape(-1, 2)
        return BatchFeature(data=data, tensor_type=return_tensors)
