"""The contract transformers' own vision-language models keep and tools rely on: `get_image_features` outputs,
`image_outputs`, `shift_labels`, the tensor-parallel plan, compilation flags and static caches, switching attention,
gradient checkpointing, names in transformers' tables. Each test names the point; native LLaVA is the yardstick."""

import pytest
import torch
import transformers
from packaging.version import Version
from transformers.modeling_outputs import BaseModelOutputWithPooling

from modeling_tokenpacker import TokenPackerForConditionalGeneration
from modeling_tokenpacker.demo import build_tiny_model, synthesize_image
from modeling_tokenpacker.modeling_common import IGNORE_INDEX, next_token_loss

PROMPT = "USER: <image>\nWhat is in the image? ASSISTANT:"
NEWEST = Version(transformers.__version__)


@pytest.fixture(scope="module")
def batch(processor, images):
    return processor(images=images[:2], text=[PROMPT, PROMPT + " Be brief."], return_tensors="pt", padding=True)


# ---------------------------------------------------------------------------------------------------------------
# 1. get_image_features and image_outputs


def test_get_image_features_returns_a_pooled_output_with_one_entry_per_image(tiny_model, batch):
    with torch.no_grad():
        output = tiny_model.get_image_features(pixel_values=batch["pixel_values"])
        _, packed = tiny_model.model.pack_images(batch["pixel_values"])
    hidden = tiny_model.config.text_config.hidden_size
    assert isinstance(output, BaseModelOutputWithPooling)
    assert [tuple(item.shape) for item in output.pooler_output] == [(144, hidden), (144, hidden)]
    torch.testing.assert_close(torch.stack(list(output.pooler_output)), packed)
    assert output.last_hidden_state.shape == (2, 1 + 24 * 24, tiny_model.config.vision_config.hidden_size)
    assert output.hidden_states is None and output.attentions is None


def test_get_image_features_gives_the_towers_hidden_states_and_attentions_when_asked(tmp_path, tiny_model, batch):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    eager = TokenPackerForConditionalGeneration.from_pretrained(tmp_path / "ckpt", attn_implementation="eager").eval()
    with torch.no_grad():
        output = eager.get_image_features(pixel_values=batch["pixel_values"], output_hidden_states=True,
                                          output_attentions=True)
    depth = eager.config.vision_config.num_hidden_layers
    assert len(output.hidden_states) == depth + 1 and len(output.attentions) == depth
    assert output.attentions[0].shape == (2, eager.config.vision_config.num_attention_heads, 577, 577)
    torch.testing.assert_close(output.hidden_states[-1], output.last_hidden_state)


def test_get_image_features_return_dict_false_and_config_return_dict_give_tuples(tiny_model, batch):
    with torch.no_grad():
        as_tuple = tiny_model.get_image_features(pixel_values=batch["pixel_values"], return_dict=False)
        as_output = tiny_model.get_image_features(pixel_values=batch["pixel_values"])
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_output.last_hidden_state)
    torch.testing.assert_close(torch.stack(list(as_tuple[1])), torch.stack(list(as_output.pooler_output)))
    tiny_model.config.return_dict = False
    try:
        with torch.no_grad():
            assert isinstance(tiny_model.get_image_features(pixel_values=batch["pixel_values"]), tuple)
    finally:
        tiny_model.config.return_dict = True


def test_get_image_features_groups_hd_blocks_per_image(tokenizer):
    from modeling_tokenpacker import TokenPackerImageProcessor

    model = build_tiny_model(tokenizer)
    pixels = TokenPackerImageProcessor(image_aspect_ratio="slice")(
        [synthesize_image(700, 300), synthesize_image(300, 300)], return_tensors="pt")
    with torch.no_grad():
        output = model.get_image_features(pixel_values=pixels["pixel_values"], image_grids=pixels["image_grids"])
        _, packed = model.model.pack_images(pixels["pixel_values"])
    assert pixels["image_grids"].tolist() == [[1, 2], [1, 1]]
    assert [item.shape[0] for item in output.pooler_output] == [3 * 144, 144]
    torch.testing.assert_close(torch.cat(list(output.pooler_output)), packed.reshape(-1, packed.shape[-1]))
    with pytest.raises(ValueError, match="describe 5 blocks"):
        model.get_image_features(pixel_values=pixels["pixel_values"], image_grids=torch.tensor([[2, 2]]))


def test_vision_feature_layer_and_strategy_can_be_chosen_per_call(tokenizer, images, processor):
    model = build_tiny_model(tokenizer, projector_type="mlp2x_gelu")
    pixel_values = processor.image_processor(images[:1], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        default = model.get_image_features(pixel_values=pixel_values, output_hidden_states=True)
        other = model.get_image_features(pixel_values=pixel_values, vision_feature_layer=-3)
        full = model.get_image_features(pixel_values=pixel_values, vision_feature_select_strategy="full")
        expected = model.multi_modal_projector(default.hidden_states[-3][:, 1:])
    torch.testing.assert_close(other.pooler_output[0], expected[0])
    assert full.pooler_output[0].shape[0] == 577
    with pytest.raises(ValueError, match="'default' or, for mlp2x_gelu only, 'full'"):
        build_tiny_model(tokenizer).get_image_features(pixel_values=pixel_values, vision_feature_select_strategy="full")


def test_outputs_carry_image_outputs_and_image_hidden_states(tiny_model, batch):
    with torch.no_grad():
        output = tiny_model(**batch)
        features = tiny_model.get_image_features(pixel_values=batch["pixel_values"])
    assert isinstance(output.image_outputs, BaseModelOutputWithPooling)
    torch.testing.assert_close(torch.stack(list(output.image_outputs.pooler_output)),
                               torch.stack(list(features.pooler_output)))
    torch.testing.assert_close(output.image_hidden_states, torch.stack(list(features.pooler_output)))


def test_images_encoded_beforehand_give_the_same_logits(tiny_model, batch):
    with torch.no_grad():
        encoded = tiny_model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True)
        direct = tiny_model(**batch).logits
        text_only = {key: value for key, value in batch.items() if key != "pixel_values"}
        from_encoded = tiny_model(**text_only, mm_encoder_outputs={"image": encoded}).logits
    torch.testing.assert_close(from_encoded, direct)
    with pytest.raises(ValueError, match="either as pixel_values or as mm_encoder_outputs"):
        tiny_model(**batch, mm_encoder_outputs={"image": encoded})


# ---------------------------------------------------------------------------------------------------------------
# 2. shift_labels


def test_shift_labels_give_the_loss_that_labels_give(tiny_model, batch):
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    shift_labels = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    with torch.no_grad():
        by_labels = tiny_model(**batch, labels=labels).loss
        by_shift = tiny_model(**batch, shift_labels=shift_labels).loss
        # sequence parallelism passes both, `labels` already shifted: shift_labels decide
        by_both = tiny_model(**batch, labels=shift_labels, shift_labels=shift_labels).loss
    torch.testing.assert_close(by_shift, by_labels)
    torch.testing.assert_close(by_both, by_labels)


def test_shift_labels_never_count_image_tokens(tiny_model, batch):
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    shift_labels = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    image = shift_labels == tiny_model.config.image_token_id
    assert image.sum() == 2 * 144
    with torch.no_grad():
        logits = tiny_model(**batch).logits
        loss = tiny_model(**batch, shift_labels=shift_labels).loss
    expected = torch.nn.functional.cross_entropy(logits[~image & (shift_labels != IGNORE_INDEX)],
                                                 shift_labels[~image & (shift_labels != IGNORE_INDEX)])
    torch.testing.assert_close(loss, expected)


def test_a_sequence_shard_with_its_shift_labels_gives_its_share_of_the_summed_loss(tiny_model, batch):
    """Context parallelism: each rank sees a slice of positions, with the targets of exactly those positions."""
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    shift_labels = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    with torch.no_grad():
        logits = tiny_model(**batch).logits
    counted = int((shift_labels != IGNORE_INDEX).sum() - (shift_labels == tiny_model.config.image_token_id).sum())
    cut = logits.shape[1] // 2
    halves = [next_token_loss(logits[:, part], shift_labels=shift_labels[:, part].masked_fill(
        shift_labels[:, part] == tiny_model.config.image_token_id, IGNORE_INDEX), num_items_in_batch=counted)
        for part in (slice(None, cut), slice(cut, None))]
    with torch.no_grad():
        whole = tiny_model(**batch, shift_labels=shift_labels, num_items_in_batch=counted).loss
    torch.testing.assert_close(halves[0] + halves[1], whole)


def test_next_token_loss_is_transformers_causal_lm_loss():
    from transformers.loss.loss_utils import ForCausalLMLoss

    torch.manual_seed(0)
    logits, labels = torch.randn(2, 7, 11), torch.randint(0, 11, (2, 7))
    labels[0, :3] = IGNORE_INDEX
    torch.testing.assert_close(next_token_loss(logits, labels), ForCausalLMLoss(logits, labels, 11))
    torch.testing.assert_close(next_token_loss(logits, labels, num_items_in_batch=5),
                               ForCausalLMLoss(logits, labels, 11, num_items_in_batch=5))


# ---------------------------------------------------------------------------------------------------------------
# 3. Tensor parallelism

TP_CHILD = '''
import json, os, sys
import torch, transformers
from PIL import Image

path, image_path, out = sys.argv[1], sys.argv[2], sys.argv[3]
kwargs = {}
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    if hasattr(transformers, "DistributedConfig"):
        kwargs["distributed_config"] = transformers.DistributedConfig(tp_plan="auto")
    else:
        kwargs["tp_plan"] = "auto"
model = transformers.AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True, **kwargs).eval()
processor = transformers.AutoProcessor.from_pretrained(path, trust_remote_code=True)
inputs = processor(images=[Image.open(image_path)], text=["USER: <image>\\nWhat is it? ASSISTANT:"], return_tensors="pt")
with torch.no_grad():
    tokens = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
placements = lambda weight: [str(item) for item in getattr(weight, "placements", [])]
if int(os.environ.get("RANK", "0")) == 0:
    json.dump({"tokens": tokens[:, inputs["input_ids"].shape[1]:].tolist(),
               "lm_head": placements(model.lm_head.weight), "embed": placements(model.get_input_embeddings().weight),
               "tied": model.lm_head.weight is model.get_input_embeddings().weight}, open(out, "w"))
'''


def test_the_tp_plan_shards_lm_head_as_the_language_models_own_head_does(tiny_model):
    from transformers import LlamaForCausalLM

    if not getattr(LlamaForCausalLM, "_tp_plan", None):
        pytest.skip("this transformers release has no tensor-parallel plans")
    assert tiny_model._tp_plan["lm_head"] == LlamaForCausalLM._tp_plan["lm_head"]
    if hasattr(tiny_model, "tp_plan"):
        plan = tiny_model.tp_plan
        assert any(key.startswith("model.language_model.layers") for key in plan)


@pytest.mark.skipif(not hasattr(transformers, "DistributedConfig"), reason="tensor parallelism on CPU needs 5.x")
@pytest.mark.parametrize("tied", [False, True])
def test_tensor_parallel_over_two_cpu_processes_generates_the_single_process_tokens(tmp_path, tiny_model, processor,
                                                                                   tied):
    import json
    import subprocess
    import sys

    from modeling_tokenpacker import TokenPackerConfig

    model = tiny_model
    if tied:
        torch.manual_seed(0)
        model = TokenPackerForConditionalGeneration(TokenPackerConfig(**{**tiny_model.config.to_dict(),
                                                                          "tie_word_embeddings": True})).eval()
        model.generation_config = tiny_model.generation_config
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    synthesize_image(400, 300).save(tmp_path / "image.png")
    (tmp_path / "child.py").write_text(TP_CHILD)
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    args = [str(tmp_path / "child.py"), str(tmp_path / "ckpt"), str(tmp_path / "image.png")]
    single = subprocess.run([sys.executable, *args, str(tmp_path / "single.json")], capture_output=True, text=True,
                            env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    parallel = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               *args, str(tmp_path / "tp.json")], capture_output=True, text=True, env=env, timeout=600)
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("single.json", "tp.json"))
    assert two["tokens"] == one["tokens"]
    assert two["lm_head"] == ["S(0)"] and two["embed"] == ["S(0)"]  # both sides of the (tied) pair are sharded
    assert two["tied"] == tied


# ---------------------------------------------------------------------------------------------------------------
# 4. Compilation and static cache


def test_compilation_flags_are_native_llavas(tiny_model):
    from transformers import LlavaForConditionalGeneration

    for flag in ("_can_compile_fullgraph", "_supports_sdpa", "_supports_flash_attn", "_supports_flex_attn",
                 "_supports_attention_backend"):
        if hasattr(LlavaForConditionalGeneration, flag):
            assert getattr(type(tiny_model), flag) == getattr(LlavaForConditionalGeneration, flag), flag


def test_prefill_and_decode_steps_compile_without_graph_breaks(tiny_model, processor, images):
    from transformers import DynamicCache
    from transformers.modeling_outputs import CausalLMOutputWithPast

    cache_name = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
    inputs = processor(images=images[:1], text=[PROMPT], return_tensors="pt")
    with torch.no_grad():
        # a Cache object, as generate passes one (4.x would return, and then warn about, a legacy tuple otherwise)
        prefill = tiny_model(**inputs, use_cache=True, **{cache_name: DynamicCache()})
        next_token = prefill.logits[:, -1:].argmax(-1)
        decode = {"input_ids": next_token, cache_name: prefill[cache_name], "use_cache": True,
                  "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(next_token)], 1)}
        counts = {}
        for step, step_inputs in (("decode", decode), ("prefill", dict(inputs, use_cache=False))):
            torch._dynamo.reset()
            explanation = torch._dynamo.explain(tiny_model)(**step_inputs)
            counts[step] = (explanation.graph_break_count, [str(r.reason)[:200] for r in explanation.break_reasons])
    torch._dynamo.reset()
    assert counts == {"decode": (0, []), "prefill": (0, [])}


def test_compiled_forward_with_a_static_cache_generates_the_eager_tokens(tokenizer, processor, images):
    model = build_tiny_model(tokenizer, seed=5)
    inputs = processor(images=images[:1], text=[PROMPT], return_tensors="pt")
    options = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "cache_implementation": "static"}
    with torch.no_grad():
        eager = model.generate(**inputs, **options)
        torch._dynamo.reset()
        model.forward = torch.compile(model.forward, backend="eager", fullgraph=True)  # capture, no code generation
        compiled = model.generate(**inputs, **options)
    torch._dynamo.reset()
    assert compiled.tolist() == eager.tolist()


# ---------------------------------------------------------------------------------------------------------------
# 5. set_attn_implementation


@pytest.mark.skipif(not hasattr(TokenPackerForConditionalGeneration, "set_attn_implementation"),
                    reason="this transformers release has no set_attn_implementation")
def test_set_attn_implementation_switches_the_model_and_both_towers(tokenizer, processor, images):
    model = build_tiny_model(tokenizer)
    inputs = processor(images=images[:1], text=[PROMPT], return_tensors="pt")

    def implementations():
        return (model.config._attn_implementation, model.config.vision_config._attn_implementation,
                model.config.text_config._attn_implementation,
                model.model.language_model.config._attn_implementation,
                model.model._vision_tower_model.config._attn_implementation)

    assert implementations() == ("sdpa",) * 5
    with torch.no_grad():
        before = model(**inputs).logits
    model.set_attn_implementation("eager")
    assert implementations() == ("eager",) * 5
    with torch.no_grad():
        after = model(**inputs, output_attentions=True)
    assert after.attentions is not None and len(after.attentions) == model.config.text_config.num_hidden_layers
    torch.testing.assert_close(after.logits, before, atol=1e-5, rtol=0)
    model.set_attn_implementation({"text_config": "sdpa"})
    assert implementations() == ("eager", "eager", "sdpa", "sdpa", "eager")


# ---------------------------------------------------------------------------------------------------------------
# 6. Gradient checkpointing

# The tower's last layer and its post-layernorm feed nothing the model uses (the deepest feature layer is 23 of 24),
# so they get no gradient, with or without checkpointing.
UNUSED_TOWER_PARAMETERS = ("model.vision_tower.encoder.layers.23.", "model.vision_tower.post_layernorm.")


def gradients(model, inputs):
    model.zero_grad(set_to_none=True)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


def enable_checkpointing(model, use_reentrant):
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # 5.24's name; gradient_checkpointing_enable before
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_gradients_of_a_plain_backward(tokenizer, processor, images, use_reentrant):
    model = build_tiny_model(tokenizer, seed=3).train()
    inputs = processor(images=images[:1], text=[PROMPT], return_tensors="pt")
    plain = gradients(model, inputs)
    enable_checkpointing(model, use_reentrant)
    checkpointed = gradients(model, inputs)
    assert set(checkpointed) == set(plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    without = sorted({name for name, _ in model.named_parameters()} - set(plain))
    assert without and all(name.startswith(UNUSED_TOWER_PARAMETERS) for name in without), without
    assert all(any(name.startswith(prefix) for name in without) for prefix in UNUSED_TOWER_PARAMETERS)


# ---------------------------------------------------------------------------------------------------------------
# 7. Names in transformers' tables

REGISTRY_CHILD = '''
import importlib.abc, json, sys

class BlockPackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "modeling_tokenpacker":
            raise ImportError("blocked")

sys.meta_path.insert(0, BlockPackage())
import transformers
from transformers import AutoConfig, AutoModel, pipeline
from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING,
                                                    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, MODEL_MAPPING)
import transformers.pipelines.base as pipelines_base

errors = []
pipelines_base.logger.error = lambda message, *args: errors.append(str(message))
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
config_class = type(model.config)
if "image-text-to-text" in transformers.pipelines.SUPPORTED_TASKS:  # from 4.47
    pipe = pipeline("image-text-to-text", model=model, processor=transformers.AutoProcessor.from_pretrained(
        sys.argv[1], trust_remote_code=True))
print(json.dumps({
    "base": MODEL_MAPPING[config_class].__name__,
    "causal_lm": MODEL_FOR_CAUSAL_LM_MAPPING[config_class].__name__,
    "image_text_to_text": MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[config_class].__name__,
    "config_for_model_type": type(AutoConfig.for_model("tokenpacker")).__name__,
    "from_config": type(AutoModel.from_config(model.config)).__name__,
    "pipeline_errors": errors,
    "module": type(model).__module__,
}))
'''


def test_a_remote_code_load_enters_base_model_and_head_in_transformers_tables(tmp_path, checkpoint):
    import json
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-I", "-c", REGISTRY_CHILD, str(checkpoint)], capture_output=True,
                            text=True, timeout=600, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {
        "base": "TokenPackerModel",
        "causal_lm": "TokenPackerForConditionalGeneration",
        "image_text_to_text": "TokenPackerForConditionalGeneration",
        "config_for_model_type": "TokenPackerConfig",
        "from_config": "TokenPackerModel",
        "pipeline_errors": [],
        "module": report["module"],
    }
    assert report["module"].startswith("transformers_modules.")
