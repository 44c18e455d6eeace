"""Conversion of the original TokenPacker checkpoints (and plain LLaVA-1.5 ones, whose mlp2x_gelu projector the
same model carries): the projector's weights, the presets, the settings, the config and the processor. The flow is
`LlavaFamilyConverter`'s (conversion/converter.py)."""

import logging

from .common import DTYPES, ConversionError
from .converter import LlavaFamilyConverter
from .llava import PROJECTOR_PREFIX, ROLE_DESCRIPTIONS, image_processor_kwargs
from .model_card import write_model_card
from .tokenpacker import (
    DEFAULT_REGION_FEATURE_LAYERS,
    MLP2X_GELU_PROJECTOR_NAMES,
    PROJECTOR_NAMES,
    get_preset,
    match_presets,
    preset_mismatches,
    processor_preset,
    validate_original_config,
)

logger = logging.getLogger("tokenpacker.conversion")


class TokenPackerConverter(LlavaFamilyConverter):
    """One TokenPacker conversion; see `convert()` for the arguments."""

    family = "tokenpacker"
    family_config_keys = ("scale_factor", "patch_num")

    def validate_original_config(self, config, path):
        validate_original_config(config, path)

    def plan_settings(self):
        return {"projector_type": self.projector_type}

    def result_kind(self):
        return self.projector_type

    def model_class(self):
        from modeling_tokenpacker import TokenPackerForConditionalGeneration

        return TokenPackerForConditionalGeneration

    def auto_map(self):
        from modeling_tokenpacker.configuration_tokenpacker import AUTO_MAP

        return AUTO_MAP

    def write_model_card(self, folder, result):
        write_model_card(self, folder, result)

    def decide_family_weights(self):
        """The projector type, from its weights (the original ignores mm_projector_type)."""
        role = "projector" if self.projector_only else "checkpoint"
        names = {name[len(PROJECTOR_PREFIX):] for name in self.shapes[role] if name.startswith(PROJECTOR_PREFIX)}
        if not names:
            raise ConversionError(f"No projector weights ({PROJECTOR_PREFIX}*) in {ROLE_DESCRIPTIONS[role]}: expected "
                                  f"the 23 TokenPacker tensors or LLaVA-1.5's mlp2x_gelu ({sorted(MLP2X_GELU_PROJECTOR_NAMES)}).")
        if "q_proj_1.weight" in names:
            projector_type = "tokenpacker"
        elif "0.weight" in names:
            projector_type = "mlp2x_gelu"
        else:
            raise ConversionError(f"Unrecognised projector weights {sorted(names)[:8]}: expected TokenPacker's "
                                  f"(q_proj_1, k_proj_1, ...) or mlp2x_gelu's (0.weight, 2.weight).")
        expected = set(PROJECTOR_NAMES[projector_type])
        if names - expected:
            unknown = [PROJECTOR_PREFIX + name for name in sorted(names - expected)]
            raise ConversionError(f"Unknown tensor(s) {unknown} in {ROLE_DESCRIPTIONS[role]}: not part of the "
                                  f"{projector_type} projector and not on the ignore list (see conversion/README.md). "
                                  "Refusing to drop them silently.")
        if expected - names:
            raise ConversionError(f"The {projector_type} projector is incomplete: missing "
                                  f"{[PROJECTOR_PREFIX + name for name in sorted(expected - names)]}.")
        declared = self.original.get("mm_projector_type")
        if declared is not None and declared != projector_type:
            if projector_type == "tokenpacker":
                logger.info("config says mm_projector_type=%r; the original ignores it and always builds TokenPacker "
                            "(the weights say so too).", declared)
            else:
                self.warn(f"config says mm_projector_type={declared!r} but the weights are {projector_type}'s; "
                          "following the weights.")
        self.projector_type = projector_type
        self.projector_shapes = {name: self.shapes[role][PROJECTOR_PREFIX + name][0] for name in names}

    def decide_preset(self):
        original = self.original
        scale_factor = original.get("scale_factor", 2 if self.projector_type == "tokenpacker" else None)
        facts = {
            "projector_type": self.projector_type,
            "hidden_size": original["hidden_size"],
            "num_hidden_layers": original["num_hidden_layers"],
            "num_attention_heads": original["num_attention_heads"],
            "intermediate_size": original["intermediate_size"],
            "scale_factor": scale_factor if self.projector_type == "tokenpacker" else None,
            "image_aspect_ratio": original.get("image_aspect_ratio"),
            "patch_num": int(original["patch_num"]) if original.get("patch_num") is not None else None,
        }
        self.preset = None
        if self.preset_name is not None:
            self.preset = get_preset(self.preset_name)
            mismatches = preset_mismatches(self.preset, facts)
            if mismatches:
                detail = "; ".join(f"{key}: preset expects {want!r}, checkpoint has {have!r}" for key, want, have in mismatches)
                raise ConversionError(f"The checkpoint does not match preset {self.preset['name']!r}: {detail}.")
        elif self.projector_type == "tokenpacker":
            matches = match_presets(facts)
            if len(matches) == 1:
                self.preset = get_preset(matches[0])
                logger.info("Preset auto-detected: %s", matches[0])
            elif len(matches) > 1:
                self.warn(f"The config matches several presets {matches}; none applied (pass --preset NAME to fill "
                          "settings the config lacks, e.g. patch_num).")
        self.facts = facts

    def decide_settings(self):
        """The TokenPacker settings: the original config's, completed (and checked) with the preset's."""
        original, preset = self.original, self.preset or {}
        if self.projector_type == "tokenpacker":
            self.scale_factor = int(original.get("scale_factor", preset.get("scale_factor", 2)))
            if "scale_factor" not in original:
                self.warn(f"config has no scale_factor; using {self.scale_factor}"
                          + (" (preset)" if preset else " (the original's default)") + ".")
        else:
            self.scale_factor = 2  # unused by mlp2x_gelu
        grid = self.vision_config.get("image_size", 336) // self.vision_config.get("patch_size", 14)
        if self.projector_type == "tokenpacker" and (self.scale_factor < 1 or grid % self.scale_factor):
            divisors = [d for d in range(1, grid + 1) if grid % d == 0]
            raise ConversionError(f"scale_factor must divide the {grid}x{grid} patch grid: expected one of {divisors}; "
                                  f"got {self.scale_factor}.")
        select_feature = original.get("mm_vision_select_feature", "patch")
        if select_feature == "patch":
            self.select_strategy = "default"
        elif select_feature == "cls_patch" and self.projector_type == "mlp2x_gelu":
            self.select_strategy = "full"
        else:
            allowed = "'patch'" if self.projector_type == "tokenpacker" else "'patch' or 'cls_patch'"
            raise ConversionError(f"mm_vision_select_feature must be {allowed} for the {self.projector_type} projector; "
                                  f"got {select_feature!r}.")
        self.vision_feature_layer = int(original.get("mm_vision_select_layer", preset.get("vision_feature_layer", -2)))
        self.image_aspect_ratio = original.get("image_aspect_ratio", preset.get("image_aspect_ratio", "square"))
        if self.image_aspect_ratio == "slice":
            if original.get("patch_num") is not None:
                self.patch_num = int(original["patch_num"])
            elif preset.get("patch_num") is not None:
                self.patch_num = int(preset["patch_num"])
                self.warn(f"config has no patch_num; using the preset's {self.patch_num}.")
            else:
                self.patch_num = 9
                self.warn("config has no patch_num; using 9, as the original's evaluation does "
                          "(getattr(config, 'patch_num', '9')). Pass --preset for a 16-patch family.")
        else:
            self.patch_num = int(original.get("patch_num", preset.get("patch_num") or 9))
        self.region_feature_layers = list(preset.get("region_feature_layers", DEFAULT_REGION_FEATURE_LAYERS))
        if self.projector_type == "tokenpacker":
            embed_dim = self.projector_shapes["q_proj_1.weight"][0]
            if preset and embed_dim != preset.get("projector_hidden_size", embed_dim):
                raise ConversionError(f"The projector is {embed_dim} wide; preset {preset['name']!r} expects "
                                      f"{preset['projector_hidden_size']}.")
            self.projector_hidden_size = embed_dim
            # the original: nn.MultiheadAttention(embed_dim, embed_dim // 128)
            self.projector_num_heads = int(preset.get("projector_num_heads", max(1, embed_dim // 128)))
            region_width = self.projector_shapes["k_proj_1.0.weight"][1]
            levels = region_width / self.vision_config["hidden_size"]
            if levels != len(self.region_feature_layers):
                raise ConversionError(f"The projector's keys read {region_width} channels = {levels} x the vision width "
                                      f"{self.vision_config['hidden_size']}; expected {len(self.region_feature_layers)} "
                                      f"levels (layers {self.region_feature_layers}).")
        else:
            self.projector_hidden_size, self.projector_num_heads = 1024, 8  # unused by mlp2x_gelu
        if self.dtype is None:
            declared = original.get("torch_dtype") or original.get("dtype")
            self.dtype = declared if declared in DTYPES else "float16"
            logger.info("dtype: %s (from the config's torch_dtype; --dtype to change)", self.dtype)

    def build_config(self):
        from modeling_tokenpacker import TokenPackerConfig

        text = dict(self.text_source)
        text.update(model_type="llama", vocab_size=self.vocab_rows, pad_token_id=self.pad_token_id,
                    bos_token_id=self.tokenizer.bos_token_id, eos_token_id=self.tokenizer.eos_token_id,
                    tie_word_embeddings=False)
        if self.preset:
            for key, value in self.preset["text_config"].items():
                if text.get(key, value) != value:
                    raise ConversionError(f"text config {key}={text[key]} contradicts preset {self.preset['name']!r} "
                                          f"({value}).")
            vision_preset = self.preset.get("vision_config", {})
            for key in ("hidden_size", "num_hidden_layers", "image_size", "patch_size"):
                if key in vision_preset and self.vision_config.get(key, vision_preset[key]) != vision_preset[key]:
                    raise ConversionError(f"vision tower {key}={self.vision_config[key]} contradicts preset "
                                          f"{self.preset['name']!r} ({vision_preset[key]}).")
        self.config = TokenPackerConfig(
            vision_config=dict(self.vision_config),
            text_config=text,
            projector_type=self.projector_type,
            scale_factor=self.scale_factor,
            vision_feature_layer=self.vision_feature_layer,
            vision_feature_select_strategy=self.select_strategy,
            region_feature_layers=self.region_feature_layers,
            projector_hidden_size=self.projector_hidden_size,
            projector_num_heads=self.projector_num_heads,
            image_token_id=self.image_token_id,
            image_aspect_ratio=self.image_aspect_ratio,
            patch_num=self.patch_num,
            bos_token_id=self.tokenizer.bos_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.pad_token_id,
            tie_word_embeddings=False,
        )

    def write_processor(self, folder):
        """The processor: the family's processor preset (processing/presets/) when there is one, the CLIP folder's
        preprocessing values over it, and the checkpoint's own mode; the preset's image_seq_length must agree with
        the model's."""
        from modeling_tokenpacker import TokenPackerImageProcessor, TokenPackerProcessor, load_chat_template

        preset = processor_preset(self.preset["name"]) if self.preset else None
        settings = dict((preset or {}).get("image_processor", {}))
        settings.update(image_processor_kwargs(self.clip_dir))
        settings.update(image_aspect_ratio=self.image_aspect_ratio, patch_num=self.patch_num)
        if preset and preset["image_seq_length"] != self.config.image_seq_length:
            raise ConversionError(f"processing/presets/{preset['name']}.json says {preset['image_seq_length']} image "
                                  f"tokens per block; the converted model gives {self.config.image_seq_length}.")
        processor = TokenPackerProcessor(TokenPackerImageProcessor(**settings), self.tokenizer,
                                         image_seq_length=self.config.image_seq_length,
                                         chat_template=load_chat_template((preset or {}).get("chat_template",
                                                                                             "vicuna_v1")))
        processor.save_pretrained(folder)

    # -- driver --------------------------------------------------------------------------------------------------


def convert(output, input=None, projector_only=None, base_llm=None, vision_tower=None, tokenizer=None, dtype=None,
            max_shard_size="5GB", overwrite=False, push_to_hub=None, private=False, verify=True, preset=None,
            progress=True):
    """Convert an original checkpoint (`input`: folder or Hub id), or a stage-1 `projector_only` file with
    `base_llm`, into `output`. Returns a `ConversionResult`; raises `ConversionError` (a ValueError) with expected
    vs. received on bad input. A failed, interrupted (Ctrl-C, SIGTERM) or killed run leaves `output` as it was."""
    return TokenPackerConverter(
        output, input=input, projector_only=projector_only, base_llm=base_llm, vision_tower=vision_tower,
        tokenizer=tokenizer, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite, push_to_hub=push_to_hub,
        private=private, verify=verify, preset=preset, progress=progress).run()
