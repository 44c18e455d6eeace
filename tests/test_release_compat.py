"""What keeps the shipped code working when transformers renames things (5.24 renamed `past_key_values` to
`cache`): outputs are transformers' own types, the cache travels through `**kwargs` under the installed release's
name, the prefill step is found without version checks, and our code triggers no deprecation warning."""

import dataclasses
import json
import subprocess
import sys
import textwrap

import torch
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from conftest import record_forward_inputs
from modeling_tokenpacker.demo import synthesize_image
from modeling_tokenpacker.modeling_tokenpacker import (
    TokenPackerCausalLMOutputWithPast,
    TokenPackerModelOutputWithPast,
)

PROMPT = "USER: <image>\nWhat is in the image? ASSISTANT:"
# The KV cache's field in the installed release's outputs: `cache` from 5.24, `past_key_values` before.
CACHE_FIELD = next(f.name for f in dataclasses.fields(CausalLMOutputWithPast) if f.name in ("cache", "past_key_values"))


def test_outputs_are_transformers_own_output_types_with_the_image_features_added(tiny_model, processor, images):
    assert issubclass(TokenPackerModelOutputWithPast, BaseModelOutputWithPast)
    assert issubclass(TokenPackerCausalLMOutputWithPast, CausalLMOutputWithPast)
    inputs = processor(images=[images[0]], text=[PROMPT], return_tensors="pt")
    with torch.no_grad():
        output = tiny_model(**inputs, use_cache=True)
        base = tiny_model.model(**inputs, use_cache=True)
    for result in (output, base):
        assert isinstance(result[CACHE_FIELD], Cache)
        assert result[CACHE_FIELD].get_seq_length() == inputs["input_ids"].shape[1]
        assert result.image_hidden_states.shape == (1, 144, tiny_model.config.text_config.hidden_size)
    assert set(output.keys()) == {"logits", CACHE_FIELD, "image_hidden_states", "image_outputs"}


def test_cache_passed_back_by_the_installed_release_name_continues_the_sequence(tiny_model, processor, images):
    inputs = processor(images=[images[0]], text=[PROMPT], return_tensors="pt")
    with torch.no_grad():
        full = tiny_model(**inputs).logits
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        first = tiny_model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], pixel_values=inputs["pixel_values"],
                           use_cache=True)
        step = tiny_model(input_ids=ids[:, -1:], attention_mask=mask, use_cache=True,
                          **{CACHE_FIELD: first[CACHE_FIELD]})
    torch.testing.assert_close(step.logits[:, -1], full[:, -1], atol=1e-5, rtol=0)


def test_generate_gives_pixel_values_to_the_prefill_step_only(tiny_model, processor, images):
    inputs = processor(images=[images[0]], text=[PROMPT], return_tensors="pt")
    with record_forward_inputs(tiny_model) as calls, torch.no_grad():
        tiny_model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert ["pixel_values" in call for call in calls] == [True, False, False, False]
    assert all(isinstance(call.get(CACHE_FIELD), Cache) for call in calls)


def test_generate_without_cache_gives_pixel_values_to_every_step(tiny_model, processor, images):
    inputs = processor(images=[images[0]], text=[PROMPT], return_tensors="pt")
    with record_forward_inputs(tiny_model) as calls, torch.no_grad():
        tiny_model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, use_cache=False)
    assert ["pixel_values" in call for call in calls] == [True, True, True]


def test_beam_search_gives_each_beam_its_prompt_blocks_on_the_prefill_step_only(tiny_model, processor, images):
    inputs = processor(images=images[:2], text=[PROMPT, PROMPT], return_tensors="pt", padding=True)
    with record_forward_inputs(tiny_model) as calls, torch.no_grad():
        tiny_model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, num_beams=2, do_sample=False)
    assert calls[0]["pixel_values"].shape[0] == 4  # 2 prompts x 2 beams
    torch.testing.assert_close(calls[0]["pixel_values"][1], inputs["pixel_values"][0])
    assert not any("pixel_values" in call for call in calls[1:])


# A fresh process (transformers' warning_once remembers earlier warnings): load the checkpoint as remote code, run
# what a notebook runs, and report every warning and every transformers log record of level WARNING or above.
WARNINGS_CHILD = textwrap.dedent(
    """
    import json, logging, sys, warnings
    warnings.simplefilter("always")
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(f"{record.name}: {record.getMessage()}")

    import torch, transformers
    from PIL import Image
    transformers.utils.logging.get_logger("transformers").addHandler(Collect(level=logging.WARNING))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path, image = sys.argv[1], Image.open(sys.argv[2])
        model = transformers.AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()
        processor = transformers.AutoProcessor.from_pretrained(path, trust_remote_code=True)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=[image, image], text=[prompt, prompt + " Be brief."], return_tensors="pt",
                           padding=True)
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=4, do_sample=False)
            model.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False)
            model.generate(**inputs, max_new_tokens=3, do_sample=True, top_k=5)
            model(**inputs, labels=inputs["input_ids"])
        transformers.AutoModel.from_pretrained(path, trust_remote_code=True)(**inputs)
    print(json.dumps({"warnings": [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught],
                      "log": records}))
    """
)


def test_loading_and_generating_emit_no_warning(tmp_path, checkpoint):
    image_path = tmp_path / "image.png"
    synthesize_image(400, 300).save(image_path)
    result = subprocess.run([sys.executable, "-I", "-c", WARNINGS_CHILD, str(checkpoint), str(image_path)],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # AutoModel on a checkpoint with the head reports the head's weight as unused, as it does for native LlavaModel
    # (vLLM drops any weight `_keys_to_ignore_on_load_unexpected` matches, so that report is not silenced).
    head_reports = [r for r in report["log"] if "TokenPackerModel LOAD REPORT" in r]
    assert all([line.split("|")[0].strip() for line in r.splitlines() if "UNEXPECTED |" in line] == ["lm_head.weight"]
               for r in head_reports)
    assert report["warnings"] == [] and [r for r in report["log"] if r not in head_reports] == []
