"""Images from anywhere transformers accepts them, by one documented set of rules (image_processing_common.py), and
bad ones refused with errors that name the item: sources, PIL modes, array layouts and dtypes, sizes, and the
memory-bounded letterbox of 'pad' mode."""

import base64
import http.server
import io
import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from modeling_tokenpacker import TokenPackerImageProcessor
from modeling_tokenpacker.image_processing_tokenpacker import letterbox_resize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pixels(processor, image, **kwargs):
    return processor(image, return_tensors="np", **kwargs)["pixel_values"]


@pytest.fixture(scope="module")
def processor():
    return TokenPackerImageProcessor()


@pytest.fixture(scope="module")
def picture():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def files(tmp_path_factory, picture):
    folder = tmp_path_factory.mktemp("image_files")
    paths = {"png": folder / "picture.png", "truncated": folder / "truncated.jpg", "text": folder / "notes.txt",
             "gif": folder / "animated.gif", "rotated": folder / "rotated.png", "upright": folder / "upright.png"}
    picture.save(paths["png"])
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG")
    paths["truncated"].write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    paths["text"].write_text("not an image")
    frames = [Image.new("RGB", (20, 20), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(paths["gif"], save_all=True, append_images=frames[1:])
    tall = Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(40, 20, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    tall.save(paths["rotated"], exif=exif)
    tall.transpose(Image.Transpose.ROTATE_270).save(paths["upright"])
    return paths


@pytest.fixture(scope="module")
def local_server(files):
    """An HTTP server on 127.0.0.1 serving the files folder (never the internet)."""
    folder = str(files["png"].parent)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=folder, **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


# ---------------------------------------------------------------------------------------------------------------
# sources


def test_paths_file_urls_http_urls_and_base64_give_the_pixels_of_the_pil_image(processor, picture, files,
                                                                               local_server):
    expected = pixels(processor, picture)
    encoded = base64.b64encode(files["png"].read_bytes()).decode()
    for source in (str(files["png"]), f"file://{files['png']}", f"{local_server}/picture.png",
                   f"data:image/png;base64,{encoded}", encoded):
        np.testing.assert_array_equal(pixels(processor, source), expected, err_msg=source[:40])


def test_nested_lists_mix_every_kind_of_source(processor, picture, files):
    batch = pixels(processor, [[str(files["png"])], [picture, np.asarray(picture)]])
    assert batch.shape[0] == 3
    np.testing.assert_array_equal(batch[0], batch[1])
    np.testing.assert_array_equal(batch[1], batch[2])


@pytest.mark.parametrize("case, message", [
    ("missing", r"Image 1: '.*missing\.png' is not an existing image file"),
    ("text", r"Image 1: '.*notes\.txt' could not be read as an image"),
    ("truncated", r"Image 1: .*truncated\.jpg.* (could not be read|cannot be read)"),
    ("not a source", r"Image 1: got dict; expected a PIL image, a numpy array, a torch tensor, a path"),
])
def test_a_bad_source_gets_an_error_naming_the_item(processor, picture, files, case, message):
    bad = {"missing": str(files["png"].parent / "missing.png"), "text": str(files["text"]),
           "truncated": str(files["truncated"]), "not a source": {"image": 1}}[case]
    with pytest.raises((ValueError, TypeError), match=message):
        processor([picture, bad])


def test_a_truncated_or_closed_pil_image_gets_a_clear_error(processor, files):
    truncated = Image.open(files["truncated"])
    with pytest.raises(ValueError, match=r"Image 0: PIL image 40x30 mode RGB cannot be read"):
        processor(truncated)
    closed = Image.open(files["png"])
    closed.load()
    closed.close()
    with pytest.raises(ValueError, match="Image 0: .* cannot be read"):
        processor(closed)


def test_an_animated_gif_gives_its_first_frame(processor, files):
    np.testing.assert_array_equal(pixels(processor, str(files["gif"])),
                                  pixels(processor, Image.new("RGB", (20, 20), (255, 0, 0))))


def test_exif_orientation_is_applied_to_files_and_pil_images(processor, files):
    expected = pixels(processor, str(files["upright"]))
    assert Image.open(files["rotated"]).size == (20, 40)  # stored tall, displayed wide
    np.testing.assert_array_equal(pixels(processor, str(files["rotated"])), expected)
    np.testing.assert_array_equal(pixels(processor, Image.open(files["rotated"])), expected)


def test_an_empty_batch_is_refused(processor):
    with pytest.raises(ValueError, match="No images were given"):
        processor([])


# ---------------------------------------------------------------------------------------------------------------
# PIL modes and the 16-bit rule


def test_la_mode_goes_through_la(processor):
    grey = Image.fromarray(np.random.default_rng(2).integers(0, 256, size=(9, 11), dtype=np.uint8))
    la = Image.merge("LA", (grey, Image.new("L", grey.size, 255)))
    np.testing.assert_array_equal(pixels(processor, la.convert("La")), pixels(processor, grey))


def test_sixteen_bit_data_is_scaled_the_same_way_whatever_it_arrives_as(processor):
    data = np.random.default_rng(3).integers(0, 65536, size=(9, 11), dtype=np.uint16)
    expected = pixels(processor, Image.fromarray(np.round(data / 257).astype(np.uint8)))
    for variant in (data, torch.from_numpy(data.astype(np.int32)).to(torch.uint16), Image.fromarray(data)):
        np.testing.assert_array_equal(pixels(processor, variant), expected)


# ---------------------------------------------------------------------------------------------------------------
# arrays: layouts, channels, dtypes, values


def test_torch_tensors_are_channels_first_and_numpy_arrays_channels_last_when_both_ends_could_be(processor):
    chw = torch.from_numpy(np.random.default_rng(4).integers(0, 256, size=(3, 4, 4), dtype=np.uint8))
    expected = pixels(processor, Image.fromarray(chw.permute(1, 2, 0).numpy()))
    np.testing.assert_array_equal(pixels(processor, chw), expected)  # a small CHW tensor is not read as HWC
    hwc = np.ascontiguousarray(np.random.default_rng(5).integers(0, 256, size=(3, 4, 3), dtype=np.uint8))
    np.testing.assert_array_equal(pixels(processor, hwc), pixels(processor, Image.fromarray(hwc)))
    np.testing.assert_array_equal(pixels(processor, np.moveaxis(hwc, -1, 0), input_data_format="channels_first"),
                                  pixels(processor, Image.fromarray(hwc)))


@pytest.mark.parametrize("shape", [(9, 11, 2), (9, 11, 5), (2, 9, 11), (5, 9, 11), (1, 2, 3, 4, 5)])
def test_arrays_without_1_3_or_4_channels_are_refused(processor, shape):
    with pytest.raises(ValueError, match=r"Image 0: numpy array of shape"):
        processor(np.zeros(shape, dtype=np.uint8))


@pytest.mark.parametrize("bad, message", [
    (np.full((5, 6, 3), np.nan, np.float32), "NaN or infinite"),
    (np.full((5, 6, 3), np.inf, np.float64), "NaN or infinite"),
    (torch.full((3, 5, 6), float("nan")), "NaN or infinite"),
    (np.zeros((5, 6, 3), np.complex64), "real-valued"),
    (np.zeros((5, 6, 3), object), "real-valued"),
    (np.zeros((0, 6, 3), np.uint8), "at least 1x1"),
])
def test_bad_values_dtypes_and_empty_arrays_are_refused(processor, bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        processor(bad)


def test_size_limits_refuse_oversized_images_with_the_limit_named():
    processor = TokenPackerImageProcessor(max_image_pixels=1000, max_image_side=100)
    with pytest.raises(ValueError, match=r"2000 pixels, more than max_image_pixels=1000"):
        processor(Image.new("RGB", (40, 50)))
    with pytest.raises(ValueError, match=r"150 pixels on its longer side, more than max_image_side=100"):
        processor(np.zeros((1, 150), np.uint8))
    square = TokenPackerImageProcessor(image_aspect_ratio="square")
    with pytest.raises(ValueError, match="use 'pad' or 'slice' mode for such aspect ratios"):
        square(Image.new("RGB", (1, 3000)))


# ---------------------------------------------------------------------------------------------------------------
# 'pad' without the whole canvas


def canvas_resize(image, background, size):
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), background)
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas.resize((size, size), resample=Image.BICUBIC)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(width=st.integers(1, 900), height=st.integers(1, 900), seed=st.integers(0, 2**16))
def test_letterbox_in_bands_gives_the_pixels_of_the_whole_canvas(width, height, seed):
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8))
    banded = letterbox_resize(image, (122, 116, 104), 336, Image.BICUBIC, canvas_bytes=4096)  # bands of a few rows
    np.testing.assert_array_equal(np.asarray(banded), np.asarray(canvas_resize(image, (122, 116, 104), 336)))


MEMORY_SCRIPT = textwrap.dedent("""
    import json
    import numpy as np
    from PIL import Image
    from modeling_tokenpacker import TokenPackerImageProcessor

    def status_mb(key):
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith(key + ":")) / 1024

    processor = TokenPackerImageProcessor(image_aspect_ratio="pad")
    processor(Image.new("RGB", (30, 700)))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(20000, 1, 3), dtype=np.uint8))
    before = status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    out = processor(image, return_tensors="np")["pixel_values"]
    print(json.dumps({"peak_mb": status_mb("VmHWM") - before, "shape": list(out.shape)}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak memory is read from Linux's /proc")
def test_a_1_by_20000_image_is_letterboxed_in_bounded_memory():
    """The whole canvas would be 20000 x 20000 x 3 bytes = 1.2 GB."""
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["shape"] == [1, 3, 336, 336]
    assert report["peak_mb"] < 120, report


PROPERTY_MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "LA", "PA", "RGBX", "RGBa", "La",
                  "I;16"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(width=st.one_of(st.integers(1, 40), st.integers(300, 1400), st.sampled_from([1, 5000])),
       height=st.one_of(st.integers(1, 40), st.integers(300, 1400), st.sampled_from([1, 5000])),
       mode=st.sampled_from(PROPERTY_MODES), aspect=st.sampled_from(["pad", "slice"]), seed=st.integers(0, 99))
def test_any_size_and_mode_gives_finite_pixels_and_as_many_image_tokens_as_features(tokenizer, width, height, mode,
                                                                                  aspect, seed):
    from modeling_tokenpacker import TokenPackerProcessor

    rgb = Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8))
    image = rgb.convert("LA").convert("La") if mode == "La" else rgb.convert(mode) if mode != "I;16" else \
        Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
    processor = TokenPackerProcessor(TokenPackerImageProcessor(image_aspect_ratio=aspect), tokenizer,
                                     image_seq_length=144)
    out = processor(images=image, text="USER: <image>\nWhat? ASSISTANT:", return_tensors="pt")
    assert torch.isfinite(out["pixel_values"]).all()
    features = out["pixel_values"].shape[0] * processor.image_seq_length  # what the model scatters
    assert int((out["input_ids"] == processor.image_token_id).sum()) == features
