"""Numerical parity with the original TokenPacker code, through the converter.

The original-format checkpoints are rebuilt with `tests/original_format.py` (bit-identical to the ones
`tests/fixtures/make_fixtures.py` ran the original code on), converted in float32 with
`conversion/convert_tokenpacker_to_hf.py`, loaded through the Auto classes with `trust_remote_code=True` and
compared with the original's outputs in `tests/fixtures/parity_*` (see tests/fixtures/README.md):
input ids, pixel values, projector output, logits and 8 greedy tokens. Measured differences are printed
(run with `-s`) and summarised at the end of the module.
"""

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository root, for `conversion`

import original_format as of  # noqa: E402
from conversion.tokenpacker_converter import convert  # noqa: E402
from conftest import dtype_kwargs  # noqa: E402

FIXTURES = os.path.join(HERE, "fixtures")
PAD_VARIANTS = ("s2", "s3", "s4", "projector_only")
IMAGE_PLACEHOLDER_ID = -200  # the original's IMAGE_TOKEN_INDEX
TOLERANCE = {"pixel_values": 1e-6, "projector_output": 1e-5, "logits": 1e-4}
MEASURED = {}  # (variant, image, quantity) -> max abs diff, printed at the end of the module


def _load_json(name):
    with open(os.path.join(FIXTURES, name), encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def pad_reference():
    return {
        "json": _load_json("parity_pad.json"),
        "tensors": load_file(os.path.join(FIXTURES, "parity_pad.safetensors")),
        "pixel_values": load_file(os.path.join(FIXTURES, "parity_pixel_values.safetensors")),
        "features": load_file(os.path.join(FIXTURES, "parity_vision_features.safetensors")),
    }


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    root = tmp_path_factory.mktemp("original_checkpoints")
    return of.build_all(str(root), variants=list(PAD_VARIANTS) + ["hd9"])


@pytest.fixture(scope="module", autouse=True)
def _print_measurements():
    yield
    if MEASURED:
        lines = ["", "parity max |ours - original| (float32):"]
        for (variant, image, quantity), value in sorted(MEASURED.items()):
            lines.append(f"  {variant:15s} {image:7s} {quantity:34s} {value:.3e}")
        print("\n".join(lines))


def _record(variant, image, quantity, value):
    MEASURED[(variant, image, quantity)] = value
    print(f"[parity] {variant} {image} {quantity}: max abs diff {value:.3e}")
    return value


def _convert(originals, tmp_path_factory, variant, **kwargs):
    ckpt = originals[variant]
    output = tmp_path_factory.mktemp(f"converted_{variant}") / "ckpt"
    if variant == "projector_only":
        source = {"projector_only": os.path.join(ckpt.path, "mm_projector.bin"), "base_llm": ckpt.base_llm_path}
    else:
        source = {"input": ckpt.path}
    options = {"vision_tower": ckpt.clip_path, "dtype": "float32", "verify": False, "progress": False, **kwargs}
    result = convert(str(output), **source, **options)
    return output, result


@pytest.fixture(scope="module", params=PAD_VARIANTS)
def converted(request, originals, tmp_path_factory, pad_reference):
    """One converted variant with our outputs on the fixture images (model loaded once per variant)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    variant = request.param
    output, result = _convert(originals, tmp_path_factory, variant)
    model = AutoModelForImageTextToText.from_pretrained(output, trust_remote_code=True, **dtype_kwargs(torch.float32)).eval()
    processor = AutoProcessor.from_pretrained(output, trust_remote_code=True)
    prompt = pad_reference["json"]["provenance"]["prompt"]
    images = of.make_images()
    runs = {}
    for name in pad_reference["json"]["variants"][variant]["images"]:
        inputs = processor(images=[images[name]], text=[prompt], return_tensors="pt")
        with torch.inference_mode():
            out = model(**inputs)
            generated = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        runs[name] = {
            "inputs": inputs,
            "logits": out.logits[0].float(),
            "projector_output": out.image_hidden_states.float(),
            "greedy_tokens": generated[0, inputs["input_ids"].shape[1]:].tolist(),
        }
    yield {"variant": variant, "output": output, "result": result, "model": model, "processor": processor,
           "runs": runs, "prompt": prompt}
    del model


def test_chat_template_renders_the_original_prompt_after_the_bos_text(converted):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image briefly."}]}]
    processor = converted["processor"]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == processor.tokenizer.bos_token + " " + converted["prompt"]
    assert processor.tokenize_with_images(rendered) == processor.tokenize_with_images(converted["prompt"])


def test_input_ids_equal_the_original_with_the_placeholder_expanded(converted, pad_reference):
    model = converted["model"]
    image_run = [model.config.image_token_id] * model.config.image_seq_length
    for name, run in converted["runs"].items():
        original = pad_reference["json"]["input_ids"][name]
        expected = []
        for token in original:
            expected.extend(image_run if token == IMAGE_PLACEHOLDER_ID else [token])
        assert run["inputs"]["input_ids"][0].tolist() == expected, name


def test_pixel_values_match(converted, pad_reference):
    variant = converted["variant"]
    for name, run in converted["runs"].items():
        ours = run["inputs"]["pixel_values"].float()
        if variant == "projector_only":  # 'square' mode: the fixture keeps a sample and the sums
            tensors, info = pad_reference["tensors"], pad_reference["json"]["variants"][variant]["images"][name]
            index = tensors[f"{variant}.{name}.pixel_sample_index"]
            diff = float((ours.reshape(-1)[index] - tensors[f"{variant}.{name}.pixel_sample_values"]).abs().max())
            assert list(ours.shape) == info["pixel_values_shape"]
            assert abs(float(ours.double().sum()) - info["pixel_values_sum"]) <= 1e-6 * ours.numel()
            assert abs(float(ours.double().abs().sum()) - info["pixel_values_abs_sum"]) <= 1e-6 * ours.numel()
        else:
            reference = pad_reference["pixel_values"][f"pixel_values.{name}"]
            assert ours.shape == reference.shape
            diff = float((ours - reference).abs().max())
        assert _record(variant, name, "pixel_values", diff) <= TOLERANCE["pixel_values"]


def test_projector_output_matches(converted, pad_reference):
    variant = converted["variant"]
    for name, run in converted["runs"].items():
        reference = pad_reference["tensors"][f"{variant}.{name}.projector_output"]
        assert run["projector_output"].shape == reference.shape
        diff = float((run["projector_output"] - reference).abs().max())
        assert _record(variant, name, "projector_output", diff) <= TOLERANCE["projector_output"]


def test_projector_from_stored_features_matches(converted, pad_reference):
    """The projector alone on the original's stored vision features (no CLIP in the loop)."""
    variant = converted["variant"]
    multi = pad_reference["features"]["vision_features_multi"].float()
    projector = converted["model"].model.multi_modal_projector
    with torch.inference_mode():
        ours = projector(multi[..., -1024:].contiguous(), multi)
    reference = pad_reference["features"][f"{variant}.projector_output_from_stored_features"]
    diff = float((ours - reference).abs().max())
    assert _record(variant, "stored", "projector_output_from_features", diff) <= TOLERANCE["projector_output"]


def test_logits_match(converted, pad_reference):
    variant = converted["variant"]
    for name, run in converted["runs"].items():
        reference = pad_reference["tensors"][f"{variant}.{name}.logits_last8"]
        info = pad_reference["json"]["variants"][variant]["images"][name]
        assert run["logits"].shape[0] == info["sequence_length"]
        ours = run["logits"][-reference.shape[0]:, : reference.shape[1]]
        diff = float((ours - reference).abs().max())
        assert _record(variant, name, "logits_last8", diff) <= TOLERANCE["logits"]


def test_greedy_tokens_match(converted, pad_reference):
    """8 greedy tokens with our KV-cached generate equal the original's uncached greedy decoding."""
    variant = converted["variant"]
    for name, run in converted["runs"].items():
        expected = pad_reference["json"]["variants"][variant]["images"][name]["greedy_tokens"]
        print(f"[parity] {variant} {name} greedy tokens: ours {run['greedy_tokens']} original {expected}")
        assert run["greedy_tokens"] == expected, name


def test_converted_weights_equal_the_builder_values(converted, originals):
    """The mapping written out by hand here (not the converter's table) holds for every tensor of the output."""
    variant = converted["variant"]
    state = converted["model"].state_dict()
    llm = of.llm_state_dict("base" if variant == "projector_only" else variant)
    projector = {k[len("model.mm_projector."):]: v for k, v in of.projector_state_dict(variant).items()}
    expected = {}
    for name, value in llm.items():
        ours = "lm_head.weight" if name == "lm_head.weight" else "model.language_model." + name[len("model."):]
        expected[ours] = value
    attn = "model.multi_modal_projector.attention."
    e = projector["clip_attn.in_proj_weight"].shape[1]
    for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
        expected[attn + part + ".weight"] = projector["clip_attn.in_proj_weight"][i * e:(i + 1) * e]
        expected[attn + part + ".bias"] = projector["clip_attn.in_proj_bias"][i * e:(i + 1) * e]
    names = {"q_proj_1": "query_proj", "ln_q_1": "query_norm", "ln_k_1": "key_norm", "ln_v_1": "value_norm",
             "k_proj_1.0": "key_mlp.linear_1", "k_proj_1.2": "key_mlp.linear_2", "v_proj_1.0": "value_mlp.linear_1",
             "v_proj_1.2": "value_mlp.linear_2", "clip_attn.out_proj": "attention.out_proj",
             "mlp.0": "output_mlp.linear_1", "mlp.2": "output_mlp.linear_2"}
    for name, value in projector.items():
        module, _, param = name.rpartition(".")
        if module in names:
            expected[f"model.multi_modal_projector.{names[module]}.{param}"] = value
    for name, value in of.clip_state_dict().items():
        expected["model.vision_tower." + name[len("vision_model."):]] = value
    assert set(expected) == set(state)
    for name, value in expected.items():
        if name in ("lm_head.weight", "model.language_model.embed_tokens.weight"):
            rows = value.shape[0]
            assert torch.equal(state[name][:rows], value), name
            mean = value.double().mean(0).float()
            assert torch.allclose(state[name][rows:], mean.expand_as(state[name][rows:]), atol=1e-6, rtol=0), name
            assert state[name].shape[0] % 64 == 0
        else:
            assert torch.equal(state[name], value), name


def test_hd_checkpoint_converts_faithfully(originals, tmp_path_factory):
    """hd9 ('slice', patch_num 9): config and processor files carry the HD settings; weights bit-exact in a fresh
    process (numerical parity with the original: tests/test_hd_parity.py)."""
    output, result = _convert(originals, tmp_path_factory, "hd9", verify=True)
    assert result.verified_tensors == 439
    config = json.loads((output / "config.json").read_text())
    assert (config["image_aspect_ratio"], config["patch_num"], config["scale_factor"]) == ("slice", 9, 2)
    preprocessor = json.loads((output / "preprocessor_config.json").read_text())
    assert (preprocessor["image_aspect_ratio"], preprocessor["patch_num"]) == ("slice", 9)
    hd = _load_json("parity_hd.json")
    assert hd["patch_num"] == config["patch_num"]


def test_embedded_bf16_tower_moves_logits_so_the_clip_folder_is_preferred(originals, tmp_path_factory, pad_reference):
    """Converting s2 from its embedded bf16 tower (no --vision-tower) is allowed with a warning, and measurably
    differs from the original, which reads the fp32 CLIP folder."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    ckpt = originals["s2"]
    output = tmp_path_factory.mktemp("converted_s2_embedded") / "ckpt"
    result = convert(str(output), input=ckpt.path, dtype="float32", verify=False, progress=False)
    assert any("embedded" in warning for warning in result.warnings)
    model = AutoModelForImageTextToText.from_pretrained(output, trust_remote_code=True, **dtype_kwargs(torch.float32)).eval()
    processor = AutoProcessor.from_pretrained(output, trust_remote_code=True)
    inputs = processor(images=[of.make_images()["wide"]], text=[pad_reference["json"]["provenance"]["prompt"]],
                       return_tensors="pt")
    with torch.inference_mode():
        logits = model(**inputs).logits[0, -8:, :1000]
    diff = float((logits - pad_reference["tensors"]["s2.wide.logits_last8"]).abs().max())
    _record("s2-embedded", "wide", "logits_last8 (bf16 tower)", diff)
    original_report = _load_json("parity_report.json")["embedded_bf16_tower"]["logits_last8_max_abs_diff"]
    assert diff > TOLERANCE["logits"]
    assert diff == pytest.approx(original_report, rel=0.05, abs=1e-3)
