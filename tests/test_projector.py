"""The projector against an independent float64 reference written from the paper's / original's formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from modeling_tokenpacker import TokenPackerConfig, TokenPackerProjector
from modeling_tokenpacker.modeling_tokenpacker_projector import TokenPackerMLP, TokenPackerRegionAttention, build_projector

VISION_WIDTH, NUM_LEVELS, EMBED_DIM, NUM_HEADS, LLM_WIDTH = 16, 4, 32, 4, 24


def make_config(image_size=336, patch_size=14, scale_factor=2, projector_type="tokenpacker"):
    return TokenPackerConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": VISION_WIDTH,
            "intermediate_size": 32,
            "num_hidden_layers": 24,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": patch_size,
        },
        text_config={"model_type": "llama", "hidden_size": LLM_WIDTH, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "intermediate_size": 32, "vocab_size": 64},
        projector_type=projector_type,
        scale_factor=scale_factor,
        projector_hidden_size=EMBED_DIM,
        projector_num_heads=NUM_HEADS,
    )


def randomize(module, seed=0):
    """Every weight random with fan-in scale, every bias and norm gain non-trivial (a dropped term shows)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters()):
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 2:
                param.copy_(noise / math.sqrt(param.shape[1]))
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.2 * noise)
            else:
                param.copy_(0.1 * noise)
    return module


def bilinear_downsample_reference(grid, out_size):
    """`[g, g, C]` float64 -> `[n, n, C]`: bilinear, align_corners=False, written out (half-pixel centres)."""
    size = grid.shape[0]
    scale = size / out_size

    def taps(index):
        source = max((index + 0.5) * scale - 0.5, 0.0)
        low = int(math.floor(source))
        high = min(low + 1, size - 1)
        return low, high, source - low

    out = torch.zeros(out_size, out_size, grid.shape[-1], dtype=torch.float64)
    for i in range(out_size):
        r0, r1, wr = taps(i)
        for j in range(out_size):
            c0, c1, wc = taps(j)
            out[i, j] = ((1 - wr) * (1 - wc) * grid[r0, c0] + (1 - wr) * wc * grid[r0, c1]
                         + wr * (1 - wc) * grid[r1, c0] + wr * wc * grid[r1, c1])
    return out


def layer_norm_reference(x, norm):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight.double() + norm.bias.double()


def mlp_reference(x, mlp):
    hidden = x @ mlp.linear_1.weight.double().T + mlp.linear_1.bias.double()
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))  # exact GELU
    return hidden @ mlp.linear_2.weight.double().T + mlp.linear_2.bias.double()


def projector_reference(projector, image_features, region_features):
    """One image at a time, one region at a time, `nn.MultiheadAttention` maths written out, all in float64."""
    s = projector.scale_factor
    grid_size = projector.grid_size
    n = grid_size // s
    attention = projector.attention
    heads, head_dim = attention.num_heads, attention.head_dim
    outputs = []
    for x, x_multi in zip(image_features.double(), region_features.double()):
        key = layer_norm_reference(mlp_reference(x_multi, projector.key_mlp), projector.key_norm)
        value = layer_norm_reference(mlp_reference(x_multi, projector.value_mlp), projector.value_norm)
        points = bilinear_downsample_reference(x.reshape(grid_size, grid_size, -1), n).reshape(n * n, -1)
        query = layer_norm_reference(points @ projector.query_proj.weight.double().T, projector.query_norm)
        rows = []
        for i in range(n):
            for j in range(n):
                region = [r * grid_size + c for r in range(i * s, i * s + s) for c in range(j * s, j * s + s)]
                q = query[i * n + j] @ attention.q_proj.weight.double().T + attention.q_proj.bias.double()
                k = key[region] @ attention.k_proj.weight.double().T + attention.k_proj.bias.double()
                v = value[region] @ attention.v_proj.weight.double().T + attention.v_proj.bias.double()
                head_outputs = []
                for h in range(heads):
                    part = slice(h * head_dim, (h + 1) * head_dim)
                    weights = torch.softmax(k[:, part] @ q[part] / math.sqrt(head_dim), dim=0)
                    head_outputs.append(weights @ v[:, part])
                attended = torch.cat(head_outputs)
                rows.append(attended @ attention.out_proj.weight.double().T + attention.out_proj.bias.double())
        outputs.append(mlp_reference(torch.stack(rows), projector.output_mlp))
    return torch.stack(outputs)


def random_inputs(config, batch, seed=1):
    generator = torch.Generator().manual_seed(seed)
    tokens = config.grid_size**2
    image_features = torch.randn(batch, tokens, VISION_WIDTH, generator=generator)
    region_features = torch.randn(batch, tokens, VISION_WIDTH * NUM_LEVELS, generator=generator)
    return image_features, region_features


@pytest.mark.parametrize(
    "image_size, patch_size, scale_factor",
    [(336, 14, 2), (336, 14, 3), (336, 14, 4), (224, 14, 4), (168, 14, 3), (160, 16, 5)],
    ids=["grid24-s2", "grid24-s3", "grid24-s4", "grid16-s4", "grid12-s3", "grid10-s5"],
)
def test_projector_matches_float64_reference_within_1e5(image_size, patch_size, scale_factor):
    config = make_config(image_size, patch_size, scale_factor)
    projector = randomize(TokenPackerProjector(config)).eval()
    image_features, region_features = random_inputs(config, batch=2)
    with torch.no_grad():
        ours = projector(image_features, region_features)
    reference = projector_reference(projector, image_features, region_features)
    grid_tokens = (config.grid_size // scale_factor) ** 2
    assert ours.shape == (2, grid_tokens, LLM_WIDTH)
    assert ours.dtype == torch.float32
    assert (ours.double() - reference).abs().max().item() <= 1e-5


def test_point_queries_follow_the_integer_factor_facts():
    """s=2: mean of each 2x2 block; s=3: centre of each 3x3 block; s=4: mean of the central 2x2 of each 4x4 block."""
    x = torch.randn(1, 24 * 24, VISION_WIDTH)
    grid = x.reshape(24, 24, VISION_WIDTH)
    expected = {
        2: grid.reshape(12, 2, 12, 2, -1).mean((1, 3)),
        3: grid[1::3, 1::3],
        4: grid.reshape(6, 4, 6, 4, -1)[:, 1:3, :, 1:3].mean((1, 3)),
    }
    for s, target in expected.items():
        points = TokenPackerProjector(make_config(scale_factor=s)).point_queries(x)
        torch.testing.assert_close(points.reshape(target.shape), target, atol=1e-6, rtol=0)


def test_point_queries_interpolate_in_float32_and_return_input_dtype():
    projector = TokenPackerProjector(make_config(scale_factor=3))
    x = torch.randn(1, 24 * 24, VISION_WIDTH).to(torch.bfloat16)
    points = projector.point_queries(x)
    assert points.dtype == torch.bfloat16
    expected = F.interpolate(x.float().reshape(1, 24, 24, -1).permute(0, 3, 1, 2), size=(8, 8), mode="bilinear")
    assert torch.equal(points, expected.permute(0, 2, 3, 1).reshape(1, 64, -1).to(torch.bfloat16))


def test_region_attention_equals_torch_multihead_attention_applied_like_the_original():
    """Our split q/k/v projections with SDPA equal nn.MultiheadAttention with the packed weights, each query
    attending to its own s*s keys as one sequence (the original's layout: sequence-first, regions in the batch)."""
    config = make_config(scale_factor=3)
    projector = randomize(TokenPackerProjector(config)).eval()
    attention = projector.attention
    mha = torch.nn.MultiheadAttention(EMBED_DIM, NUM_HEADS)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([attention.q_proj.bias, attention.k_proj.bias, attention.v_proj.bias]))
        mha.out_proj.weight.copy_(attention.out_proj.weight)
        mha.out_proj.bias.copy_(attention.out_proj.bias)
    query = torch.randn(2, 64, EMBED_DIM)
    key, value = torch.randn(2, 64, 9, EMBED_DIM), torch.randn(2, 64, 9, EMBED_DIM)
    with torch.no_grad():
        ours = attention(query, key, value)
        theirs = mha(query.reshape(1, -1, EMBED_DIM), key.reshape(-1, 9, EMBED_DIM).transpose(0, 1),
                     value.reshape(-1, 9, EMBED_DIM).transpose(0, 1))[0]
    torch.testing.assert_close(ours, theirs.reshape(2, 64, EMBED_DIM), atol=1e-5, rtol=0)


@pytest.mark.parametrize("region", [4, 9, 16, 25])
def test_absorbed_attention_equals_projected_attention_and_has_the_same_gradients(region):
    """Moving the key/value projections onto the single query of each region is exact (float64 round-off), and
    training through it gives every weight the same gradient (the key bias's is zero up to round-off in both, but it
    must exist: DDP fails on parameters left out of the graph)."""
    attention = randomize(TokenPackerRegionAttention(EMBED_DIM, NUM_HEADS)).double()
    generator = torch.Generator().manual_seed(region)
    query = torch.randn(2, 6, EMBED_DIM, generator=generator, dtype=torch.float64)
    key, value = (torch.randn(2, 6, region, EMBED_DIM, generator=generator, dtype=torch.float64) for _ in range(2))
    outputs, gradients = [], []
    for path in (attention.absorbed_attention, attention.projected_attention):
        attention.zero_grad()
        out = attention.out_proj(path(query, key, value))
        out.pow(2).sum().backward()
        outputs.append(out.detach())
        gradients.append({name: param.grad.clone() for name, param in attention.named_parameters()})
    assert (outputs[0] - outputs[1]).abs().max().item() <= 1e-12
    assert gradients[0].keys() == gradients[1].keys()
    for name in gradients[0]:
        assert (gradients[0][name] - gradients[1][name]).abs().max().item() <= 1e-10, name


class RecordingLinear(torch.nn.Linear):
    """A subclass, as bitsandbytes' quantized layers are: its weight may not be a plain matrix, so it is only called."""

    calls = 0

    def forward(self, x):
        RecordingLinear.calls += 1
        return super().forward(x)


def test_wrapped_or_hooked_key_value_projections_are_called_not_read():
    """A hook, a nn.Linear subclass or a weight on the meta device sends attention through the modules themselves
    (the path PEFT adapters, quantized layers and accelerate offloading need), with the same result."""
    attention = randomize(TokenPackerRegionAttention(EMBED_DIM, NUM_HEADS)).eval()
    query, key, value = torch.randn(1, 4, EMBED_DIM), torch.randn(1, 4, 9, EMBED_DIM), torch.randn(1, 4, 9, EMBED_DIM)
    assert attention.projections_can_be_absorbed()
    with torch.no_grad():
        expected = attention(query, key, value)
    seen = []
    handle = attention.k_proj.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    assert not attention.projections_can_be_absorbed()
    with torch.no_grad():
        torch.testing.assert_close(attention(query, key, value), expected, atol=1e-5, rtol=0)
    assert seen == [(1, 4, 9, EMBED_DIM)]
    handle.remove()
    plain_v_proj = attention.v_proj
    RecordingLinear.calls = 0
    attention.v_proj = RecordingLinear(EMBED_DIM, EMBED_DIM)
    attention.v_proj.load_state_dict(plain_v_proj.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(attention(query, key, value), expected, atol=1e-5, rtol=0)
    assert RecordingLinear.calls == 1
    with torch.device("meta"):
        attention.v_proj = torch.nn.Linear(EMBED_DIM, EMBED_DIM)
    assert not attention.projections_can_be_absorbed()


def test_lora_on_the_projector_attention_is_applied_and_merges_into_the_fast_path():
    """PEFT replaces k_proj/v_proj with adapter layers: the adapters must act (projected path), and after merging
    them into plain nn.Linear layers the absorbed path gives the same output."""
    peft = pytest.importorskip("peft")
    config = make_config(scale_factor=3)
    projector = randomize(TokenPackerProjector(config)).eval()
    image_features, region_features = random_inputs(config, batch=1)
    with torch.no_grad():
        base = projector(image_features, region_features)
    lora_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["attention.k_proj", "attention.v_proj"],
                                  init_lora_weights=False)
    adapted = peft.get_peft_model(projector, lora_config).eval()
    inner = adapted.base_model.model.attention
    assert not inner.projections_can_be_absorbed()
    with torch.no_grad():
        with_lora = adapted(image_features, region_features)
    assert (with_lora - base).abs().max().item() > 1e-3
    merged = adapted.merge_and_unload()
    assert merged.attention.projections_can_be_absorbed()
    with torch.no_grad():
        torch.testing.assert_close(merged(image_features, region_features), with_lora, atol=1e-5, rtol=0)


def test_projector_treats_each_image_of_a_batch_independently():
    config = make_config(scale_factor=2)
    projector = randomize(TokenPackerProjector(config)).eval()
    image_features, region_features = random_inputs(config, batch=3)
    with torch.no_grad():
        batched = projector(image_features, region_features)
        alone = torch.cat([projector(image_features[i : i + 1], region_features[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, alone, atol=1e-6, rtol=0)


def test_mlp2x_gelu_projector_is_llava_15_mlp_keeping_every_patch():
    config = make_config(projector_type="mlp2x_gelu")
    projector = randomize(build_projector(config)).eval()
    assert isinstance(projector, TokenPackerMLP)
    assert config.image_seq_length == 576
    x = torch.randn(2, 576, VISION_WIDTH)
    with torch.no_grad():
        ours = projector(x)
    torch.testing.assert_close(ours.double(), mlp_reference(x.double(), projector), atol=1e-5, rtol=0)


def test_projector_takes_widths_from_the_configs():
    config = make_config(scale_factor=4)
    projector = TokenPackerProjector(config)
    assert projector.query_proj.in_features == VISION_WIDTH
    assert projector.key_mlp.linear_1.in_features == VISION_WIDTH * len(config.region_feature_layers)
    assert projector.attention.num_heads == NUM_HEADS
    assert projector.output_mlp.linear_2.out_features == LLM_WIDTH
