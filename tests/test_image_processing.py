"""TokenPackerImageProcessor against the original LLaVA-1.5 preprocessing (letterbox + transformers' PIL/numpy CLIP
image processor), on every input kind and PIL mode, with a property test over image sizes."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from modeling_tokenpacker import TokenPackerImageProcessor
from modeling_tokenpacker.demo import synthesize_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIDE = 336

SIZES = [
    pytest.param((480, 360), id="wide"),
    pytest.param((300, 500), id="tall"),
    pytest.param((336, 336), id="square-336"),
    pytest.param((97, 97), id="square-small"),
    pytest.param((1, 1), id="1x1"),
    pytest.param((1, 7), id="1x7"),
    pytest.param((7, 1), id="7x1"),
    pytest.param((333, 101), id="odd-wide"),
    pytest.param((101, 333), id="odd-tall"),
    pytest.param((17, 999), id="odd-very-tall"),
    pytest.param((999, 17), id="odd-very-wide"),
    pytest.param((641, 479), id="odd-large"),
]


def make_clip_reference_processor():
    """transformers' CLIP image processor on its PIL/numpy path, configured as openai/clip-vit-large-patch14-336.

    transformers 5: `CLIPImageProcessorPil` (the default `CLIPImageProcessor` there is torchvision-backed and resizes
    differently); transformers 4.x: `CLIPImageProcessor` is the PIL/numpy one.
    """
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as processor_class
    except ImportError:  # transformers 4.x
        from transformers import CLIPImageProcessor as processor_class
    return processor_class(
        do_resize=True,
        size={"shortest_edge": SIDE},
        resample=Image.BICUBIC,
        do_center_crop=True,
        crop_size={"height": SIDE, "width": SIDE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )


@pytest.fixture(scope="module")
def clip_reference():
    return make_clip_reference_processor()


@pytest.fixture(scope="module")
def image_processor():
    return TokenPackerImageProcessor()


def clip_pixels(clip_processor, image):
    return np.asarray(clip_processor(image, return_tensors="np")["pixel_values"], dtype=np.float32)


def reference_letterbox(image, background):
    """The original's expand-to-square, written here independently: longer side, centred, mean-colour fill."""
    width, height = image.size
    if width == height:
        return image
    if width > height:
        canvas = Image.new(image.mode, (width, width), background)
        canvas.paste(image, (0, (width - height) // 2))
    else:
        canvas = Image.new(image.mode, (height, height), background)
        canvas.paste(image, ((height - width) // 2, 0))
    return canvas


def reference_pad_pipeline(clip_processor, image):
    background = tuple(int(mean * 255) for mean in CLIP_MEAN)
    return clip_pixels(clip_processor, reference_letterbox(image.convert("RGB"), background))


def max_abs_diff(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


def random_rgb_array(height=23, width=37, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Parity with the original pipeline


@pytest.mark.parametrize("size", SIZES)
def test_pad_mode_matches_original_pipeline_within_1e6(image_processor, clip_reference, size):
    image = synthesize_image(*size)
    expected = reference_pad_pipeline(clip_reference, image)
    actual = image_processor(image, return_tensors="np")["pixel_values"]
    assert actual.shape == (1, 3, SIDE, SIDE)
    assert actual.dtype == np.float32
    assert max_abs_diff(actual, expected) <= 1e-6


def test_pad_mode_matches_original_pipeline_on_conftest_images(image_processor, clip_reference, images):
    expected = np.concatenate([reference_pad_pipeline(clip_reference, image) for image in images])
    actual = image_processor(images, return_tensors="np")["pixel_values"]
    assert max_abs_diff(actual, expected) <= 1e-6


def test_pad_mode_differs_from_plain_clip_for_non_square_images(image_processor, clip_reference):
    """Guards the parity test above: letterboxing must actually change a non-square image's pixels."""
    image = synthesize_image(480, 360)
    padded = image_processor(image, image_aspect_ratio="pad")["pixel_values"]
    assert max_abs_diff(padded, clip_pixels(clip_reference, image)) > 0.1


@pytest.mark.parametrize("size", [(480, 360), (300, 500), (336, 336), (1, 7), (7, 1), (333, 101), (1, 1)])
@pytest.mark.parametrize("mode", ["square", "anything-else"])
def test_non_pad_mode_equals_clip_processor_within_1e6(clip_reference, size, mode):
    image = synthesize_image(*size)
    processor = TokenPackerImageProcessor(image_aspect_ratio=mode)
    actual = processor(image)["pixel_values"]
    assert max_abs_diff(actual, clip_pixels(clip_reference, image)) <= 1e-6
    # The per-call override gives the same as the constructor setting.
    overridden = TokenPackerImageProcessor()(image, image_aspect_ratio=mode)["pixel_values"]
    assert max_abs_diff(overridden, actual) == 0.0


def test_background_colour_is_the_truncated_mean(image_processor):
    assert image_processor.background_color == tuple(int(mean * 255) for mean in CLIP_MEAN) == (122, 116, 104)


# ----------------------------------------------------------------------------------------------------------------
# PIL modes


def _image_in_mode(mode):
    rng = np.random.default_rng(1)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, size=(21, 34), dtype=np.uint16))
    if mode == "I":  # 32-bit integers holding 8-bit values (16-bit data comes as I;16)
        return Image.fromarray(rng.integers(0, 256, size=(21, 34)).astype(np.int32))
    if mode == "F":
        return Image.fromarray(rng.random((21, 34)).astype(np.float32))
    rgba = Image.fromarray(rng.integers(0, 256, size=(21, 34, 4), dtype=np.uint8), "RGBA")
    return rgba.convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "P", "CMYK", "1", "I;16", "I", "F"])
@pytest.mark.parametrize("aspect", ["pad", "square"])
def test_every_pil_mode_gives_finite_float32_pixels(mode, aspect):
    image = _image_in_mode(mode)
    assert image.mode == mode
    pixel_values = TokenPackerImageProcessor(image_aspect_ratio=aspect)(image, return_tensors="pt")["pixel_values"]
    assert isinstance(pixel_values, torch.Tensor)
    assert pixel_values.shape == (1, 3, SIDE, SIDE)
    assert pixel_values.dtype == torch.float32
    assert torch.isfinite(pixel_values).all()
    # Not degenerate: a random image keeps some variation through any mode conversion.
    assert pixel_values.std() > 0.05


def test_16_bit_white_equals_8_bit_white(image_processor):
    white_16 = Image.fromarray(np.full((13, 19), 65535, dtype=np.uint16))
    assert white_16.mode == "I;16"
    white_8 = Image.new("RGB", (19, 13), (255, 255, 255))
    expected = image_processor(white_8)["pixel_values"]
    assert max_abs_diff(image_processor(white_16)["pixel_values"], expected) == 0.0


def test_16_bit_mid_grey_is_scaled_not_clipped(image_processor):
    grey_16 = Image.fromarray(np.full((13, 19), 32896, dtype=np.uint16))  # 128 * 257
    grey_8 = Image.new("RGB", (19, 13), (128, 128, 128))
    white_8 = Image.new("RGB", (19, 13), (255, 255, 255))
    actual = image_processor(grey_16)["pixel_values"]
    assert max_abs_diff(actual, image_processor(grey_8)["pixel_values"]) <= 1e-6
    # PIL's own conversion would clip 32896 to 255 (white).
    assert max_abs_diff(actual, image_processor(white_8)["pixel_values"]) > 0.5


def test_32_bit_integer_image_above_8_bit_values_is_refused_pointing_to_16_bit_modes(image_processor):
    """One rule for every integer image: 16-bit data says so (uint16, I;16); mode I holds 8-bit values."""
    grey_i = Image.fromarray(np.full((13, 19), 32896, dtype=np.int32))
    assert grey_i.mode == "I"
    with pytest.raises(ValueError, match=r"Image 0: PIL image 19x13 mode I holds values in \[32896, 32896\].*\[0, 255\]"
                                         r".*uint16, or PIL mode I;16"):
        image_processor(grey_i)
    as_16_bit = Image.fromarray(np.full((13, 19), 32896, dtype=np.uint16))
    grey_8 = Image.new("RGB", (19, 13), (128, 128, 128))
    assert max_abs_diff(image_processor(as_16_bit)["pixel_values"], image_processor(grey_8)["pixel_values"]) <= 1e-6


def test_uint16_arrays_follow_the_16_bit_rule_of_i16_images(image_processor):
    data = np.random.default_rng(3).integers(0, 65536, size=(13, 19), dtype=np.uint16)
    np.testing.assert_array_equal(image_processor(data)["pixel_values"],
                                  image_processor(Image.fromarray(data))["pixel_values"])


def test_float_mode_image_outside_the_unit_range_is_refused(image_processor):
    with pytest.raises(ValueError, match=r"mode F holds values in \[64.0, 64.0\]; float images must hold values in \[0, 1\]"):
        image_processor(Image.fromarray(np.full((13, 19), 64.0, dtype=np.float32)))


@pytest.mark.parametrize("value, equivalent_8_bit", [(1.0, 255), (0.5, 128), (0.0, 0)])
def test_float_mode_image_in_unit_or_8_bit_range(image_processor, value, equivalent_8_bit):
    image = Image.fromarray(np.full((13, 19), value, dtype=np.float32))
    assert image.mode == "F"
    expected = image_processor(Image.new("L", (19, 13), equivalent_8_bit))["pixel_values"]
    assert max_abs_diff(image_processor(image)["pixel_values"], expected) <= 1e-6


def test_rgba_uses_the_colour_channels(image_processor):
    array = random_rgb_array()
    rgba = np.concatenate([array, np.full(array.shape[:2] + (1,), 7, np.uint8)], axis=-1)
    expected = image_processor(Image.fromarray(array))["pixel_values"]
    assert max_abs_diff(image_processor(Image.fromarray(rgba, "RGBA"))["pixel_values"], expected) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# numpy arrays and torch tensors


@pytest.mark.parametrize("aspect", ["pad", "square"])
@pytest.mark.parametrize(
    "convert",
    [
        pytest.param(lambda a: a, id="numpy-HWC-uint8"),
        pytest.param(lambda a: np.ascontiguousarray(a.transpose(2, 0, 1)), id="numpy-CHW-uint8"),
        pytest.param(lambda a: a.astype(np.float32) / 255, id="numpy-HWC-float32-unit"),
        pytest.param(lambda a: a.astype(np.float64).transpose(2, 0, 1) / 255, id="numpy-CHW-float64-unit"),
        pytest.param(lambda a: a.astype(np.int64), id="numpy-HWC-int64"),
        pytest.param(lambda a: torch.from_numpy(a.copy()), id="torch-HWC-uint8"),
        pytest.param(lambda a: torch.from_numpy(a.copy()).permute(2, 0, 1), id="torch-CHW-uint8"),
        pytest.param(lambda a: torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 255, id="torch-CHW-float-unit"),
    ],
)
def test_arrays_and_tensors_equal_the_equivalent_pil_image(convert, aspect):
    processor = TokenPackerImageProcessor(image_aspect_ratio=aspect)
    array = random_rgb_array()
    expected = processor(Image.fromarray(array))["pixel_values"]
    actual = processor(convert(array))["pixel_values"]
    assert max_abs_diff(actual, expected) <= 1e-6


@pytest.mark.parametrize(
    "convert",
    [
        pytest.param(lambda a: a, id="numpy-HW"),
        pytest.param(lambda a: a[None], id="numpy-1HW"),
        pytest.param(lambda a: a[..., None], id="numpy-HW1"),
        pytest.param(lambda a: torch.from_numpy(a.copy()), id="torch-HW"),
    ],
)
def test_grayscale_arrays_equal_the_equivalent_l_image(image_processor, convert):
    grey = random_rgb_array()[..., 0]
    expected = image_processor(Image.fromarray(grey, "L"))["pixel_values"]
    assert max_abs_diff(image_processor(convert(grey))["pixel_values"], expected) == 0.0


@pytest.mark.parametrize(
    "bad, expected_range, received",
    [
        pytest.param(np.full((5, 6, 3), 1.5, np.float32), "[0, 1]", "1.5", id="float-above-1"),
        pytest.param(np.full((5, 6, 3), -0.25, np.float64), "[0, 1]", "-0.25", id="float-below-0"),
        pytest.param(np.full((5, 6, 3), 300, np.int64), "[0, 255]", "300", id="int-above-255"),
        pytest.param(np.full((5, 6, 3), -3, np.int16), "[0, 255]", "-3", id="int-below-0"),
        pytest.param(torch.full((3, 5, 6), 2.0), "[0, 1]", "2.0", id="torch-float-above-1"),
        pytest.param(torch.full((3, 5, 6), 1000, dtype=torch.int32), "[0, 255]", "1000", id="torch-int-above-255"),
    ],
)
def test_out_of_range_arrays_raise_value_error_with_expected_and_received_range(image_processor, bad, expected_range,
                                                                               received):
    with pytest.raises(ValueError) as error:
        image_processor(bad)
    message = str(error.value)
    assert expected_range in message
    assert received in message


class NotAnImage:
    pass


@pytest.mark.parametrize("bad, type_name", [(NotAnImage(), "NotAnImage"), (3.0, "float")])
def test_non_image_object_raises_type_error_naming_the_type(image_processor, bad, type_name):
    with pytest.raises(TypeError, match=type_name):
        image_processor(bad)


def test_array_of_unsupported_shape_raises_value_error_with_the_shape(image_processor):
    with pytest.raises(ValueError, match=r"\(2, 5, 6, 7, 3\)"):
        image_processor(np.zeros((2, 5, 6, 7, 3), np.uint8))


def test_unexpected_preprocess_argument_raises(image_processor):
    with pytest.raises(TypeError, match="do_magic"):
        image_processor(synthesize_image(8, 8), do_magic=True)


# ----------------------------------------------------------------------------------------------------------------
# Modes, batches, return types


def test_slice_mode_with_an_unsupported_patch_num_raises_naming_the_supported_ones_at_construction():
    """'slice' (TokenPacker-HD) is supported (tests/test_hd.py); only patch_num 9, 16 and 25 have grid tables."""
    with pytest.raises(ValueError) as error:
        TokenPackerImageProcessor(image_aspect_ratio="slice", patch_num=10)
    message = str(error.value)
    assert "patch_num" in message and "(9, 16, 25)" in message and "10" in message


def test_slice_mode_with_an_unsupported_patch_num_raises_in_preprocess(image_processor):
    with pytest.raises(ValueError) as error:
        image_processor.preprocess(synthesize_image(8, 8), image_aspect_ratio="slice", patch_num=4)
    message = str(error.value)
    assert "patch_num" in message and "(9, 16, 25)" in message and "4" in message


def test_list_of_images_gives_one_row_per_image_in_order(image_processor, images):
    batch = image_processor(images)["pixel_values"]
    assert batch.shape == (len(images), 3, SIDE, SIDE)
    for row, image in zip(batch, images):
        assert max_abs_diff(row, image_processor(image)["pixel_values"][0]) == 0.0


def test_nested_lists_and_4d_arrays_are_flattened(image_processor, images):
    array = random_rgb_array(seed=3)
    nested = [[images[0]], [images[1], [images[2]]], np.stack([array, array])]
    batch = image_processor(nested)["pixel_values"]
    flat = image_processor([images[0], images[1], images[2], array, array])["pixel_values"]
    assert batch.shape == (5, 3, SIDE, SIDE)
    assert max_abs_diff(batch, flat) == 0.0


def test_return_tensors_pt_gives_torch_and_none_gives_numpy(image_processor, images):
    as_torch = image_processor(images[:2], return_tensors="pt")["pixel_values"]
    as_numpy = image_processor(images[:2], return_tensors=None)["pixel_values"]
    assert isinstance(as_torch, torch.Tensor) and as_torch.dtype == torch.float32
    assert isinstance(as_numpy, np.ndarray) and as_numpy.dtype == np.float32
    assert tuple(as_torch.shape) == as_numpy.shape == (2, 3, SIDE, SIDE)
    assert np.array_equal(as_torch.numpy(), as_numpy)


def test_empty_list_raises_value_error(image_processor):
    with pytest.raises(ValueError, match="No images"):
        image_processor([])


# ----------------------------------------------------------------------------------------------------------------
# Save / load


@pytest.mark.parametrize(
    "settings_",
    [
        pytest.param({}, id="defaults"),
        pytest.param(
            {
                "image_aspect_ratio": "square",
                "patch_num": 16,
                "size": {"shortest_edge": 224},
                "crop_size": {"height": 224, "width": 200},
                "image_mean": [0.5, 0.4, 0.3],
                "image_std": [0.2, 0.3, 0.25],
                "resample": Image.BILINEAR,
            },
            id="custom",
        ),
    ],
)
def test_save_load_round_trip_keeps_every_setting_and_output(tmp_path, images, settings_):
    original = TokenPackerImageProcessor(**settings_)
    original.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    loaded = TokenPackerImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is TokenPackerImageProcessor
    for name in ("size", "crop_size", "image_mean", "image_std", "image_aspect_ratio", "patch_num", "resample",
                 "rescale_factor"):
        assert getattr(loaded, name) == getattr(original, name), name
    for name, value in settings_.items():
        assert getattr(loaded, name) == value, name
    expected = original(images)["pixel_values"]
    assert max_abs_diff(loaded(images)["pixel_values"], expected) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# Property test over sizes


def _normalised(value_8_bit):
    """8-bit RGB -> `[3, 1]` CLIP-normalised values."""
    value = np.asarray(value_8_bit, np.float64)[:, None] / 255
    return (value - np.asarray(CLIP_MEAN)[:, None]) / np.asarray(CLIP_STD)[:, None]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    width=st.integers(1, 2000),
    height=st.integers(1, 2000),
    colour=st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255)),
    mode=st.sampled_from(["pad", "square"]),
)
def test_property_any_size_gives_336_square_finite_output_and_mean_coloured_letterbox(width, height, colour, mode):
    if mode == "square":
        # Plain CLIP resizing of extreme aspect ratios makes huge intermediate images (slow, as in the original).
        width = min(width, 30 * height)
        height = min(height, 30 * width)
    image = Image.new("RGB", (width, height), colour)
    pixel_values = TokenPackerImageProcessor(image_aspect_ratio=mode)(image)["pixel_values"]
    assert pixel_values.shape == (1, 3, SIDE, SIDE)
    assert pixel_values.dtype == np.float32
    assert np.isfinite(pixel_values).all()
    if mode != "pad":
        # A constant image stays constant through resize and crop.
        assert np.allclose(pixel_values[0], _normalised(colour)[:, :, None], atol=1e-5)
        return

    side, short = max(width, height), min(width, height)
    scale = side / SIDE  # source pixels per output pixel
    support = 2 * max(1.0, scale)  # bicubic filter radius in source pixels
    offset = (side - short) // 2
    image_pixels = pixel_values[0]
    if width < height:
        image_pixels = image_pixels.transpose(0, 2, 1)  # make the letterbox bands horizontal
    background = _normalised(tuple(int(mean * 255) for mean in CLIP_MEAN))
    if offset >= 0.5 * scale + support + 2:
        # First and last output rows lie entirely in the letterbox bands.
        assert np.allclose(image_pixels[:, 0, :], background, atol=1e-5)
        assert np.allclose(image_pixels[:, -1, :], background, atol=1e-5)
    if short >= 2 * support + 6:
        # The centre row lies inside the image.
        assert np.allclose(image_pixels[:, SIDE // 2, :], _normalised(colour), atol=1e-5)
    if width == height:
        assert np.allclose(image_pixels, _normalised(colour)[:, :, None], atol=1e-5)


def test_bfloat16_and_float16_tensors_are_accepted():
    processor = TokenPackerImageProcessor()
    image = torch.rand(3, 40, 30)
    reference = processor(image, return_tensors="np")["pixel_values"]
    for dtype in (torch.bfloat16, torch.float16):
        converted = image.to(dtype)
        expected = processor(converted.float(), return_tensors="np")["pixel_values"]
        np.testing.assert_array_equal(processor(converted, return_tensors="np")["pixel_values"], expected)
    assert reference.shape == (1, 3, 336, 336)


def test_mode_I_with_8bit_values_is_not_darkened():
    processor = TokenPackerImageProcessor(image_aspect_ratio="square")
    gray = Image.new("L", (8, 8), 200)
    np.testing.assert_array_equal(processor(gray.convert("I"))["pixel_values"], processor(gray)["pixel_values"])
