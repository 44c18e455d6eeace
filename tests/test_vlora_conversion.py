"""The VLoRA converter (conversion/convert_vlora_to_hf.py) on tiny checkpoints in the original VLoRA format
(tests/original_vlora_format.py): several target sets (a shared generator among them), layer strides 1, 2 and 4,
bf16 / fp16 / fp32, sharded safetensors, a single and a sharded .bin, with the CLIP copy embedded and without, a
stage-1 mm_projector.bin with its base LLM, and the original's oddities (a repeated letter, a letter it ignores).

Every converted tensor is compared with the source tensor through an independent statement of the mapping (below),
after loading the output with `AutoModelForImageTextToText.from_pretrained(..., trust_remote_code=True)`.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
sys.path.insert(0, REPO_ROOT)

import original_vlora_format as ov  # noqa: E402
from conftest import dtype_kwargs  # noqa: E402
from conversion import vlora  # noqa: E402
from conversion.common import ConversionError  # noqa: E402
from conversion.vlora_converter import VLoRAConverter, convert  # noqa: E402
from conversion_inputs import Sentinel  # noqa: E402
from modeling_tokenpacker.staging import STAGING_PREFIX  # noqa: E402

CLI = os.path.join(REPO_ROOT, "conversion", "convert_vlora_to_hf.py")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# A checkpoint with the original's oddities: 'm' twice (the original keeps the second), 'x' (generated, ignored).
ODD = ov.Variant("odd_mqxm", "mqxm", 2, True, None, 32, ov.GENERATOR_DEPTH, ov.RANK, "safetensors", torch.float32)


def build_odd(root):
    with mock.patch.dict(ov.VARIANTS, {ODD.name: ODD}):
        return ov.build_original_checkpoint(root, ODD.name)


def make_sharded_bin(source, path):
    """The sharded safetensors raw save re-written as pytorch_model-0000i-of-00002.bin + index, with a
    training_args.bin whose unpickling would leave a file behind."""
    os.makedirs(path)
    index = json.load(open(os.path.join(source, "model.safetensors.index.json")))
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        name = shard.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
        tensors = load_file(os.path.join(source, shard))
        torch.save(tensors, os.path.join(path, name))
        weight_map.update({key: name for key in tensors})
    json.dump({"metadata": {}, "weight_map": weight_map}, open(os.path.join(path, "pytorch_model.bin.index.json"), "w"))
    for name in os.listdir(source):
        if name.startswith(("tokenizer", "special_tokens", "config", "generation")):
            shutil.copy(os.path.join(source, name), path)
    torch.save(Sentinel(os.path.join(os.path.dirname(path), "TRAINING_ARGS_WAS_UNPICKLED")),
               os.path.join(path, "training_args.bin"))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("vlora_conversion"))
    checkpoints = ov.build_all(root)
    odd = build_odd(root)
    return {"root": root, "clip": checkpoints["stage1"].clip_path, "base_llm": checkpoints["stage1"].base_llm_path,
            "odd": odd.path, "sharded_bin": make_sharded_bin(checkpoints["qkvom_s2_sep"].path,
                                                               os.path.join(root, "bin_shards", "vlora_raw")),
            **{name: checkpoint.path for name, checkpoint in checkpoints.items()}}


def quiet_convert(output, **kwargs):
    kwargs.setdefault("verify", False)
    kwargs.setdefault("progress", False)
    return convert(str(output), **kwargs)


LAYOUTS = {  # name: (arguments, source variant, output dtype, CLIP from the folder)
    "sharded_safetensors_bf16": (lambda w: {"input": w["qkvom_s2_sep"], "vision_tower": w["clip"]},
                                 "qkvom_s2_sep", "bfloat16", True),
    "shared_generator_fp16_bin": (lambda w: {"input": w["qkvo_s1_shared"], "vision_tower": w["clip"],
                                             "max_shard_size": "300KB"}, "qkvo_s1_shared", "float16", True),
    "stride4_fp32_safetensors": (lambda w: {"input": w["mo_s4_sep"], "vision_tower": w["clip"], "dtype": "bfloat16"},
                                 "mo_s4_sep", "bfloat16", True),
    "stage1_projector_only": (lambda w: {"projector_only": os.path.join(w["stage1"], "mm_projector.bin"),
                                         "base_llm": w["base_llm"], "vision_tower": w["clip"]},
                              "stage1", "float16", True),
    "sharded_bin_embedded_clip": (lambda w: {"input": w["sharded_bin"]}, "qkvom_s2_sep", "bfloat16", False),
    "odd_letters": (lambda w: {"input": w["odd"], "vision_tower": w["clip"]}, ODD.name, "float32", True),
}
VERIFIED_LAYOUTS = ("sharded_safetensors_bf16", "stage1_projector_only")  # a verification child costs seconds


@pytest.fixture(scope="module")
def converted(work, tmp_path_factory):
    out = tmp_path_factory.mktemp("vlora_converted")
    return {name: (out / name, quiet_convert(out / name, **arguments(work)))
            for name, (arguments, _, _, _) in LAYOUTS.items()}


# ------------------------------------------------------------------------------------------------------------------
# the mapping, stated independently of conversion/vlora.py
# ------------------------------------------------------------------------------------------------------------------

def read_folder(folder, names=None):
    """{name: tensor} of every weight file of a folder (or the named files)."""
    tensors = {}
    for name in names or sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(".safetensors"):
            tensors.update(load_file(path))
        elif name.endswith(".bin") and name != "training_args.bin":
            tensors.update(torch.load(path, weights_only=True))
    return tensors


BLOCK = {"norm1": "self_attn_layer_norm", "norm2": "cross_attn_layer_norm", "norm3": "final_layer_norm",
         "linear1": "fc1", "linear2": "fc2"}


def expected_state(work, layout):
    """{our name: tensor} the output must hold for `layout`, from the source files and the documented rules."""
    arguments, variant, _, from_folder = LAYOUTS[layout]
    args = arguments(work)
    config = json.load(open(os.path.join(args.get("input") or work["stage1"], "config.json")))
    source = read_folder(os.path.dirname(args["projector_only"]), ["mm_projector.bin"]) if "projector_only" in args \
        else read_folder(args["input"])
    if "projector_only" in args:
        source.update(read_folder(work["base_llm"]))
    if from_folder:
        source.update({"model.vision_tower.vision_tower." + k: v for k, v in read_folder(work["clip"]).items()})
    letters, slots = config["vlora_type"], config["num_hidden_layers"] // config["skip_layers"]
    hidden, rank = config["hidden_size"], config["vlora_rank"]
    last = {letter: t for t, letter in enumerate(letters)}
    kept = [t for t, letter in enumerate(letters) if letter in "qkvom" and last[letter] == t]
    out = {}
    for name, tensor in source.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name.startswith("model.vision_tower.vision_tower.vision_model."):
            out["model.vision_tower." + name.split(".vision_model.", 1)[1]] = tensor
        elif name == "lm_head.weight":
            out[name] = tensor
        elif not name.startswith("model.mm_projector."):
            out["model.language_model." + name[len("model."):]] = tensor
    g = {k: v for k, v in source.items() if k.startswith("model.mm_projector.")}
    ours = "model.perceptual_weights_generator."
    out[ours + "position_embedding"] = g["model.mm_projector.pos_embed"][0]
    for part in ("weight", "bias"):
        out[ours + f"visual_proj.{part}"] = g[f"model.mm_projector.visual_proj.{part}"]
    rows = g["model.mm_projector.Bs"][0].reshape(len(letters), slots, hidden, rank)
    for t in kept:
        out[ours + f"lora_B.{letters[t]}"] = rows[t]
    prefixes = [f"model.mm_projector.gen.{t}." for t in kept] if config["weights_sep"] else ["model.mm_projector.gen."]
    for index, prefix in enumerate(prefixes):
        target = f"{ours}generators.{index}."
        for name, tensor in g.items():
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            if rest == "queries":
                out[target + "queries"] = tensor[0]
                continue
            match = re.fullmatch(r"decoders\.(\d+)\.(self_attn|multihead_attn|norm\d|linear\d)\.(.+)", rest)
            if match is None:  # norm.*, weights_head.*
                out[target + rest] = tensor
                continue
            layer, module, param = match.groups()
            base = f"{target}layers.{layer}."
            if module in BLOCK:
                out[base + f"{BLOCK[module]}.{param}"] = tensor
                continue
            attention = "self_attn" if module == "self_attn" else "cross_attn"
            if param.startswith("in_proj_"):
                for proj, piece in zip("qkv", tensor.chunk(3)):
                    out[base + f"{attention}.{proj}_proj.{param[len('in_proj_'):]}"] = piece
            else:
                out[base + f"{attention}.{param}"] = tensor
    return out


def test_every_layout_loads_through_the_auto_classes_and_equals_the_source(converted, work):
    from transformers import AutoModelForImageTextToText

    for name, (output, result) in converted.items():
        dtype = DTYPES[LAYOUTS[name][2]]
        model = AutoModelForImageTextToText.from_pretrained(output, trust_remote_code=True, **dtype_kwargs(dtype))
        assert type(model).__name__ == "VLoRAForConditionalGeneration", name
        state = model.state_dict()
        expected = expected_state(work, name)
        assert sorted(state) == sorted(expected), name
        different = [key for key, tensor in expected.items()
                     if state[key].dtype != dtype or not torch.equal(state[key], tensor.to(dtype))]
        assert different == [], (name, different[:5])
        assert result.written_tensors == len(state) and result.dtype == LAYOUTS[name][2], name


def test_converter_verifies_in_a_fresh_process(work, tmp_path):
    for name in VERIFIED_LAYOUTS:
        result = quiet_convert(tmp_path / name, verify=True, **LAYOUTS[name][0](work))
        assert result.verified_tensors == result.written_tensors, name


def test_configs_and_summaries(converted, work):
    configs = {name: json.load(open(output / "config.json")) for name, (output, _) in converted.items()}
    from modeling_tokenpacker.configuration_vlora import AUTO_MAP

    for name, config in configs.items():
        assert config["model_type"] == "vlora" and config["auto_map"] == AUTO_MAP, name
        assert config["architectures"] == ["VLoRAForConditionalGeneration"], name
        assert (config["image_token_id"], config["image_token_embedding_id"]) == (1000, 0), name
        text = config["text_config"]
        assert (text["vocab_size"], text["pad_token_id"], text["num_hidden_layers"]) == (1000, 0, 4), name
        assert config["vision_feature_layer"] == -2 and config["vision_feature_select_strategy"] == "default", name
        assert (config["generator_num_heads"], config["generator_mlp_ratio"]) == (16, 4), name
    pick = {name: (c["delta_targets"], c["layer_stride"], c["separate_generators"], c["lora_alpha"], c["lora_rank"],
                   c["generator_hidden_size"], c["generator_num_layers"], c["image_aspect_ratio"])
            for name, c in configs.items()}
    assert pick == {
        "sharded_safetensors_bf16": ("qkvom", 2, True, 4.0, 4, 32, 2, "pad"),
        "shared_generator_fp16_bin": ("qkvo", 1, False, None, 4, 32, 2, "pad"),
        "stride4_fp32_safetensors": ("mo", 4, True, 8.0, 4, 32, 2, "pad"),
        "stage1_projector_only": ("qkvom", 2, True, 4.0, 4, 48, 2, "square"),
        "sharded_bin_embedded_clip": ("qkvom", 2, True, 4.0, 4, 32, 2, "pad"),
        "odd_letters": ("qm", 2, True, None, 4, 32, 2, "pad"),
    }
    _, raw = converted["sharded_safetensors_bf16"]
    assert raw.ignored == {"embedded vision tower superseded by --vision-tower (the original reads CLIP from "
                           "mm_vision_tower)": 55, "rotary inv_freq buffer (recomputed from the config)": 4}
    _, embedded = converted["sharded_bin_embedded_clip"]
    assert any("embedded" in warning and "--vision-tower" in warning for warning in embedded.warnings)
    assert not os.path.exists(os.path.join(work["root"], "bin_shards", "TRAINING_ARGS_WAS_UNPICKLED"))
    output, shared = converted["shared_generator_fp16_bin"]
    assert shared.shards > 1 and os.path.isfile(output / "model.safetensors.index.json")
    _, stage1 = converted["stage1_projector_only"]
    assert stage1.ignored == {} and stage1.mapped_tensors == 4 + 5 * (5 + 18 * 2) + 39 + 55
    assert "dropped" not in raw.summary()


def test_output_folder_holds_processor_tokenizer_and_remote_code(converted):
    from modeling_tokenpacker import load_chat_template
    from modeling_tokenpacker.remote_code import VLORA_ENTRY_MODULES, shipped_files

    output, result = converted["sharded_safetensors_bf16"]
    files = set(os.listdir(output))
    assert {"config.json", "generation_config.json", "model.safetensors", "README.md", "preprocessor_config.json",
            "processor_config.json", "tokenizer_config.json", "chat_template.json", *shipped_files(VLORA_ENTRY_MODULES)} <= files
    for name, path in shipped_files(VLORA_ENTRY_MODULES).items():
        assert (output / name).read_text() == path.read_text()
    assert not [name for name in os.listdir(output.parent) if name.startswith(STAGING_PREFIX)]
    tokenizer_config = json.loads((output / "tokenizer_config.json").read_text())
    assert tokenizer_config["padding_side"] == "left" and tokenizer_config["pad_token"] == "<unk>"
    assert json.loads((output / "chat_template.json").read_text())["chat_template"] == load_chat_template("vicuna_v1")
    generation = json.loads((output / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 0)
    preprocessor = json.loads((output / "preprocessor_config.json").read_text())
    assert preprocessor["image_processor_type"] == "VLoRAImageProcessor" and preprocessor["image_aspect_ratio"] == "pad"
    card = (output / "README.md").read_text()
    from huggingface_hub import ModelCard

    data = ModelCard.load(output / "README.md").data
    assert data.library_name == "transformers" and "vlora" in data.tags and data.pipeline_tag == "image-text-to-text"
    assert "arxiv.org/abs/2405.20339" in card and "convert_vlora_to_hf.py` " in card and "layers (0-based [1, 3])" in card
    assert "Dropped (computed by the original but never used, so not converted): nothing." in card
    for folder_name in ("vlora_conversion", "checkpoints", "vlora-qkvom"):  # no local folder names
        assert folder_name not in card, folder_name


def test_repeated_and_ignored_letters_are_dropped_and_reported(converted, work):
    output, result = converted["odd_letters"]
    per_generator = 5 + 18 * ov.GENERATOR_DEPTH
    reasons = {reason: count for reason, count in result.ignored.items() if reason.startswith("sub-generator")}
    assert sorted(reasons.values()) == [per_generator, per_generator]
    assert any("gen.0 (letter 'm')" in reason and "keeps the last" in reason for reason in reasons)
    assert any("gen.2 (letter 'x')" in reason and "ignores it" in reason for reason in reasons)
    summary = result.summary()
    assert "dropped: sub-generator gen.0 (letter 'm')" in summary and "rows 0..1 of model.mm_projector.Bs" in summary
    assert "dropped: sub-generator gen.2 (letter 'x')" in summary and "rows 4..5 of model.mm_projector.Bs" in summary
    assert len(result.warnings) >= 2
    card = (output / "README.md").read_text()
    assert "- sub-generator gen.0 (letter 'm')" in card and "- sub-generator gen.2 (letter 'x')" in card
    state = load_file(output / "model.safetensors")
    source = load_file(os.path.join(work["odd"], "model.safetensors"))
    prefix = "model.perceptual_weights_generator."
    assert torch.equal(state[prefix + "generators.1.weights_head.bias"], source["model.mm_projector.gen.3.weights_head.bias"])
    assert torch.equal(state[prefix + "generators.0.queries"], source["model.mm_projector.gen.1.queries"][0])
    assert torch.equal(state[prefix + "lora_B.m"], source["model.mm_projector.Bs"][0, 6:8].reshape(2, 64, 4))


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
            out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
            plain = model(input_ids=inputs["input_ids"].masked_fill(inputs["input_ids"] == 1000, 0)).logits
            full = model(**inputs).logits
        report[path] = {"module": type(model).__module__, "placeholders": int((inputs["input_ids"] == 1000).sum()),
                        "new_tokens": out[0, inputs["input_ids"].shape[1]:].tolist(),
                        "image_changes_logits": bool((plain[0, -1] - full[0, -1]).abs().max() > 1e-3)}
    report["imported"] = sorted({n.split(".")[0] for n in sys.modules} & {"modeling_tokenpacker", "conversion"})
    print(json.dumps(report))
    """
)


def test_outputs_generate_in_a_fresh_process_without_the_package(converted, tmp_path):
    image = tmp_path / "image.png"
    ov.make_test_image().save(image)
    paths = [str(output) for output, _ in converted.values()]
    completed = subprocess.run([sys.executable, "-I", "-c", GENERATE_CHILD, str(image), *paths], capture_output=True,
                               text=True, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report.pop("imported") == []
    for path in paths:
        child = report[path]
        assert child["module"].startswith("transformers_modules") and child["placeholders"] == 1, path
        assert len(child["new_tokens"]) == 3 and child["image_changes_logits"], path


# ------------------------------------------------------------------------------------------------------------------
# bad inputs: one line, nothing written
# ------------------------------------------------------------------------------------------------------------------

def leftovers(folder):
    return [name for name in os.listdir(folder) if name.startswith((STAGING_PREFIX, "_tmp"))]


def edited_copy(work, tmp_path, variant="mo_s4_sep", config=None, drop=(), add=None):
    """A copy of a checkpoint with config keys replaced and tensors removed or added (single safetensors file)."""
    path = str(tmp_path / "orig")
    shutil.copytree(work[variant], path)
    if config:
        config_path = os.path.join(path, "config.json")
        edited = {**json.load(open(config_path)), **config}
        json.dump({key: value for key, value in edited.items() if value is not REMOVE}, open(config_path, "w"))
    if drop or add:
        weights = os.path.join(path, "model.safetensors")
        state = {k: v for k, v in load_file(weights).items() if k not in drop}
        save_file({**state, **(add or {})}, weights, metadata={"format": "pt"})
    return path


REMOVE = object()
BAD_INPUTS = {
    "unknown_generator_tensor": ({"add": {"model.mm_projector.gen.0.extra.weight": torch.zeros(2)}},
                                 r"Unknown tensor\(s\) \['model\.mm_projector\.gen\.0\.extra\.weight'\]"),
    "unknown_tensor_elsewhere": ({"add": {"model.adapter.weight": torch.zeros(2)}},
                                 r"Unknown tensor 'model\.adapter\.weight' in the original checkpoint"),
    "missing_generator_tensor": ({"drop": ["model.mm_projector.gen.1.decoders.1.norm3.bias"]},
                                 r"generator is incomplete .*missing \['model\.mm_projector\.gen\.1\.decoders\.1\.norm3\.bias'\]"),
    "missing_llm_tensor": ({"drop": ["model.layers.2.mlp.up_proj.weight"]},
                           r"no source tensor for \['model\.language_model\.layers\.2\.mlp\.up_proj\.weight'\]"),
    "stride_not_dividing": ({"config": {"skip_layers": 3}},
                            r"skip_layers=3 does not divide vlora_llm_depth=4.*expected one of \[1, 2, 4\]"),
    "llm_dim": ({"config": {"vlora_llm_dim": 128}}, r"vlora_llm_dim=128 but the LLM has hidden_size=64"),
    "llm_depth": ({"config": {"vlora_llm_depth": 8}}, r"vlora_llm_depth=8 but the LLM has num_hidden_layers=4"),
    "generator_width": ({"config": {"vlora_dim": 48}}, r"shapes contradict the config \(vlora_dim=48.*"
                                                       r"model\.mm_projector\.pos_embed \[1, 576, 32\] \(the config implies \[1, 576, 48\]\)"),
    "heads": ({"config": {"vlora_dim": 40}}, r"vlora_dim=40 is not a multiple of the 16 attention heads"),
    "cls_patch_rows": ({"config": {"mm_vision_select_feature": "cls_patch"}},
                       r"vlora_pos_num=576 but the vision tower gives 577 feature rows"),
    "no_applied_letter": ({"config": {"vlora_type": "xy"}}, r"names none of the targets the original applies"),
    "shared_with_repeat": ({"variant": "qkvo_s1_shared", "config": {"vlora_type": "qkvq"}},
                           r"weights_sep=false: the shared sub-generator's queries"),
    "gqa": ({"variant": "qkvo_s1_shared", "config": {"num_key_value_heads": 2}}, r"grouped-query attention"),
    "not_vlora": ({"config": {"model_type": "llava"}}, r"not an original VLoRA config: expected model_type in"),
    "missing_key": ({"config": {"weights_sep": REMOVE}}, r"lacks the keys \['weights_sep'\]"),
    "empty_type": ({"config": {"vlora_type": ""}}, r"vlora_type must be a non-empty string"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_fail_in_one_line_and_write_nothing(work, tmp_path, case):
    edits, message = BAD_INPUTS[case]
    source = edited_copy(work, tmp_path, **edits)
    with pytest.raises(ConversionError, match=message) as error:
        quiet_convert(tmp_path / "out", input=source, vision_tower=work["clip"])
    assert "\n" not in str(error.value)
    assert not os.path.exists(tmp_path / "out") and not leftovers(tmp_path)


def test_vision_tower_that_does_not_fit_the_generator(work, tmp_path):
    clip = str(tmp_path / "clip")
    shutil.copytree(work["clip"], clip)
    config = json.load(open(os.path.join(clip, "config.json")))
    json.dump({**config, "hidden_size": 48}, open(os.path.join(clip, "config.json"), "w"))
    with pytest.raises(ConversionError, match=r"vlora_visual_dim=32 but the vision tower is 48 wide"):
        quiet_convert(tmp_path / "out", input=work["mo_s4_sep"], vision_tower=clip)
    json.dump({**config, "image_size": 224}, open(os.path.join(clip, "config.json"), "w"))
    with pytest.raises(ConversionError, match=r"vlora_pos_num=576 but the vision tower gives 256 feature rows"):
        quiet_convert(tmp_path / "out", input=work["mo_s4_sep"], vision_tower=clip)
    assert not os.path.exists(tmp_path / "out") and not leftovers(tmp_path)


def test_no_vision_tower_names_the_bare_mm_vision_tower(work, tmp_path):
    with pytest.raises(ConversionError, match=r"bare folder name \('clip-vit-large-patch14-336'.*--vision-tower"):
        quiet_convert(tmp_path / "out", input=work["mo_s4_sep"])


def test_output_inside_an_input_is_refused_before_anything(work, tmp_path):
    source = edited_copy(work, tmp_path)
    for output in (os.path.join(source, "converted"), source, work["clip"]):
        before = sorted(os.listdir(source))
        with pytest.raises(ConversionError, match=r"(lies inside|is) (the input checkpoint|the vision tower)"):
            quiet_convert(output, input=source, vision_tower=work["clip"], overwrite=True)
        assert sorted(os.listdir(source)) == before
    assert not leftovers(tmp_path)


# ------------------------------------------------------------------------------------------------------------------
# presets, README, CLI
# ------------------------------------------------------------------------------------------------------------------

RELEASE_CONFIG = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "intermediate_size": 11008,
                  "vlora_dim": 1024, "vlora_depth": 8, "vlora_rank": 64, "vlora_type": "qkvom", "skip_layers": 4}


def test_the_vlora_preset_is_marked_unverified_and_kept_apart_from_tokenpacker(work, tmp_path):
    from conversion import tokenpacker

    presets = vlora.load_presets()
    assert set(presets) == {"VLoRA-7b-v1"} and not set(presets) & set(tokenpacker.load_presets())
    preset = presets["VLoRA-7b-v1"]
    assert preset["verified"] is False and "vlora_dim 512" in preset["note"] and "1024" in preset["note"]
    assert preset["vlora"]["vlora_dim"] == 512 and preset["vlora"]["skip_layers"] == 4
    assert vlora.match_presets(RELEASE_CONFIG) == ["VLoRA-7b-v1"]
    architecture, settings = vlora.preset_differences(preset, RELEASE_CONFIG)
    assert architecture == [] and settings == [("vlora_dim", 512, 1024)]
    converter = VLoRAConverter(str(tmp_path / "out"), input=work["mo_s4_sep"], preset="vlora-7b-v1")
    converter.original = dict(RELEASE_CONFIG)
    converter.decide_preset()
    assert converter.preset["name"] == "VLoRA-7b-v1"
    assert any("vlora_dim=1024 (preset 512)" in warning and "unverified" in warning for warning in converter.warnings)
    with pytest.raises(ConversionError, match=r"does not match preset 'VLoRA-7b-v1': hidden_size: preset expects "
                                              r"4096, checkpoint has 64"):
        quiet_convert(tmp_path / "out", input=work["mo_s4_sep"], vision_tower=work["clip"], preset="VLoRA-7b-v1")
    with pytest.raises(ConversionError, match=r"Unknown VLoRA preset 'nope'"):
        quiet_convert(tmp_path / "out", input=work["mo_s4_sep"], vision_tower=work["clip"], preset="nope")


def test_readme_documents_the_vlora_mapping_and_ignore_list():
    readme = open(os.path.join(REPO_ROOT, "conversion", "README.md"), encoding="utf-8").read()
    section = readme[readme.index("# Converting original VLoRA checkpoints"):]
    for original, ours in vlora.BLOCK_NAMES.items():
        assert f"`{original}`" in section, original
        for name in (ours if isinstance(ours, tuple) else (ours,)):
            assert f"`{name}`" in section, name
    for rule in ("pos_embed", "Bs", "visual_proj", "queries", "weights_head", "rotary_emb.inv_freq", "lora_B.{letter}",
                 "position_embedding", "model.vision_tower.vision_tower.vision_model.", "mm_projector.bin",
                 "skip_layers", "vlora_llm_dim", "vlora_pos_num", "convert_vlora_to_hf.py"):
        assert rule in section, rule


def test_cli_runs_and_helps(work, tmp_path, capsys):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    arguments = ["--input", work["mo_s4_sep"], "--vision-tower", work["clip"], "--output", str(tmp_path / "out"),
                 "--dtype", "float16", "--no-verify", "--no-progress"]
    completed = subprocess.run([sys.executable, CLI, *arguments], capture_output=True, text=True, cwd=tmp_path,
                               env=env, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "tensors written: 213" in completed.stdout and "projector: vlora" in completed.stdout
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float16"
    helped = subprocess.run([sys.executable, CLI, "--help"], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=300)
    assert helped.returncode == 0 and "usage: convert_vlora_to_hf.py" in helped.stdout
    for option in ("--input", "--projector-only", "--base-llm", "--vision-tower", "--tokenizer", "--preset",
                   "--dtype", "--max-shard-size", "--overwrite", "--push-to-hub", "--private", "--no-verify"):
        assert option in helped.stdout, option
    from conversion import convert_tokenpacker_to_hf, convert_vlora_to_hf

    capsys.readouterr()
    assert convert_vlora_to_hf.main(arguments) == 2  # the output exists now
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "--overwrite" in error and error.count("\n") == 1
    with pytest.raises(SystemExit) as exited:
        convert_tokenpacker_to_hf.main(["--help"])
    assert exited.value.code == 0 and "usage: convert_tokenpacker_to_hf.py" in capsys.readouterr().out


def test_push_to_hub_uploads_the_finished_folder_with_a_vlora_message(work, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append((repo_id, kw)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, folder_path, repo_id, **kw: calls.append((sorted(os.listdir(folder_path)), kw)))
    result = quiet_convert(tmp_path / "out", input=work["mo_s4_sep"], vision_tower=work["clip"],
                           push_to_hub="someone/vlora-tiny", private=True)
    assert result.pushed_to == "someone/vlora-tiny" and calls[0] == ("someone/vlora-tiny", {
        "repo_type": "model", "private": True, "exist_ok": True})
    files, upload = calls[1]
    assert {"config.json", "model.safetensors", "README.md", "modeling_vlora.py"} <= set(files)
    assert upload["commit_message"].startswith("VLoRA checkpoint converted with convert_vlora_to_hf")
    assert "someone/vlora-tiny" in (tmp_path / "out" / "README.md").read_text()
