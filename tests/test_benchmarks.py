"""Smoke tests of the benchmark scripts at toy sizes (`--quick`): they run, agree with their references, and write a
CSV with the documented columns, a sidecar JSON describing the machine and a PNG plot (or say why not)."""

import csv
import importlib.util
import json
import math
import os
import sys

import pytest
import torch

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_script(name):
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", os.path.join(BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def have_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(autouse=True)
def _restore_threads():
    """The scripts call torch.set_num_threads (quick mode: 1); give the rest of the session its setting back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def read_csv(path):
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def check_outputs(stem, columns, stdout):
    fieldnames, rows = read_csv(stem + ".csv")
    assert fieldnames == columns
    with open(stem + ".json") as handle:
        meta = json.load(handle)
    assert meta["machine"]["cpu_model"] and meta["machine"]["torch"] == torch.__version__
    assert meta["machine"]["logical_cores"] >= 1
    if have_matplotlib():
        with open(stem + ".png", "rb") as handle:
            assert handle.read(8) == PNG_MAGIC
    else:
        assert "matplotlib not installed, skipping plot" in stdout
        assert not os.path.exists(stem + ".png")
    return rows


def test_projector_benchmark_quick_matches_reference_and_writes_outputs(tmp_path, capsys):
    projector = load_script("projector")
    assert projector.main(["--quick", "--output-dir", str(tmp_path)]) == 0
    rows = check_outputs(str(tmp_path / "projector_quick"), projector.CSV_COLUMNS, capsys.readouterr().out)
    assert [int(row["batch"]) for row in rows] == [1, 2]
    widths = projector.QUICK
    dims = (576, 2, widths["vision_width"], widths["num_levels"], widths["embed_dim"], widths["num_heads"],
            widths["llm_widths"][0])
    reference_gflop = projector.projector_flops(*dims)["total"] / 1e9
    ours_gflop = projector.projector_flops(*dims, absorbed=True)["total"] / 1e9
    for row in rows:
        assert row["reference"] == "mha-reference"
        assert int(row["tokens_out"]) == 144
        assert float(row["max_abs_diff"]) <= 1e-5 < float(row["max_abs_output"])
        assert math.isclose(float(row["reference_gflop_per_image"]), reference_gflop)
        assert math.isclose(float(row["ours_gflop_per_image"]), ours_gflop) and ours_gflop < reference_gflop
        for key in ("ours_ms", "reference_ms", "speed_ratio_reference_over_ours", "ours_gflops", "matmul_gflops"):
            assert math.isfinite(float(row[key])) and float(row[key]) > 0
    if have_matplotlib():  # the plot can be redrawn from the CSV and JSON alone
        os.remove(tmp_path / "projector_quick.png")
        assert projector.main(["--quick", "--replot", "--output-dir", str(tmp_path)]) == 0
        assert (tmp_path / "projector_quick.png").read_bytes()[:8] == PNG_MAGIC


def test_projector_flop_count_for_clip_l_336():
    """Written out for x [576, 1024], multi-level [576, 4096], width 1024, 8 heads, LLM 4096, scale 2 (144 queries):
    the original's algorithm, and ours with the key/value projections absorbed into the queries."""
    flops = load_script("projector").projector_flops(576, 2, 1024, 4, 1024, 8, 4096)
    absorbed = load_script("projector").projector_flops(576, 2, 1024, 4, 1024, 8, 4096, absorbed=True)
    key_value = 2 * (2 * 576 * 4096 * 1024 + 2 * 576 * 1024 * 1024)
    query = 2 * 144 * 1024 * 1024
    in_out_projections = 2 * 144 * 1024 * 1024 * 2 + 2 * 576 * 1024 * 1024 * 2
    products = 2 * (2 * 144 * 4 * 1024)
    output_mlp = 2 * 144 * 1024 * 4096 + 2 * 144 * 4096 * 4096
    assert flops["total"] == key_value + query + in_out_projections + products + output_mlp
    assert round(flops["total"] / 1e9, 2) == 21.44
    absorbed_projections = 2 * 144 * 1024 * 1024 * 4  # q and out as before; k and v once per query
    absorbed_products = 8 * products  # every head scores and pools over the full width
    assert absorbed["total"] == key_value + query + absorbed_projections + absorbed_products + output_mlp
    assert round(absorbed["total"] / 1e9, 2) == 19.65


def test_projector_reference_layout_equals_ours_for_every_scale():
    """The stand-in for the original (nn.MultiheadAttention, sequence-first, regions folded into the batch) loads our
    weights under the original's names and gives our outputs: the benchmark compares like with like."""
    projector = load_script("projector")
    widths = projector.QUICK
    for scale_factor in (2, 3, 4):
        ours, reference = projector.build_pair(widths, scale_factor, 48, None, "cpu", torch.float32, seed=3)
        x = torch.randn(2, 576, widths["vision_width"])
        multi = torch.randn(2, 576, widths["vision_width"] * widths["num_levels"])
        with torch.no_grad():
            torch.testing.assert_close(ours(x, multi), reference(x, multi), atol=1e-5, rtol=0)
    state = projector.original_state_dict(ours)
    assert len(state) == 23  # the original checkpoint's projector tensors


def test_projector_original_repo_needs_real_widths_and_an_existing_builder(tmp_path):
    projector = load_script("projector")
    with pytest.raises(SystemExit):
        projector.main(["--quick", "--original-repo", str(tmp_path), "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="builder.py"):
        projector.load_original_class(str(tmp_path))


def test_cpu_clock_refused_with_several_threads(tmp_path):
    projector = load_script("projector")
    with pytest.raises(SystemExit, match="--threads 1"):
        projector.main(["--quick", "--threads", "2", "--clock", "cpu", "--output-dir", str(tmp_path)])


def test_end_to_end_benchmark_quick_writes_all_variants(tmp_path, capsys):
    end_to_end = load_script("end_to_end")
    assert end_to_end.main(["--quick", "--output-dir", str(tmp_path)]) == 0
    rows = check_outputs(str(tmp_path / "end_to_end_quick"), end_to_end.CSV_COLUMNS, capsys.readouterr().out)
    by_name = {row["variant"]: row for row in rows}
    assert list(by_name) == ["mlp2x_gelu", "llava_native", "tokenpacker_s2", "tokenpacker_s3", "tokenpacker_s4",
                             "vlora"]
    assert by_name["llava_native"]["model_class"] == "LlavaForConditionalGeneration"
    assert by_name["vlora"]["model_class"] == "VLoRAForConditionalGeneration"
    tokens = {name: int(row["image_tokens"]) for name, row in by_name.items()}
    assert tokens == {"mlp2x_gelu": 576, "llava_native": 576, "tokenpacker_s2": 144, "tokenpacker_s3": 64,
                      "tokenpacker_s4": 36, "vlora": 1}
    text_tokens = {int(row["prompt_tokens"]) - int(row["image_tokens"]) for row in rows}
    assert len(text_tokens) == 1  # the same question everywhere
    # identical tower, projector and language model: the native LLaVA model gives the baseline's logits
    assert float(by_name["llava_native"]["max_abs_logit_diff_vs_mlp2x"]) <= 1e-4
    dims = end_to_end.SIZES["quick"]["text"]
    head_dim = dims["hidden_size"] // dims["num_attention_heads"]
    limits = []
    for name in ("tokenpacker_s2", "tokenpacker_s3", "tokenpacker_s4"):
        row = by_name[name]
        assert int(row["kv_cache_bytes_per_image"]) == (
            2 * dims["num_hidden_layers"] * dims["num_key_value_heads"] * head_dim * tokens[name] * 4)
        assert int(row["kv_cache_bytes_per_image_vicuna7b_fp16"]) == 2 * 32 * 32 * 128 * tokens[name] * 2
        lm_ratio, total_ratio = float(row["analytic_lm_prefill_ratio"]), float(row["analytic_total_prefill_ratio"])
        assert 1 < total_ratio < lm_ratio
        limits.append(lm_ratio)
        for key in ("ttft_ms", "prefill_speedup_vs_mlp2x", "decode_tokens_per_s", "decode_ratio_vs_mlp2x"):
            assert math.isfinite(float(row[key])) and float(row[key]) > 0
    assert limits == sorted(limits)
    vlora = by_name["vlora"]
    assert float(vlora["analytic_lm_prefill_ratio"]) > limits[-1]  # no visual tokens: the largest LM-only limit
    assert int(vlora["per_image_state_values"]) > 0 and float(vlora["visual_params_m"]) > 0
    assert int(vlora["kv_cache_bytes_per_image_vicuna7b_fp16"]) == 2 * 32 * 32 * 128 * 1 * 2
    if have_matplotlib():
        os.remove(tmp_path / "end_to_end_quick.png")
        assert end_to_end.main(["--quick", "--replot", "--output-dir", str(tmp_path)]) == 0
        assert (tmp_path / "end_to_end_quick.png").read_bytes()[:8] == PNG_MAGIC


def test_end_to_end_benchmark_batches_copies_of_the_prompt(tmp_path, capsys):
    end_to_end = load_script("end_to_end")
    args = ["--quick", "--batch-size", "2", "--scale-factors", "2", "--output-dir", str(tmp_path)]
    assert end_to_end.main(args) == 0
    rows = check_outputs(str(tmp_path / "end_to_end_b2_quick"), end_to_end.CSV_COLUMNS, capsys.readouterr().out)
    assert [row["variant"] for row in rows] == ["mlp2x_gelu", "llava_native", "tokenpacker_s2", "vlora"]
    assert {row["batch_size"] for row in rows} == {"2"}
    assert float(rows[1]["max_abs_logit_diff_vs_mlp2x"]) <= 1e-4
    assert not (tmp_path / "end_to_end_quick.csv").exists()
    inputs = end_to_end.prepare_inputs(end_to_end.build_tiny_tokenizer(), 144, "cpu", torch.float32, batch_size=3)
    assert inputs["input_ids"].shape[0] == 3 and inputs["pixel_values"].shape[0] == 3
    assert torch.equal(inputs["input_ids"][0], inputs["input_ids"][2])


def test_vlora_costs_at_release_settings_match_the_original_counts():
    """The facts measured on the original (shared/original-vlora.md §11): 851.9 M generator parameters, 38.2 GFLOP
    per image, 41.9 MFLOP of deltas per text token, 10.5 M A values per image."""
    load_script("end_to_end")  # puts benchmarks/ on the path
    import vlora_bench
    from modeling_tokenpacker import VLoRAConfig, VLoRAPerceptualWeightsGenerator

    config = VLoRAConfig()
    with torch.device("meta"):
        generator = VLoRAPerceptualWeightsGenerator(config)
    assert round(sum(param.numel() for param in generator.parameters()) / 1e6, 1) == 851.9
    assert round(vlora_bench.generator_flops(config) / 1e9, 1) == 38.2
    assert round(vlora_bench.delta_flops_per_token(config) / 1e6, 1) == 41.9
    assert round(vlora_bench.perceptual_weight_values(config) / 1e6, 1) == 10.5


def test_language_model_prefill_flops_count_causal_attention_and_one_logits_row():
    end_to_end = load_script("end_to_end")
    text = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2,
            "num_key_value_heads": 1, "vocab_size": 10}
    tokens = 5
    linear = 8 * 8 + 2 * 8 * 4 + 8 * 8 + 3 * 8 * 16  # q, k and v (one kv head of 4), o, gate/up/down
    attention = 2 * 2 * 8 * (1 + 2 + 3 + 4 + 5)  # q.k and weights.v over the causal triangle
    assert end_to_end.lm_prefill_flops(text, tokens) == 3 * (2 * tokens * linear + attention) + 2 * 8 * 10


def test_plot_is_skipped_with_a_clear_message_without_matplotlib(tmp_path, capsys, monkeypatch):
    projector = load_script("projector")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert projector.main(["--quick", "--batch-sizes", "1", "--output-dir", str(tmp_path)]) == 0
    assert "matplotlib not installed, skipping plot" in capsys.readouterr().out
    assert (tmp_path / "projector_quick.csv").exists()
    assert not (tmp_path / "projector_quick.png").exists()
