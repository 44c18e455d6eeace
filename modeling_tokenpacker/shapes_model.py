"""Small models for the shapes task (`shapes_task.py`) trained from scratch, and their evaluation.

Every variant shares one vision tower (2 layers in the experiment, `vision_layers` to change), language model and
tokenizer shape; only the projector differs:

    mlp2x_gelu-576            LLaVA-1.5's MLP, every patch (576 tokens)
    tokenpacker-144/64/36     TokenPacker at scale 2/3/4
    avg_pool-144/64/36        average pooling of each s x s region, then the MLP
    resampler-144/64/36       144/64/36 learned queries over every patch, then the MLP

`build_checkpoint(folder, variant, seed)` writes a random-weights checkpoint (model, processor, chat template) for
`tokenpacker-train`; `answer_questions` and `accuracy` evaluate a trained one. Not shipped inside checkpoints.
"""

import re
import time

import torch

from .demo import image_prompt
from .shapes_task import corpus

# (projector_type, scale_factor) of each variant.
VARIANTS = {"mlp2x_gelu-576": ("mlp2x_gelu", 1)}
for _scale, _tokens in ((2, 144), (3, 64), (4, 36)):
    for _projector in ("tokenpacker", "avg_pool", "resampler"):
        VARIANTS[f"{_projector}-{_tokens}"] = (_projector, _scale)

VISION_CONFIG = {"model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 128,
                 "num_attention_heads": 4, "image_size": 336, "patch_size": 14, "projection_dim": 64}
# The experiment's tower depth; the demo's model has one layer (README: "The shapes task and the demo's model").
VISION_LAYERS = 2
TEXT_CONFIG = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 1024}
# The point queries and the mlp2x_gelu / avg_pool / resampler input: the last layer; TokenPacker's regions: the last
# two hidden states (`region_feature_layers`).
VISION_FEATURE_LAYER = -1


def build_tokenizer():
    """The demo's BPE tokenizer trained on the task's words (every answer a word of its vocabulary)."""
    from .demo import TINY_CORPUS, build_tiny_tokenizer

    return build_tiny_tokenizer(TINY_CORPUS + " " + corpus())


def region_feature_layers(vision_layers):
    """TokenPacker's multi-level keys/values for a tower of `vision_layers` layers: its last two hidden states
    (`[1, 2]` for 2 layers; `[0, 1]`, the patch embeddings and the layer, for 1)."""
    return [vision_layers - 1, vision_layers]


def build_model(tokenizer, variant, seed=0, vision_layers=VISION_LAYERS):
    """A random-weights model of `variant` (see `VARIANTS`) with a tower of `vision_layers` layers, initialised for
    training from scratch (`init_from_scratch`)."""
    from .demo import build_tiny_model

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}; got {variant!r}.")
    if not isinstance(vision_layers, int) or vision_layers < 1:
        raise ValueError(f"vision_layers must be a positive integer; got {vision_layers!r}.")
    projector_type, scale_factor = VARIANTS[variant]
    model = build_tiny_model(tokenizer, projector_type, scale_factor, text_config=TEXT_CONFIG, seed=seed,
                             vision_config={**VISION_CONFIG, "num_hidden_layers": vision_layers},
                             vision_feature_layer=VISION_FEATURE_LAYER,
                             region_feature_layers=region_feature_layers(vision_layers), projector_num_heads=4)
    init_from_scratch(model, seed)
    return model


def init_from_scratch(model, seed=0):
    """Every linear layer (tower, projector, LM) and the tower's patch embedding drawn as N(0, 1/fan_in) with zero
    bias (LeCun-normal), the LM's token embeddings as N(0, 1), and the tower's patch position embeddings set to 2-D
    sine-cosine ones (`sincos_position_embeddings`, MAE's choice for ViTs trained from scratch), the class position to
    zero. transformers' init (std 0.02, meant for wide models that are then pre-trained) leaves these 64/128-wide
    layers nearly silent and the patches without a position; and with token embeddings of std 0.02 under layers of
    unit scale, the first attention layer's output drowns which word a question token was, so no answer that
    depends on the question's words (which shape, which colour) was ever learnt."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * module.in_features ** -0.5)
                if module.bias is not None:
                    module.bias.zero_()
        tokens = model.get_input_embeddings().weight
        tokens.copy_(torch.randn(tokens.shape, generator=generator))
        patches = model.model.vision_tower.embeddings.patch_embedding
        patches.weight.copy_(torch.randn(patches.weight.shape, generator=generator) * patches.weight[0].numel() ** -0.5)
        vision = model.config.vision_config
        grid = vision.image_size // vision.patch_size
        embedding = next(m for name, m in model.named_modules() if name.endswith("embeddings.position_embedding"))
        embedding.weight.zero_()
        embedding.weight[1:] = sincos_position_embeddings(grid, embedding.weight.shape[1])


def sincos_position_embeddings(grid, dim):
    """`[grid * grid, dim]` 2-D sine-cosine position embeddings in raster order: the first half of the channels encode
    the row, the second the column, each as sines and cosines of `dim // 4` frequencies from 1 to 1/10000."""
    if dim % 4:
        raise ValueError(f"sine-cosine position embeddings need a width divisible by 4; got {dim}.")
    quarter = dim // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    parts = []
    for coordinate in (rows.reshape(-1), cols.reshape(-1)):
        angles = coordinate[:, None] * frequencies[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, 1).float()


def build_checkpoint(folder, variant, seed=0, vision_layers=VISION_LAYERS):
    """Save a random-weights checkpoint of `variant` (tower of `vision_layers` layers) with its processor to `folder`;
    returns the model."""
    from .demo import build_tiny_processor

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, variant, seed, vision_layers)
    model.save_pretrained(folder)
    build_tiny_processor(tokenizer, model.config.image_seq_length).save_pretrained(folder)
    return model


def normalise(text):
    """An answer as compared with the expected one: its first word, lower case, without punctuation."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return words[0] if words else ""


@torch.inference_mode()
def answer_questions(model, processor, examples, batch_size=16, max_new_tokens=4):
    """Greedy answers to `[(scene, question, ...)]`, in batches (left-padded): -> list of strings."""
    answers = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        inputs = processor(images=[scene.render() for scene, *_ in chunk],
                           text=[image_prompt(processor, question) for _, question, *_ in chunk],
                           return_tensors="pt", padding=True).to(model.device)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers += processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return answers


def accuracy(examples, answers):
    """`{"all": fraction right, kind: fraction right, ...}` of `[(scene, question, answer, kind)]`."""
    right = {}
    for (_, _, expected, kind), answer in zip(examples, answers):
        right.setdefault(kind, []).append(normalise(answer) == expected)
        right.setdefault("all", []).append(normalise(answer) == expected)
    return {kind: sum(hits) / len(hits) for kind, hits in right.items()}


@torch.inference_mode()
def time_to_first_token(model, processor, scene, question, repeats=5):
    """Median seconds of the prefill (vision tower, projector, language model over the prompt) of one image prompt
    and its first greedy token, batch 1."""
    inputs = processor(images=[scene.render()], text=[image_prompt(processor, question)], return_tensors="pt")
    model.generate(**inputs, max_new_tokens=1, do_sample=False)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
