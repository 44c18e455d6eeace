"""VLoRA's perceptual weights generator: image features -> per-image low-rank factors A for chosen linear maps of the
language model, with learned factors B shared by all images.

Shipped inside checkpoints as remote code with modeling_vlora.py (imports only torch).

Symbols: `C` vision width, `P` feature rows (576 patches), `d` generator width, `r` rank, `T` target letters, `S`
patched layers (slots per letter).
"""

import torch
import torch.nn.functional as F
from torch import nn


class VLoRAAttention(nn.Module):
    """Multi-head attention with biased q/k/v/out projections and no mask (`torch.nn.MultiheadAttention`'s math,
    separate projections instead of its packed `in_proj`), through `scaled_dot_product_attention`."""

    def __init__(self, width, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, query, key_value):
        """query `[B, k, d]`, key_value `[B, P, d]` -> `[B, k, d]`."""
        batch, length, width = query.shape
        split = lambda x: x.reshape(batch, x.shape[1], self.num_heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(query)), split(self.k_proj(key_value)), split(self.v_proj(key_value))
        attended = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(attended.transpose(1, 2).reshape(batch, length, width))


class VLoRAGeneratorBlock(nn.Module):
    """A pre-norm decoder block over the queries: self-attention among them, cross-attention to the image features
    (keys and values, not normalised), then an MLP with exact GELU; each with a residual."""

    def __init__(self, width, num_heads, mlp_ratio, eps):
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(width, eps=eps)
        self.self_attn = VLoRAAttention(width, num_heads)
        self.cross_attn_layer_norm = nn.LayerNorm(width, eps=eps)
        self.cross_attn = VLoRAAttention(width, num_heads)
        self.final_layer_norm = nn.LayerNorm(width, eps=eps)
        self.fc1 = nn.Linear(width, mlp_ratio * width)
        self.fc2 = nn.Linear(mlp_ratio * width, width)

    def forward(self, queries, features):
        """queries `[B, k, d]`, features `[B, P, d]` -> `[B, k, d]`."""
        normed = self.self_attn_layer_norm(queries)
        queries = queries + self.self_attn(normed, normed)
        queries = queries + self.cross_attn(self.cross_attn_layer_norm(queries), features)
        return queries + self.fc2(F.gelu(self.fc1(self.final_layer_norm(queries))))


class VLoRASubGenerator(nn.Module):
    """`k` learned queries, `N` blocks, a LayerNorm and a head that writes one flattened `[in, r]` factor A per
    query: features `[B, P, d]` -> `[B, k, in * r]`."""

    def __init__(self, num_queries, width, num_layers, num_heads, mlp_ratio, eps, out_features):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, width))  # std 1, as the original initialises them
        self.layers = nn.ModuleList(VLoRAGeneratorBlock(width, num_heads, mlp_ratio, eps) for _ in range(num_layers))
        self.norm = nn.LayerNorm(width, eps=eps)
        self.weights_head = nn.Linear(width, out_features)

    def forward(self, features):
        queries = self.queries.unsqueeze(0).expand(features.shape[0], -1, -1)
        for layer in self.layers:
            queries = layer(queries, features)
        return self.weights_head(self.norm(queries))


class VLoRAPerceptualWeightsGenerator(nn.Module):
    """Image features -> the perceptual weights: for every patched layer and target letter a per-image A `[B, in, r]`
    and a shared B `[out, r]` (already scaled by `alpha / r`), so the map gets `+ x A Bᵀ`.

    `visual_proj` maps the features to the generator's width and adds `position_embedding` `[P, d]`; the sum is the
    keys and values of every block. With `separate_generators` each letter has its own sub-generator of `S` queries;
    otherwise one sub-generator has `T * S` queries, row `t * S + j` for letter `t`, slot `j`. Each row is read
    row-major as an `[in, r]` matrix. `lora_B[letter]` `[S, out, r]` starts at zero (LoRA's convention), so an
    untrained generator leaves the language model as it is.
    """

    def __init__(self, config):
        super().__init__()
        self.targets = config.delta_targets
        self.num_slots = config.num_slots
        self.rank = config.lora_rank
        self.scaling = config.lora_scaling
        width = config.generator_hidden_size
        self.visual_proj = nn.Linear(config.vision_config.hidden_size, width)
        self.position_embedding = nn.Parameter(torch.randn(config.num_visual_features, width))  # std 1
        self.in_features = {letter: config.delta_shape(letter)[0] for letter in self.targets}
        blocks = (config.generator_num_layers, config.generator_num_heads, config.generator_mlp_ratio,
                  config.generator_layer_norm_eps)
        if config.separate_generators:
            self.generators = nn.ModuleList(
                VLoRASubGenerator(self.num_slots, width, *blocks, self.in_features[letter] * self.rank)
                for letter in self.targets
            )
        else:
            in_features = self.in_features[self.targets[0]]
            self.generators = nn.ModuleList(
                [VLoRASubGenerator(len(self.targets) * self.num_slots, width, *blocks, in_features * self.rank)]
            )
        self.lora_B = nn.ParameterDict({
            letter: nn.Parameter(torch.zeros(self.num_slots, config.delta_shape(letter)[1], self.rank))
            for letter in self.targets
        })

    def forward(self, image_features):
        """image_features `[B, P, C]` -> `{letter: (A [B, S, in, r], B [S, out, r] × alpha/r)}`."""
        features = self.visual_proj(image_features) + self.position_embedding
        rows = [generator(features) for generator in self.generators]  # [B, S or T*S, in*r] each
        if len(rows) == 1 and len(self.targets) > 1:
            rows = rows[0].split(self.num_slots, dim=1)
        batch = image_features.shape[0]
        return {
            letter: (row.reshape(batch, self.num_slots, self.in_features[letter], self.rank),
                     self.lora_B[letter] * self.scaling)
            for letter, row in zip(self.targets, rows)
        }
