"""VLoRA's processor: one placeholder id per image, the original's chunk-wise tokenization, 'pad' pixels."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from modeling_tokenpacker import TokenPackerImageProcessor, VLoRAImageProcessor

PROMPT = "USER: <image>\nWhat is in the image? ASSISTANT:"


def test_each_image_is_one_placeholder_between_separately_tokenized_chunks(vlora_processor, tokenizer, images):
    ids = vlora_processor(images=[images[0]], text=[PROMPT], return_tensors="pt")["input_ids"][0].tolist()
    before, after = PROMPT.split("<image>")
    expected = (tokenizer(before)["input_ids"] + [tokenizer.convert_tokens_to_ids("<image>")]
                + tokenizer(after, add_special_tokens=False)["input_ids"])
    assert ids == expected
    assert ids.count(vlora_processor.image_token_id) == 1 and vlora_processor.image_seq_length == 1


def test_batches_pad_on_the_left_and_text_only_prompts_need_no_image(vlora_processor, images):
    batch = vlora_processor(images=[images[0]], text=[PROMPT, "USER: Hi ASSISTANT:"], return_tensors="pt",
                            padding=True)
    assert batch["pixel_values"].shape == (1, 3, 336, 336)
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][0].all()
    assert set(vlora_processor.model_input_names) == {"input_ids", "attention_mask", "pixel_values"}


@pytest.mark.parametrize("images_given, text, message", [
    (2, [PROMPT], "1 <image> placeholders .* but 2 images"),
    (0, [PROMPT], "1 <image> placeholders .* but 0 images"),
    (2, ["USER: <image> <image> Compare. ASSISTANT:"], "at most one per prompt"),
])
def test_images_and_placeholders_must_agree(vlora_processor, images, images_given, text, message):
    with pytest.raises(ValueError, match=message):
        vlora_processor(images=images[:images_given] or None, text=text, return_tensors="pt")


def test_pad_pixels_letterbox_onto_the_mean_colour_as_llava(images):
    ours = VLoRAImageProcessor()(images[1], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, TokenPackerImageProcessor()(images[1], return_tensors="pt")["pixel_values"],
                               rtol=0, atol=0)
    assert VLoRAImageProcessor().background_color == (122, 116, 104)
    # a tall image: the letterbox columns at the left edge hold the fill colour, normalised
    mean, std = np.array(VLoRAImageProcessor().image_mean), np.array(VLoRAImageProcessor().image_std)
    fill = (np.array((122, 116, 104)) / 255 - mean) / std
    torch.testing.assert_close(ours[0, :, 168, 0], torch.tensor(fill, dtype=torch.float32), rtol=0, atol=1e-6)


def test_the_high_resolution_slice_mode_does_not_exist_for_vlora():
    with pytest.raises(ValueError, match="no 'slice'"):
        VLoRAImageProcessor(image_aspect_ratio="slice")
    with pytest.raises(ValueError, match="no 'slice'"):
        VLoRAImageProcessor()(Image.new("RGB", (10, 10)), image_aspect_ratio="slice")


def test_saved_processor_reloads_through_auto_processor_with_its_chat_template(tmp_path, vlora_processor, images):
    vlora_processor.save_pretrained(tmp_path / "vlora_processor")
    loaded = AutoProcessor.from_pretrained(tmp_path / "vlora_processor", trust_remote_code=True)
    assert type(loaded).__name__ == "VLoRAProcessor" and type(loaded.image_processor).__name__ == "VLoRAImageProcessor"
    assert loaded.chat_template == vlora_processor.chat_template and loaded.image_seq_length == 1
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    text = loaded.apply_chat_template(messages, add_generation_prompt=True)
    assert text.count("<image>") == 1 and text.rstrip().endswith("ASSISTANT:")
    assert torch.equal(loaded(images=[images[0]], text=[text], return_tensors="pt")["input_ids"],
                       vlora_processor(images=[images[0]], text=[text], return_tensors="pt")["input_ids"])
