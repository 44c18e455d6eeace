"""Self-checks of the VLoRA reference fixtures (``tests/fixtures/vlora/``), without the VLoRA model.

The tiny original-format checkpoints are rebuilt with ``tests/original_vlora_format.py`` and must be the
files the original code was run on (hashes recorded in the fixtures' provenance); the fixtures' tensors must
be consistent with the variants (one A/B pair per patched layer and letter, B = Bs x alpha / r, shapes).
"""

import json
import os

import pytest
import torch

import original_vlora_format as ov
from original_vlora_digests import content_digests, file_digests

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures", "vlora")


@pytest.fixture(scope="module")
def reference():
    from safetensors.torch import load_file

    with open(os.path.join(FIXTURES, "reference.json")) as fh:
        data = json.load(fh)
    return data, load_file(os.path.join(FIXTURES, "reference.safetensors"))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("vlora-original"))
    ov.build_all(root)
    return root


def _is_torch_save(rel):
    return rel.endswith(".bin")


def test_rebuilt_checkpoints_are_the_recorded_files(reference, built):
    data, _ = reference
    recorded = data["provenance"]["checkpoints"]
    files = file_digests(built)
    assert sorted(files) == sorted(recorded["files_sha256"])
    # torch.save archives hold pickles whose bytes may change with the torch release: compare their tensors
    # always, their bytes when the torch version is the one the fixtures were made with
    same_torch = torch.__version__.split(".")[:2] == data["provenance"]["torch"].split(".")[:2]
    differ = [rel for rel, h in files.items() if h != recorded["files_sha256"][rel]
              and (same_torch or not _is_torch_save(rel) or rel.endswith("training_args.bin"))]
    assert differ == []
    assert content_digests(built) == recorded["weights_tensor_sha256"]


def test_rebuilt_configs_match_the_recorded_variants(reference, built):
    data, _ = reference
    assert list(data["variants"]) == list(ov.VARIANTS)
    for name, entry in data["variants"].items():
        with open(os.path.join(built, entry["checkpoint_folder"], "config.json")) as fh:
            config = json.load(fh)
        assert config == ov.original_config(name)
        assert {k: config[k] for k in entry["config"]} == entry["config"]
        assert config["model_type"] == "llava_vlora" and config["vlora_pos_num"] == ov.NUM_PATCHES == 576
        assert entry["patched_layers"] == ov.patched_layers(name)
        assert entry["slots"] == ov.slots(name) == len(entry["patched_layers"])
        assert entry["base_llm_folder"] == (ov.BASE_LLM_FOLDER if name == "stage1" else None)


def test_image_and_inputs(reference):
    data, tensors = reference
    assert ov.image_digest(ov.make_test_image()) == data["image"]["sha256"]
    assert list(tensors["pixel_values"].shape) == data["image"]["pixel_values_shape"] == [1, 3, 336, 336]
    assert list(tensors["vision_features"].shape) == [1, ov.NUM_PATCHES, ov.CLIP_CONFIG["hidden_size"]]
    assert all(t.dtype == torch.float32 for t in tensors.values())
    ids, token = data["input_ids"], data["image_token_index"]
    assert token == -200 and ids.count(token) == 1 and ids.index(token) == data["placeholder_index"]
    assert ids[0] == 1 and token not in data["text_only_input_ids"]
    batch = data["batch"]
    rows = (ids, data["text_only_input_ids"])
    width = max(map(len, rows))
    assert batch["left_pads"] == [width - len(r) for r in rows]
    for row, pads, got, mask, pos in zip(rows, batch["left_pads"], batch["input_ids"], batch["attention_mask"],
                                         batch["position_ids_prefill"]):
        assert got == [0] * pads + row and mask == [0] * pads + [1] * len(row)
        assert pos == [1] * pads + list(range(len(row)))


def test_tensor_shapes_and_ab_pairs(reference):
    data, tensors = reference
    vocab, dim = ov.LLAMA_CONFIG["vocab_size"], ov.LLAMA_CONFIG["hidden_size"]
    length, width = len(data["input_ids"]), len(data["batch"]["input_ids"][0])
    seen = {"pixel_values", "vision_features"}
    for name, entry in data["variants"].items():
        v = ov.VARIANTS[name]
        letters = [t for t in "qkvom" if t in v.vlora_type]
        expected_pairs = [[layer, t] for layer in ov.patched_layers(name) for t in letters]
        assert entry["ab_pairs"] == expected_pairs
        for layer, t in expected_pairs:
            for kind in ("A", "B"):
                key = f"{name}.{kind}.{layer}.{t}"
                assert tensors[key].shape == (dim, v.vlora_rank)
                seen.add(key)
        shapes = {f"{name}.logits": (length, vocab), f"{name}.generate_logits": (8, vocab),
                  f"{name}.batch.logits_last8": (2, 8, vocab)}
        if name == "qkvom_s2_sep":
            shapes[f"{name}.batch.logits"] = (2, width, vocab)
        for key, shape in shapes.items():
            assert tensors[key].shape == shape
            seen.add(key)
        assert len(entry["greedy_full_forward"]["tokens"]) == len(entry["generate"]["tokens"]) == 8
        assert all(len(row) == 8 for row in entry["batch"]["generate"]["tokens"])
        assert entry["generate"]["decode_rule_reproduced_tokens"]
        assert entry["batch"]["generate"]["decode_rule_reproduced_tokens"]
        assert entry["generate"]["placeholder_id_in_output"] == 0
    assert seen == set(tensors)
    assert sorted(data["shapes"]) == sorted(tensors)


def test_b_is_the_stored_bs_times_alpha_over_rank(reference):
    """B of layer i, letter t = (alpha / r) * Bs[0, t_index * S + i // s] read row-major as [D, r]."""
    data, tensors = reference
    dim = ov.LLAMA_CONFIG["hidden_size"]
    for name, entry in data["variants"].items():
        v = ov.VARIANTS[name]
        bs = ov.generator_state_dict(name)["model.mm_projector.Bs"]
        scale = (v.vlora_alpha if v.vlora_alpha is not None else v.vlora_rank) / v.vlora_rank
        assert scale == entry["alpha_over_rank"]
        for layer, t in entry["ab_pairs"]:
            row = v.vlora_type.rindex(t) * ov.slots(name) + layer // v.skip_layers
            assert torch.equal(tensors[f"{name}.B.{layer}.{t}"], scale * bs[0, row].reshape(dim, v.vlora_rank))
            assert tensors[f"{name}.B.{layer}.{t}"].abs().sum() > 0


def test_generate_positions_follow_the_decode_rule(reference):
    """Prefill 0..L-1 (placeholder counted), then position t - 1 - pads for an image row, t - pads without."""
    data, _ = reference
    length, width = len(data["input_ids"]), len(data["batch"]["input_ids"][0])
    pads = data["batch"]["left_pads"]
    for entry in data["variants"].values():
        calls = entry["generate"]["position_ids_per_call"]
        assert calls[0] == [list(range(length))]
        assert calls[1:] == [[length + k - 1] for k in range(7)]
        calls = entry["batch"]["generate"]["position_ids_per_call"]
        assert calls[0] == data["batch"]["position_ids_prefill"]
        assert calls[1:] == [[width + k - 1 - pads[0], width + k - pads[1]] for k in range(7)]
