"""TokenPacker's projector: region-to-point injection (arXiv 2407.02392); LLaVA-1.5's MLP for the 576-token
baseline; and two naive compressions at TokenPacker's budgets for comparison (average pooling, a learned-query
resampler).

Shipped inside checkpoints as remote code with modeling_tokenpacker.py: imports only torch, transformers and
sibling modules.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .configuration_tokenpacker import TokenPackerConfig


class TokenPackerMLP(nn.Module):
    """Two linear layers with an activation between: `[..., in_features]` -> `[..., out_features]`.

    As a projector of its own (`projector_type="mlp2x_gelu"`) this is LLaVA-1.5's projector.
    """

    def __init__(self, in_features, out_features, hidden_act="gelu"):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features)
        self.act = ACT2FN[hidden_act]
        self.linear_2 = nn.Linear(out_features, out_features)

    def forward(self, hidden_states):
        return self.linear_2(self.act(self.linear_1(hidden_states)))


class TokenPackerRegionAttention(nn.Module):
    """Multi-head attention of each point query over its own region, `torch.nn.MultiheadAttention` semantics
    (projections with bias, no dropout), vectorised over batch and regions.

    Each region has a single query, which allows moving the key and value projections onto the query side
    (`absorbed_attention`): the same result for a fraction of the work. That path reads `k_proj`/`v_proj` weights
    directly, so it is taken only when both are plain `nn.Linear` layers; anything that replaces or wraps them (a
    PEFT adapter, a quantized layer, a parametrization, a hook, accelerate offloading) gets `projected_attention`,
    which calls the modules and `F.scaled_dot_product_attention`.
    """

    def __init__(self, embed_dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, query, key, value):
        """query `[B, Q, E]`; key, value `[B, Q, R, E]` (R = region size) -> `[B, Q, E]`."""
        if self.projections_can_be_absorbed():
            attended = self.absorbed_attention(query, key, value)
        else:
            attended = self.projected_attention(query, key, value)
        return self.out_proj(attended)

    def projections_can_be_absorbed(self):
        """Whether `k_proj` and `v_proj` are plain, materialised `nn.Linear` layers with nothing hooked into them."""
        return all(
            type(proj) is nn.Linear
            and not (proj._forward_hooks or proj._forward_pre_hooks or hasattr(proj, "_hf_hook"))
            and proj.weight.device.type != "meta"
            for proj in (self.k_proj, self.v_proj)
        )

    def projected_attention(self, query, key, value):
        """Project every key and value, then attend: `[B, Q, E]`, `[B, Q, R, E]` x 2 -> `[B, Q, E]` (heads merged,
        before `out_proj`)."""
        batch, num_queries, region, embed_dim = key.shape
        rows = batch * num_queries
        q = self.q_proj(query).reshape(rows, 1, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(key).reshape(rows, region, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(value).reshape(rows, region, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # [rows, heads, 1, head_dim]
        return out.transpose(1, 2).reshape(batch, num_queries, embed_dim)

    def absorbed_attention(self, query, key, value):
        """`projected_attention` with the key and value projections applied on the query side. Per head h:
        `q_h . (W_kh k + b_kh) = (W_khᵀ q_h) . k + q_h . b_kh`, whose last term is the same for every key of the
        region and cancels in the softmax; `sum_r p_r (W_vh v_r + b_vh) = W_vh (sum_r p_r v_r) + b_vh` because the
        weights p sum to one. The projections then cost one E x E product per query instead of one per key
        (R = s^2 keys per query). Shapes as in `projected_attention`."""
        batch, num_queries, _, embed_dim = key.shape
        q = self.q_proj(query).reshape(batch, num_queries, self.num_heads, self.head_dim) * self.head_dim**-0.5
        w_k = self.k_proj.weight.reshape(self.num_heads, self.head_dim, embed_dim)
        w_v = self.v_proj.weight.reshape(self.num_heads, self.head_dim, embed_dim)
        q_in_key_space = torch.einsum("bqhd,hde->bqhe", q, w_k)
        scores = torch.matmul(q_in_key_space, key.transpose(-1, -2))  # [B, Q, heads, R]
        if self.k_proj.bias is not None:
            # Cancels in the softmax; kept so that every parameter is in the graph (DDP expects it).
            scores = scores + (q * self.k_proj.bias.reshape(self.num_heads, self.head_dim)).sum(-1, keepdim=True)
        weights = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(value.dtype)
        pooled = torch.matmul(weights, value)  # [B, Q, heads, E]: each head's weighted mean of the raw values
        out = torch.einsum("bqhe,hde->bqhd", pooled, w_v)
        if self.v_proj.bias is not None:
            out = out + self.v_proj.bias.reshape(self.num_heads, self.head_dim)
        return out.reshape(batch, num_queries, embed_dim)


class TokenPackerProjector(nn.Module):
    """Region-to-point injection (TokenPacker, arXiv 2407.02392).

    The point queries are the patch features bilinearly down-sampled from a `g x g` grid to `g' x g'`
    (`g' = g / scale_factor`); each query attends to the `s x s` multi-level features of its own region.

    Widths: C (vision hidden), L (number of region feature layers), E (projector width), H (LLM hidden).
    """

    def __init__(self, config: TokenPackerConfig):
        super().__init__()
        vision_width = config.vision_config.hidden_size
        region_width = vision_width * len(config.region_feature_layers)
        embed_dim = config.projector_hidden_size
        eps = config.projector_layer_norm_eps
        self.grid_size = config.grid_size
        self.scale_factor = config.scale_factor
        self.query_grid_size = config.grid_size // config.scale_factor

        self.query_proj = nn.Linear(vision_width, embed_dim, bias=False)
        self.query_norm = nn.LayerNorm(embed_dim, eps=eps)
        self.key_mlp = TokenPackerMLP(region_width, embed_dim, config.projector_hidden_act)
        self.key_norm = nn.LayerNorm(embed_dim, eps=eps)
        self.value_mlp = TokenPackerMLP(region_width, embed_dim, config.projector_hidden_act)
        self.value_norm = nn.LayerNorm(embed_dim, eps=eps)
        self.attention = TokenPackerRegionAttention(embed_dim, config.projector_num_heads)
        self.output_mlp = TokenPackerMLP(embed_dim, config.text_config.hidden_size, config.projector_hidden_act)

    def point_queries(self, image_features):
        """`[B, g*g, C]` -> `[B, g'*g', C]`: bilinear down-sampling (align_corners=False) computed in float32 and
        cast back, as the original does. For integer factors this is not an average pool (s=3 picks centres)."""
        batch, _, channels = image_features.shape
        grid = image_features.reshape(batch, self.grid_size, self.grid_size, channels).permute(0, 3, 1, 2)
        size = (self.query_grid_size, self.query_grid_size)
        queries = F.interpolate(grid.float(), size=size, mode="bilinear", align_corners=False)
        return queries.permute(0, 2, 3, 1).reshape(batch, -1, channels).to(image_features.dtype)

    def group_regions(self, features):
        """`[B, g*g, E]` (row-major grid) -> `[B, g'*g', s*s, E]`: query (i, j) gets rows i*s..i*s+s-1 and columns
        j*s..j*s+s-1 of the grid, row-major within the region."""
        batch, _, width = features.shape
        s, n = self.scale_factor, self.query_grid_size
        features = features.reshape(batch, n, s, n, s, width).permute(0, 1, 3, 2, 4, 5)
        return features.reshape(batch, n * n, s * s, width)

    def forward(self, image_features, region_features):
        """image_features `[B, g*g, C]` (point-query layer), region_features `[B, g*g, L*C]` -> `[B, g'*g', H]`."""
        query = self.query_norm(self.query_proj(self.point_queries(image_features)))
        key = self.group_regions(self.key_norm(self.key_mlp(region_features)))
        value = self.group_regions(self.value_norm(self.value_mlp(region_features)))
        return self.output_mlp(self.attention(query, key, value))


class AveragePoolProjector(nn.Module):
    """The naive compression: each `s x s` region of the patch grid averaged, then LLaVA-1.5's MLP:
    `[B, g*g, C]` -> `[B, g'*g', H]` (`g' = g / scale_factor`, the same budget as TokenPacker)."""

    def __init__(self, config: TokenPackerConfig):
        super().__init__()
        self.grid_size = config.grid_size
        self.scale_factor = config.scale_factor
        self.mlp = TokenPackerMLP(config.vision_config.hidden_size, config.text_config.hidden_size,
                                  config.projector_hidden_act)

    def forward(self, image_features):
        """image_features `[B, g*g, C]` (row-major grid) -> `[B, g'*g', H]`."""
        batch, _, channels = image_features.shape
        grid = image_features.reshape(batch, self.grid_size, self.grid_size, channels).permute(0, 3, 1, 2)
        pooled = F.avg_pool2d(grid, self.scale_factor)
        return self.mlp(pooled.flatten(2).transpose(1, 2))


class ResamplerProjector(nn.Module):
    """A learned-query resampler (Perceiver / Q-Former style): `(g/s)^2` learned queries attend, with
    `projector_num_heads` heads, over every patch of the grid (keys and values: LayerNorm of a linear map of the
    patch features), then LLaVA-1.5's MLP: `[B, g*g, C]` -> `[B, (g/s)^2, H]`, TokenPacker's budget without its
    point queries and regions."""

    def __init__(self, config: TokenPackerConfig):
        super().__init__()
        embed_dim = config.projector_hidden_size
        eps = config.projector_layer_norm_eps
        self.num_heads = config.projector_num_heads
        self.queries = nn.Parameter(torch.randn(config.image_seq_length, embed_dim) * embed_dim**-0.5)
        self.query_norm = nn.LayerNorm(embed_dim, eps=eps)
        self.kv_proj = nn.Linear(config.vision_config.hidden_size, embed_dim, bias=False)
        self.kv_norm = nn.LayerNorm(embed_dim, eps=eps)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.output_mlp = TokenPackerMLP(embed_dim, config.text_config.hidden_size, config.projector_hidden_act)

    def forward(self, image_features):
        """image_features `[B, g*g, C]` -> `[B, (g/s)^2, H]`."""
        batch = image_features.shape[0]
        embed_dim = self.queries.shape[-1]
        head_dim = embed_dim // self.num_heads
        kv = self.kv_norm(self.kv_proj(image_features))
        queries = self.query_norm(self.queries).to(kv.dtype).expand(batch, -1, -1)

        def heads(x):
            return x.reshape(batch, x.shape[1], self.num_heads, head_dim).transpose(1, 2)

        attended = F.scaled_dot_product_attention(heads(self.q_proj(queries)), heads(self.k_proj(kv)),
                                                  heads(self.v_proj(kv)))
        attended = attended.transpose(1, 2).reshape(batch, -1, embed_dim)
        return self.output_mlp(self.out_proj(attended))


def build_projector(config: TokenPackerConfig):
    """The projector named by `config.projector_type`."""
    if config.projector_type == "mlp2x_gelu":
        return TokenPackerMLP(
            config.vision_config.hidden_size, config.text_config.hidden_size, config.projector_hidden_act
        )
    if config.projector_type == "avg_pool":
        return AveragePoolProjector(config)
    if config.projector_type == "resampler":
        return ResamplerProjector(config)
    return TokenPackerProjector(config)
