"""TRL's SFTTrainer on our model and processor for vision-language conversations, with assistant-only loss (the
vicuna_v1 template's {% generation %} markers): the labels are exactly the replies and their </s>."""

import pytest
import transformers
from packaging.version import Version

from modeling_tokenpacker.demo import build_tiny_model, synthesize_image

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


@pytest.mark.skipif(Version(transformers.__version__) < Version("5.18"),
                    reason="TRL's assistant-only loss for vision data needs transformers >= 5.18")
def test_sft_trainer_trains_on_the_assistant_replies_only(tmp_path, tokenizer, processor):
    model = build_tiny_model(tokenizer, seed=4).train()
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
                    {"role": "user", "content": [{"type": "text", "text": "And the rest?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "A gradient."}]}]
    dataset = datasets.Dataset.from_dict({"messages": [conversation] * 4, "images": [[synthesize_image(64, 48)]] * 4})
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, use_cpu=True,
                         assistant_only_loss=True, report_to=[], save_strategy="no", max_length=None)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
    batch = trainer.data_collator([dataset[0], dataset[1]])
    supervised = batch["input_ids"][0][batch["labels"][0] != -100]
    assert processor.tokenizer.decode(supervised).replace(" ", "") == "Aredcircle.</s>Agradient.</s>"
    assert (batch["input_ids"][0] == processor.image_token_id).sum() == processor.image_seq_length
    result = trainer.train()
    assert result.training_loss == result.training_loss and result.global_step == 2  # finite, both steps ran
