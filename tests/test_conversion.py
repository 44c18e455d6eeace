"""The converter (conversion/convert_tokenpacker_to_hf.py) on tiny original-format checkpoints built here.

The checkpoints are small (CLIP of width 64 with the real 24 layers and 24 x 24 grid, projector of width 128, a
2-layer LLaMA with the 1000-piece test tokenizer) and cover the layouts users have: sharded .bin + index with the
vision tower embedded (bf16), a single safetensors without it (+ a full CLIPModel folder), fp16 .bin, a stage-1
mm_projector.bin with a base LLM, and a plain LLaVA-1.5 (mlp2x_gelu) checkpoint. Numerical parity with the
original code is in test_parity.py.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
sys.path.insert(0, REPO_ROOT)

from conversion import CONVERTER_VERSION, tokenpacker, writing  # noqa: E402
from conversion import llava as llava_layout  # noqa: E402
from conversion.common import ConversionError, parse_size  # noqa: E402
from conversion.tokenpacker_converter import convert  # noqa: E402
from modeling_tokenpacker.demo import synthesize_image  # noqa: E402
from conversion_inputs import (  # noqa: E402
    EMBED,
    HIDDEN,
    VOCAB,
    Sentinel,
    _copy_tokenizer,
    _write_json,
    clip_state_dict,
    llm_state_dict,
    make_base_llm,
    make_clip_folder,
    make_original,
    original_config,
    projector_state_dict,
)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("conversion")
    return {
        "root": root,
        "clip": make_clip_folder(str(root / "clip_vision")),
        "clip_full": make_clip_folder(str(root / "clip_full"), full_clip_model=True),
        "sharded": make_original(str(root / "orig_sharded" / "ckpt"), "sharded_bin_tower"),
        "safetensors": make_original(str(root / "orig_safetensors"), "safetensors"),
        "fp16": make_original(str(root / "orig_fp16"), "bin_fp16"),
        "stage1": make_original(str(root / "orig_stage1"), "projector_only"),
        "base_llm": make_base_llm(str(root / "tiny_vicuna")),
        "llava15": make_original(str(root / "orig_llava15"), "safetensors", projector="mlp2x_gelu"),
    }


def quiet_convert(output, **kwargs):
    kwargs.setdefault("verify", False)
    kwargs.setdefault("progress", False)
    return convert(str(output), **kwargs)


# ------------------------------------------------------------------------------------------------------------------
# every layout: convert + verify (fresh process), then load through the Auto classes and generate
# ------------------------------------------------------------------------------------------------------------------

LAYOUTS = {
    "sharded_bin_embedded_tower": lambda w: {"input": w["sharded"]},
    "safetensors_with_clip_model_folder": lambda w: {"input": w["safetensors"], "vision_tower": w["clip_full"]},
    "fp16_bin": lambda w: {"input": w["fp16"], "vision_tower": w["clip"], "max_shard_size": "200KB"},
    "projector_only": lambda w: {"projector_only": os.path.join(w["stage1"], "mm_projector.bin"),
                                 "base_llm": w["base_llm"], "vision_tower": w["clip"]},
    "llava15_mlp2x_gelu": lambda w: {"input": w["llava15"], "vision_tower": w["clip"], "dtype": "bfloat16"},
}


VERIFIED_LAYOUTS = ("sharded_bin_embedded_tower", "projector_only")  # a verification child costs seconds


@pytest.fixture(scope="module")
def converted(work):
    """Each layout converted once; two of them verified in a fresh process by the converter itself."""
    results = {}
    for name, arguments in LAYOUTS.items():
        output = work["root"] / "out" / name
        results[name] = (output, quiet_convert(output, verify=name in VERIFIED_LAYOUTS, **arguments(work)))
    return results


GENERATE_CHILD = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class BlockPackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("modeling_tokenpacker", "conversion"):
                raise ImportError(name + " must not be importable here")
            return None

    sys.meta_path.insert(0, BlockPackage())
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    image = Image.open(sys.argv[1])
    report = {}
    for path in sys.argv[2:]:
        model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=[image], text=[prompt], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        report[path] = {
            "module": type(model).__module__,
            "dtype": str(next(model.parameters()).dtype),
            "image_tokens": int((inputs["input_ids"] == model.config.image_token_id).sum()),
            "image_seq_length": model.config.image_seq_length,
            "new_tokens": out[0, inputs["input_ids"].shape[1]:].tolist(),
        }
    report["imported"] = sorted({n.split(".")[0] for n in sys.modules} & {"modeling_tokenpacker", "conversion"})
    print(json.dumps(report))
    """
)


def test_every_layout_converts_verifies_and_generates_in_a_fresh_process(converted, work, tmp_path):
    for name, (output, result) in converted.items():
        if name in VERIFIED_LAYOUTS:
            assert result.verified_tensors == result.written_tensors == 439, name
        assert os.path.isfile(output / "config.json") and os.path.isfile(output / "README.md"), name
    image = tmp_path / "image.png"
    synthesize_image(400, 300).save(image)
    paths = [str(output) for output, _ in converted.values()]
    completed = subprocess.run([sys.executable, "-I", "-c", GENERATE_CHILD, str(image), *paths], capture_output=True,
                               text=True, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report.pop("imported") == []
    for name, (output, result) in converted.items():
        child = report[str(output)]
        assert child["module"].startswith("transformers_modules"), name
        assert len(child["new_tokens"]) == 4, name
        assert child["image_tokens"] == child["image_seq_length"], name
        assert child["image_seq_length"] == (576 if name == "llava15_mlp2x_gelu" else 144), name
    assert report[str(converted["llava15_mlp2x_gelu"][0])]["dtype"] == "torch.bfloat16"
    assert report[str(converted["fp16_bin"][0])]["dtype"] == "torch.float16"
    assert report[str(converted["sharded_bin_embedded_tower"][0])]["dtype"] == "torch.bfloat16"


def test_layout_specifics(converted, work):
    _, sharded = converted["sharded_bin_embedded_tower"]
    # no --vision-tower: the embedded bf16 tower is used, with a warning
    assert any("embedded" in warning and "--vision-tower" in warning for warning in sharded.warnings)
    assert sharded.ignored == {llava_layout.REASON_ROTARY: 2}
    assert not os.path.exists(os.path.join(os.path.dirname(os.path.dirname(work["sharded"])), "TRAINING_ARGS_WAS_UNPICKLED"))

    _, full_clip = converted["safetensors_with_clip_model_folder"]
    assert full_clip.ignored == {llava_layout.REASON_CLIP_TEXT: 5, llava_layout.REASON_POSITION_IDS: 1}
    assert full_clip.dtype == "float32"  # from the config's torch_dtype

    fp16_out, fp16 = converted["fp16_bin"]
    assert fp16.shards > 1
    index = json.loads((fp16_out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f"model-{i:05d}-of-{fp16.shards:05d}.safetensors" for i in range(1, fp16.shards + 1)}
    for shard in set(index["weight_map"].values()):
        tensors = load_file(fp16_out / shard)
        assert sum(t.numel() * t.element_size() for t in tensors.values()) <= 200_000 or len(tensors) == 1

    _, llava = converted["llava15_mlp2x_gelu"]
    assert llava.projector_type == "mlp2x_gelu"
    _, stage1 = converted["projector_only"]
    assert stage1.ignored == {} and stage1.mapped_tensors == 23 + len(llm_state_dict()) + len(clip_state_dict())


def test_output_folder_contents_config_and_model_card(converted):
    from modeling_tokenpacker.remote_code import shipped_files

    output, result = converted["sharded_bin_embedded_tower"]
    files = set(os.listdir(output))
    assert {"config.json", "generation_config.json", "model.safetensors", "README.md", "preprocessor_config.json",
            "processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.json",
            *shipped_files()} <= files
    assert not [name for name in files if name.endswith(".tmp") or name.startswith("_tmp")]
    assert not _leftovers(output.parent)
    config = json.loads((output / "config.json").read_text())
    from modeling_tokenpacker.configuration_tokenpacker import AUTO_MAP

    assert config["auto_map"] == AUTO_MAP and config["architectures"] == ["TokenPackerForConditionalGeneration"]
    assert config["model_type"] == "tokenpacker" and config["projector_type"] == "tokenpacker"
    assert config["image_token_id"] == 1000 and config["text_config"]["vocab_size"] == 1024
    assert config["projector_num_heads"] == 1 and config["projector_hidden_size"] == EMBED
    assert config["dtype"] == "bfloat16" and config["image_aspect_ratio"] == "pad"
    generation = json.loads((output / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 1001)
    tokenizer_config = json.loads((output / "tokenizer_config.json").read_text())
    assert tokenizer_config["padding_side"] == "left" and tokenizer_config["pad_token"] == "<pad>"
    from modeling_tokenpacker import load_chat_template

    assert json.loads((output / "chat_template.json").read_text())["chat_template"] == load_chat_template("vicuna_v1")
    assert {"modeling_common.py", "modeling_tokenpacker_projector.py"} <= set(shipped_files())
    for name, path in shipped_files().items():
        assert (output / name).read_text() == path.read_text()
    card = (output / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    from huggingface_hub import ModelCard

    data = ModelCard.load(output / "README.md").data
    assert data.license == "other" and data.library_name == "transformers"
    assert data.pipeline_tag == "image-text-to-text"
    assert {"tokenpacker", "llava", "multimodal", "image-text-to-text", "custom_code"} <= set(data.tags)
    assert "license:" in front
    assert "AutoModelForImageTextToText" in body and "source config.json sha256" in body and "bfloat16" in body
    assert "apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True" in body
    assert "arxiv.org/abs/2407.02392" in body and "github.com/CircleRadon/TokenPacker" in body
    for folder_name in ("orig_sharded", "ckpt", "clip_vision", "conversion0"):  # no local folder names
        assert folder_name not in card, folder_name
    assert f"{result.verified_tensors} tensors equal bit for bit" in body
    assert "convert_tokenpacker_to_hf.py` " + CONVERTER_VERSION in body


def test_vocabulary_resize_rows_are_the_mean_and_a_multiple_of_64(converted):
    output, result = converted["fp16_bin"]
    assert result.vocab_size == 1024 and result.image_token_id == 1000 and result.pad_token_id == 1001
    index = json.loads((output / "model.safetensors.index.json").read_text())
    source = llm_state_dict()
    for ours, theirs in (("model.language_model.embed_tokens.weight", "model.embed_tokens.weight"),
                         ("lm_head.weight", "lm_head.weight")):
        with safe_open(output / index["weight_map"][ours], "pt") as handle:
            tensor = handle.get_tensor(ours)
        original = source[theirs].to(torch.float16)
        assert tensor.shape == (1024, HIDDEN) and tensor.dtype == torch.float16
        assert torch.equal(tensor[:VOCAB], original)
        mean = original.double().mean(0).to(torch.float16)
        assert torch.equal(tensor[VOCAB:], mean.expand(1024 - VOCAB, HIDDEN))


def test_packed_attention_projection_is_split_q_k_v(converted):
    output, _ = converted["safetensors_with_clip_model_folder"]
    state = load_file(output / "model.safetensors")
    source = projector_state_dict()
    packed_w, packed_b = source["model.mm_projector.clip_attn.in_proj_weight"], source["model.mm_projector.clip_attn.in_proj_bias"]
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        assert torch.equal(state[f"model.multi_modal_projector.attention.{name}.weight"], packed_w[i * EMBED:(i + 1) * EMBED])
        assert torch.equal(state[f"model.multi_modal_projector.attention.{name}.bias"], packed_b[i * EMBED:(i + 1) * EMBED])
    assert torch.equal(state["model.multi_modal_projector.key_mlp.linear_2.bias"], source["model.mm_projector.k_proj_1.2.bias"])
    assert torch.equal(state["model.multi_modal_projector.output_mlp.linear_1.weight"], source["model.mm_projector.mlp.0.weight"])
    assert torch.equal(state["model.vision_tower.post_layernorm.bias"], clip_state_dict()["vision_model.post_layernorm.bias"])


# ------------------------------------------------------------------------------------------------------------------
# nothing silently lost, safe loading, atomic output
# ------------------------------------------------------------------------------------------------------------------

def _leftovers(folder):
    from modeling_tokenpacker.staging import STAGING_PREFIX

    return [name for name in os.listdir(folder) if name.startswith(("_tmp", STAGING_PREFIX))]


def test_unknown_key_is_an_error_naming_it_and_leaves_no_output(work, tmp_path):
    extra = {"model.mm_projector.resampler.query": torch.zeros(4)}
    source = make_original(str(tmp_path / "orig"), "safetensors", extra_tensors=extra)
    with pytest.raises(ConversionError, match=r"model\.mm_projector\.resampler\.query"):
        quiet_convert(tmp_path / "out", input=source, vision_tower=work["clip"])
    assert not os.path.exists(tmp_path / "out") and not _leftovers(tmp_path)


def test_unknown_key_in_the_last_shard_fails_before_writing(work, tmp_path):
    source = str(tmp_path / "orig")
    shutil.copytree(work["sharded"], source)
    last = os.path.join(source, "pytorch_model-00002-of-00002.bin")
    state = torch.load(last, weights_only=True)
    state["model.some_adapter.weight"] = torch.zeros(2, 2)
    torch.save(state, last)
    index_path = os.path.join(source, "pytorch_model.bin.index.json")
    index = json.loads(open(index_path).read())
    index["weight_map"]["model.some_adapter.weight"] = "pytorch_model-00002-of-00002.bin"
    _write_json(index_path, index)
    with pytest.raises(ConversionError, match=r"Unknown tensor 'model\.some_adapter\.weight'"):
        quiet_convert(tmp_path / "out", input=source)
    assert not os.path.exists(tmp_path / "out") and not _leftovers(tmp_path)


def test_failure_midway_leaves_no_partial_output(work, tmp_path, monkeypatch):
    calls = []
    original_write = writing.write_tensor

    def failing_write_tensor(handle, name, tensor):
        calls.append(name)
        if len(calls) == 30:
            raise OSError("disk full (simulated)")
        original_write(handle, name, tensor)

    monkeypatch.setattr(writing, "write_tensor", failing_write_tensor)
    with pytest.raises(ConversionError, match="simulated"):
        quiet_convert(tmp_path / "out", input=work["fp16"], vision_tower=work["clip"], max_shard_size="100KB")
    assert len(calls) == 30
    assert not os.path.exists(tmp_path / "out") and not _leftovers(tmp_path)


def test_shards_are_streamed_tensor_by_tensor_with_valid_safetensors_headers(work, tmp_path):
    result = quiet_convert(tmp_path / "out", input=work["fp16"], vision_tower=work["clip"], max_shard_size="200KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == result.shards > 1
    total = 0
    for shard in shards:
        with safe_open(str(tmp_path / "out" / shard), framework="pt") as handle:
            for name in handle.keys():
                assert index["weight_map"][name] == shard
                tensor = handle.get_tensor(name)
                total += tensor.numel() * tensor.element_size()
    assert total == index["metadata"]["total_size"] == result.bytes_written


def test_existing_output_needs_overwrite(work, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "old_file.txt").write_text("old")
    with pytest.raises(ConversionError, match="--overwrite"):
        quiet_convert(output, input=work["fp16"], vision_tower=work["clip"])
    assert (output / "old_file.txt").exists()
    result = quiet_convert(output, input=work["fp16"], vision_tower=work["clip"], overwrite=True)
    assert not (output / "old_file.txt").exists() and (output / "model.safetensors").exists()
    assert result.output == str(output) and not _leftovers(tmp_path)


def test_pickle_that_needs_code_is_refused_without_running_it(work, tmp_path):
    source = str(tmp_path / "orig")
    os.makedirs(source)
    _copy_tokenizer(source)
    _write_json(os.path.join(source, "config.json"), original_config(mm_projector_type="tokenpacker"))
    sentinel = tmp_path / "PICKLE_WAS_EXECUTED"
    state = {**llm_state_dict(), **projector_state_dict(), "model.evil": Sentinel(str(sentinel))}
    torch.save(state, os.path.join(source, "pytorch_model.bin"))
    with pytest.raises(ConversionError, match="arbitrary code"):
        quiet_convert(tmp_path / "out", input=source, vision_tower=work["clip"])
    assert not sentinel.exists() and not os.path.exists(tmp_path / "out")


def test_verification_catches_a_corrupted_tensor(work, tmp_path, monkeypatch):
    target = "model.multi_modal_projector.query_norm.bias"
    original_write = writing.write_tensor

    def corrupting_write_tensor(handle, name, tensor):
        if name == target:
            tensor = tensor.clone()
            tensor[0] += 1
        original_write(handle, name, tensor)

    monkeypatch.setattr(writing, "write_tensor", corrupting_write_tensor)
    with pytest.raises(ConversionError, match=r"Verification failed: 1 tensors differ.*" + target.replace(".", r"\.")):
        quiet_convert(tmp_path / "out", input=work["safetensors"], vision_tower=work["clip"], verify=True)
    assert not os.path.exists(tmp_path / "out") and not _leftovers(tmp_path)


# ------------------------------------------------------------------------------------------------------------------
# settings, presets, errors
# ------------------------------------------------------------------------------------------------------------------

def test_hd_slice_checkpoint_without_patch_num_gets_9(work, tmp_path):
    source = make_original(str(tmp_path / "orig"), "safetensors", config_overrides={"image_aspect_ratio": "slice"})
    result = quiet_convert(tmp_path / "out", input=source, vision_tower=work["clip"])
    assert any("patch_num" in warning and "9" in warning for warning in result.warnings)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    preprocessor = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert (config["image_aspect_ratio"], config["patch_num"]) == ("slice", 9)
    assert (preprocessor["image_aspect_ratio"], preprocessor["patch_num"]) == ("slice", 9)
    assert "slice" in (tmp_path / "out" / "README.md").read_text()


def test_scale_factor_and_select_layer_come_from_the_config(work, tmp_path):
    source = make_original(str(tmp_path / "orig"), "safetensors",
                           config_overrides={"scale_factor": 3, "mm_vision_select_layer": -3})
    quiet_convert(tmp_path / "out", input=source, vision_tower=work["clip"])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    processor_config = json.loads((tmp_path / "out" / "processor_config.json").read_text())
    assert (config["scale_factor"], config["vision_feature_layer"], processor_config["image_seq_length"]) == (3, -3, 64)


@pytest.mark.parametrize("overrides, message", [
    ({"scale_factor": 5}, r"scale_factor must divide the 24x24 patch grid: expected one of \[1, 2, 3, 4, 6, 8, 12, 24\]; got 5"),
    ({"mm_vision_select_feature": "cls_patch"}, r"mm_vision_select_feature must be 'patch' .*got 'cls_patch'"),
    ({"model_type": "llama"}, r"not an original TokenPacker/LLaVA-1.5 config: expected model_type in"),
    ({"mm_use_im_start_end": True}, r"mm_use_im_start_end=true is not supported"),
])
def test_bad_configs_are_refused_with_expected_and_received(work, tmp_path, overrides, message):
    source = make_original(str(tmp_path / "orig"), "safetensors", config_overrides=overrides)
    with pytest.raises(ConversionError, match=message):
        quiet_convert(tmp_path / "out", input=source, vision_tower=work["clip"])


def test_converted_config_is_refused(converted, tmp_path):
    output, _ = converted["fp16_bin"]
    with pytest.raises(ConversionError, match="already a transformers-format config"):
        quiet_convert(tmp_path / "out", input=str(output))


def test_missing_vision_tower_names_both_options_and_mm_vision_tower(work, tmp_path):
    with pytest.raises(ConversionError) as error:
        quiet_convert(tmp_path / "out", input=work["safetensors"])
    message = str(error.value)
    assert "--vision-tower" in message and "embeds" in message and "openai/clip-vit-large-patch14-336" in message


def test_bad_arguments(work, tmp_path):
    with pytest.raises(ValueError, match=r"dtype must be one of \['bfloat16', 'float16', 'float32'\]; got 'float8'"):
        quiet_convert(tmp_path / "out", input=work["fp16"], vision_tower=work["clip"], dtype="float8")
    with pytest.raises(ValueError, match="--max-shard-size"):
        quiet_convert(tmp_path / "out", input=work["fp16"], vision_tower=work["clip"], max_shard_size="lots")
    with pytest.raises(ValueError, match="--base-llm"):
        quiet_convert(tmp_path / "out", projector_only=os.path.join(work["stage1"], "mm_projector.bin"),
                      vision_tower=work["clip"])
    with pytest.raises(ValueError, match="--input"):
        quiet_convert(tmp_path / "out")
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20


def test_presets_cover_the_released_families_and_are_consistent():
    presets = tokenpacker.load_presets()
    assert set(presets) == {
        "TokenPacker-7b-144token", "TokenPacker-13b-144token", "TokenPacker-HD-7b-9patch-144token",
        "TokenPacker-HD-13b-9patch-144token", "TokenPacker-HD-13b-16patch-144token",
        "TokenPacker-HD-13b-16patch-64token", "TokenPacker-HD-13b-16patch-36token",
    }
    for name, preset in presets.items():
        assert preset["image_seq_length"] == (24 // preset["scale_factor"]) ** 2, name
        assert (preset["image_aspect_ratio"] == "slice") == (preset["patch_num"] is not None), name
        assert preset["vision_tower"] == "openai/clip-vit-large-patch14-336"
        text = preset["text_config"]
        size = "13b" if "13b" in name else "7b"
        assert (text["hidden_size"], text["num_hidden_layers"], text["intermediate_size"]) == (
            {"7b": (4096, 32, 11008), "13b": (5120, 40, 13824)}[size])
        from modeling_tokenpacker import TokenPackerConfig

        config = TokenPackerConfig(vision_config={**preset["vision_config"], "model_type": "clip_vision_model"},
                                   scale_factor=preset["scale_factor"], projector_num_heads=preset["projector_num_heads"],
                                   projector_hidden_size=preset["projector_hidden_size"])
        assert config.image_seq_length == preset["image_seq_length"]


def _facts(size, scale, mode, patch_num=None):
    dims = {"7b": (4096, 32, 32, 11008), "13b": (5120, 40, 40, 13824)}[size]
    return dict(zip(("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"), dims),
                projector_type="tokenpacker", scale_factor=scale, image_aspect_ratio=mode, patch_num=patch_num)


def test_preset_auto_detection():
    assert tokenpacker.match_presets(_facts("7b", 2, "pad")) == ["TokenPacker-7b-144token"]
    assert tokenpacker.match_presets(_facts("13b", 3, "slice")) == ["TokenPacker-HD-13b-16patch-64token"]
    assert tokenpacker.match_presets(_facts("7b", 2, "slice")) == ["TokenPacker-HD-7b-9patch-144token"]
    # HD-13b with scale 2 and no patch_num in the config: 9 or 16 patches, ambiguous
    assert sorted(tokenpacker.match_presets(_facts("13b", 2, "slice"))) == [
        "TokenPacker-HD-13b-16patch-144token", "TokenPacker-HD-13b-9patch-144token"]
    assert tokenpacker.match_presets(_facts("13b", 2, "slice", patch_num=16)) == ["TokenPacker-HD-13b-16patch-144token"]
    assert tokenpacker.match_presets(_facts("7b", 4, "pad")) == []


def test_explicit_preset_that_does_not_fit_is_refused(work, tmp_path):
    with pytest.raises(ConversionError, match=r"does not match preset 'TokenPacker-7b-144token': hidden_size: "
                                              r"preset expects 4096, checkpoint has 64"):
        quiet_convert(tmp_path / "out", input=work["fp16"], vision_tower=work["clip"], preset="tokenpacker-7b-144token")
    with pytest.raises(ConversionError, match="Unknown preset 'nope'; available"):
        quiet_convert(tmp_path / "out", input=work["fp16"], vision_tower=work["clip"], preset="nope")


def test_readme_documents_every_mapping_and_ignore_rule():
    readme = open(os.path.join(REPO_ROOT, "conversion", "README.md"), encoding="utf-8").read()
    for original, ours in list(tokenpacker.TOKENPACKER_PROJECTOR_NAMES.items()) + list(tokenpacker.MLP2X_GELU_PROJECTOR_NAMES.items()):
        module, _, param = original.rpartition(".")
        assert f"`model.mm_projector.{original}`" in readme or (
            f"`model.mm_projector.{module}.weight` / `.bias`" in readme and param in ("weight", "bias")), original
        for name in (ours if isinstance(ours, tuple) else (ours,)):
            assert f"multi_modal_projector.{name}`" in readme, name
    for rule in ("rotary_emb.inv_freq", "embeddings.position_ids", "text_model.", "training_args.bin",
                 "model.vision_tower.vision_tower.vision_model.", "model.embed_tokens.weight", "lm_head.weight"):
        assert rule in readme, rule


# ------------------------------------------------------------------------------------------------------------------
# CLI and Hub
# ------------------------------------------------------------------------------------------------------------------

def test_cli_runs_as_a_script(work, tmp_path):
    script = os.path.join(REPO_ROOT, "conversion", "convert_tokenpacker_to_hf.py")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    command = [sys.executable, script, "--input", work["fp16"], "--vision-tower", work["clip"],
               "--output", str(tmp_path / "out"), "--dtype", "float32", "--no-verify", "--max-shard-size", "1MB"]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "tensors written" in completed.stdout and "Converting" in completed.stderr  # summary and progress bar
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"
    bad = subprocess.run(command[:-5] + ["--dtype", "float8"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert bad.returncode == 2 and "invalid choice: 'float8'" in bad.stderr
    again = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_push_to_hub_uploads_the_finished_folder(work, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, folder_path, repo_id, **kwargs):
        calls.append(("upload_folder", repo_id, sorted(os.listdir(folder_path)), str(folder_path), kwargs))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    result = quiet_convert(tmp_path / "out", input=work["fp16"], vision_tower=work["clip"],
                           push_to_hub="someone/tokenpacker-tiny", private=True)
    assert result.pushed_to == "someone/tokenpacker-tiny"
    (kind, repo_id, kwargs), upload = calls[0], calls[1]
    assert kind == "create_repo" and repo_id == "someone/tokenpacker-tiny"
    assert kwargs["private"] is True and kwargs["exist_ok"] is True
    assert upload[0] == "upload_folder" and upload[1] == "someone/tokenpacker-tiny" and upload[3] == str(tmp_path / "out")
    assert {"config.json", "model.safetensors", "README.md", "modeling_tokenpacker.py", "tokenizer.json"} <= set(upload[2])
    assert "someone/tokenpacker-tiny" in (tmp_path / "out" / "README.md").read_text()


def test_converted_folder_loads_in_transformers_4_46_with_the_same_tokens(converted, tmp_path, legacy_python):
    """The oldest supported transformers reads a converted folder through every Auto class."""
    from test_remote_code import run_child

    legacy = legacy_python
    output, _ = converted["sharded_bin_embedded_tower"]
    images = []
    for i, size in enumerate([(480, 360), (300, 500)]):
        images.append(tmp_path / f"image{i}.png")
        synthesize_image(*size).save(images[-1])
    current = run_child(output, images, cwd=tmp_path)
    old = run_child(output, images, cwd=tmp_path, python=legacy)
    assert old["loaded"] == current["loaded"]
    assert old["tokens"] == current["tokens"]


def test_every_model_preset_has_a_processor_preset_that_agrees_with_it():
    for name, preset in tokenpacker.load_presets().items():
        processing = tokenpacker.processor_preset(name)
        assert processing is not None, name
        assert processing["image_seq_length"] == preset["image_seq_length"], name
        assert processing["image_processor"]["image_aspect_ratio"] == preset["image_aspect_ratio"], name
        if preset["patch_num"] is not None:
            assert processing["image_processor"]["patch_num"] == preset["patch_num"], name
        from modeling_tokenpacker import TokenPackerImageProcessor, load_chat_template

        TokenPackerImageProcessor(**processing["image_processor"])  # valid settings
        assert load_chat_template(processing["chat_template"])
