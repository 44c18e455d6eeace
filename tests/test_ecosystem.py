"""What notebooks and pipelines expect: device_map and offload, pipelines, PEFT, streaming, push_to_hub."""

import os
import re
import shutil
import threading

import huggingface_hub
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, TextIteratorStreamer, TextStreamer, pipeline

PROMPT = "USER: <image>\nWhat is in the image? ASSISTANT:"


@pytest.fixture(scope="module")
def inputs(processor, images):
    return processor(images=[images[0]], text=[PROMPT], return_tensors="pt")


@pytest.fixture(scope="module")
def expected_tokens(tiny_model, inputs):
    with torch.no_grad():
        return tiny_model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False).tolist()


def test_device_map_auto_loads_and_generates_the_same_tokens(checkpoint, inputs, expected_tokens):
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, trust_remote_code=True, device_map="auto")
    # a single-device map may leave no hf_device_map behind; every placement must be a real device
    assert set(getattr(model, "hf_device_map", {"": "cpu"}).values()) <= {"cpu", 0, "cuda:0"}
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert output.tolist() == expected_tokens


def test_max_memory_split_offloads_to_disk_and_generates_the_same_tokens(tmp_path, checkpoint, inputs, expected_tokens):
    model = AutoModelForImageTextToText.from_pretrained(
        checkpoint, trust_remote_code=True, device_map="auto", max_memory={"cpu": "1MB"},
        offload_folder=str(tmp_path / "offload"),
    )
    placements = set(model.hf_device_map.values())
    assert "disk" in placements and "cpu" in placements, model.hf_device_map
    for name in model.hf_device_map:
        # the projector and every transformer block stay whole: the map never names a part of one
        assert not name.startswith("model.multi_modal_projector."), name
        assert not re.search(r"\.layers\.\d+\.", name), name
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert output.tolist() == expected_tokens


def test_pipeline_answers_chat_messages_and_plain_prompts(checkpoint, images):
    pipe = pipeline("image-text-to-text", model=str(checkpoint), trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": images[0]},
                                             {"type": "text", "text": "What is in the image?"}]}]
    chat = pipe(text=messages, max_new_tokens=4, return_full_text=False)
    plain = pipe(images=images[0], text=PROMPT, max_new_tokens=4, return_full_text=False, do_sample=False)
    assert isinstance(chat[0]["generated_text"], str)
    assert isinstance(plain[0]["generated_text"], str)
    # the chat template renders exactly this prompt (vicuna_v1), so both paths see the same tokens
    model, processor = pipe.model, pipe.processor
    rendered = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=[images[0]], text=[rendered], return_tensors="pt")
    with torch.no_grad():
        direct = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    text = processor.batch_decode(direct[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    assert chat[0]["generated_text"] == text


def test_streamers_receive_the_generated_text(tiny_model, processor, inputs, expected_tokens, capsys):
    expected_text = processor.decode(expected_tokens[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    iterator = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False, streamer=iterator)
    thread = threading.Thread(target=tiny_model.generate, kwargs=kwargs)
    thread.start()
    streamed = "".join(iterator)
    thread.join()
    assert streamed.strip() == expected_text.strip()
    tiny_model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                        streamer=TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True))
    assert capsys.readouterr().out.strip() == expected_text.strip()


def test_freezing_the_vision_tower_is_one_line_and_leaves_it_unchanged_by_training(tokenizer, processor, images):
    from modeling_tokenpacker.demo import build_tiny_model

    model = build_tiny_model(tokenizer, seed=5).train()
    model.vision_tower.requires_grad_(False)  # the documented one-liner
    before = {k: v.clone() for k, v in model.vision_tower.state_dict().items()}
    inputs = processor(images=[images[0]], text=[PROMPT], return_tensors="pt")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in model.vision_tower.state_dict().items())
    assert any(p.grad is not None for p in model.multi_modal_projector.parameters())


def test_peft_lora_on_the_language_model_trains_saves_reloads_and_merges(tmp_path, tokenizer, processor, images):
    peft = pytest.importorskip("peft")
    from modeling_tokenpacker.demo import build_tiny_model

    model = build_tiny_model(tokenizer, seed=7)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)",
                             init_lora_weights=False)
    lora = peft.get_peft_model(model, config)
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert names and all(".language_model." in n and "lora_" in n for n in names)

    inputs = processor(images=[images[0]], text=[PROMPT], return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    lora.train()
    loss = lora(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    optimizer.step()
    lora.eval()
    with torch.no_grad():
        adapted = lora(**inputs).logits
    lora.save_pretrained(tmp_path / "adapter")

    base = build_tiny_model(tokenizer, seed=7)
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, adapted, atol=1e-5, rtol=0)
        merged = reloaded.merge_and_unload()
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(**inputs).logits, adapted, atol=1e-4, rtol=0)


class FakeHub:
    """Stands in for the Hub at the huggingface_hub boundary: records repos and the files committed to them."""

    def __init__(self, root):
        self.root = root
        self.repos = {}

    def create_repo(self, repo_id, *args, private=None, exist_ok=False, **kwargs):
        self.repos.setdefault(repo_id, {"private": private})
        (self.root / repo_id).mkdir(parents=True, exist_ok=True)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, *args, **kwargs):
        for operation in operations:
            target = self.root / repo_id / operation.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            source = operation.path_or_fileobj
            if isinstance(source, (str, os.PathLike)):
                shutil.copyfile(source, target)
            elif isinstance(source, bytes):
                target.write_bytes(source)
            else:
                target.write_bytes(source.read())
        return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/0", commit_message="",
                                          commit_description="", oid="0" * 40)

    def file_exists(self, repo_id, filename, *args, **kwargs):
        return (self.root / repo_id / filename).is_file()

    def upload_file(self, *args, path_or_fileobj=None, path_in_repo=None, repo_id=None, **kwargs):
        (self.root / repo_id / path_in_repo).write_bytes(path_or_fileobj)

    def load_card(self, repo_id, *args, **kwargs):
        path = self.root / repo_id / "README.md"
        if not path.is_file():
            raise huggingface_hub.errors.EntryNotFoundError(f"no README.md in {repo_id}")
        return huggingface_hub.ModelCard(path.read_text())

    def upload_folder(self, *args, repo_id=None, folder_path=None, **kwargs):
        shutil.copytree(folder_path, self.root / repo_id, dirs_exist_ok=True)
        return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/0", commit_message="",
                                          commit_description="", oid="0" * 40)


def test_push_to_hub_sends_a_self_contained_repo(tmp_path, monkeypatch, tiny_model, processor, inputs, expected_tokens):
    hub = FakeHub(tmp_path / "hub")
    for name in ("create_repo", "create_commit", "upload_folder", "file_exists", "upload_file"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, lambda self, *a, _f=getattr(hub, name), **k: _f(*a, **k))
        monkeypatch.setattr(huggingface_hub, name, getattr(hub, name), raising=False)
    monkeypatch.setattr(huggingface_hub.ModelCard, "load", classmethod(lambda cls, *a, **k: hub.load_card(*a, **k)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    tiny_model.push_to_hub("someone/tiny_tokenpacker", private=True)
    processor.push_to_hub("someone/tiny_tokenpacker", private=True)

    sent = tmp_path / "hub" / "someone" / "tiny_tokenpacker"
    files = {p.name for p in sent.iterdir()}
    assert {"config.json", "configuration_tokenpacker.py", "modeling_tokenpacker.py", "processing_tokenpacker.py",
            "image_processing_tokenpacker.py", "preprocessor_config.json", "tokenizer_config.json",
            "chat_template.json", "README.md"} <= files, files
    assert any(name.endswith(".safetensors") for name in files)
    card = huggingface_hub.ModelCard((sent / "README.md").read_text())  # ours, kept and tagged by transformers
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-text-to-text"
    assert "arxiv.org/abs/2407.02392" in card.text and 'repo = "someone/tiny_tokenpacker"' in card.text

    model = AutoModelForImageTextToText.from_pretrained(sent, trust_remote_code=True)
    loaded_processor = AutoProcessor.from_pretrained(sent, trust_remote_code=True)
    assert loaded_processor.chat_template == processor.chat_template
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert output.tolist() == expected_tokens


def test_push_to_hub_gives_a_new_repository_the_tokenpacker_model_card(tiny_model, monkeypatch):
    import transformers.utils.hub as transformers_hub
    from huggingface_hub import ModelCard

    uploads, pushed = [], []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            return type("Url", (), {"repo_id": repo_id})()

        def file_exists(self, repo_id, filename):
            return False

        def upload_file(self, path_or_fileobj, path_in_repo, repo_id, commit_message):
            uploads.append((path_in_repo, path_or_fileobj.decode()))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(transformers_hub.PushToHubMixin, "push_to_hub",
                        lambda self, repo_id, *args, **kwargs: pushed.append(repo_id))
    tiny_model.push_to_hub("someone/tokenpacker-tiny")
    assert pushed == ["someone/tokenpacker-tiny"] and [name for name, _ in uploads] == ["README.md"]
    card = ModelCard(uploads[0][1])
    assert card.data.pipeline_tag == "image-text-to-text" and "tokenpacker" in card.data.tags
    assert 'repo = "someone/tokenpacker-tiny"' in card.text and "tokenize=True, return_dict=True" in card.text
