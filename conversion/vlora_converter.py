"""Conversion of the original VLoRA checkpoints (FeipengMa6/VLoRA, a LLaVA-1.5 fork): the perceptual weights
generator's weights, the settings, the presets, the config and the processor. The flow is `LlavaFamilyConverter`'s
(conversion/converter.py); the names are conversion/vlora.py's."""

import logging

from . import CONVERTER_VERSION
from .common import DTYPES, ConversionError
from .converter import LlavaFamilyConverter
from .llava import IMAGE_TOKEN, PROJECTOR_PREFIX, ROLE_DESCRIPTIONS, image_processor_kwargs
from .vlora import (
    FAMILY_CONFIG_KEYS,
    LAYER_NORM_EPS,
    MLP_RATIO,
    NUM_HEADS,
    dropped_reason,
    expected_shapes,
    get_preset,
    match_presets,
    preset_differences,
    settings_from_config,
    validate_original_config,
)

logger = logging.getLogger("tokenpacker.conversion")
ROPE_BASE = 10000.0  # the original's LLaMA copy hard-codes it and ignores rope_theta


def _listed(names, limit=8):
    return f"{names[:limit]}{' ...' if len(names) > limit else ''}"


class VLoRAConverter(LlavaFamilyConverter):
    """One VLoRA conversion; see `convert()` for the arguments."""

    family = "vlora"
    family_config_keys = FAMILY_CONFIG_KEYS
    hub_commit_message = f"VLoRA checkpoint converted with convert_vlora_to_hf {CONVERTER_VERSION}"

    @property
    def remote_code_entry_modules(self):
        from modeling_tokenpacker.remote_code import VLORA_ENTRY_MODULES

        return VLORA_ENTRY_MODULES

    def validate_original_config(self, config, path):
        validate_original_config(config, path)

    def vision_tower_hint(self, mm_vision_tower):
        if isinstance(mm_vision_tower, str) and "/" not in mm_vision_tower:
            return (f" VLoRA's scripts write mm_vision_tower as a bare folder name ({mm_vision_tower!r}, resolved "
                    "against the original's working directory): pass that CLIP folder, or "
                    "openai/clip-vit-large-patch14-336, as --vision-tower.")
        return ""

    def plan_settings(self):
        return self.settings

    def result_kind(self):
        return "vlora"

    def model_class(self):
        from modeling_tokenpacker import VLoRAForConditionalGeneration

        return VLoRAForConditionalGeneration

    def auto_map(self):
        from modeling_tokenpacker.configuration_vlora import AUTO_MAP

        return AUTO_MAP

    # -- decisions -----------------------------------------------------------------------------------------------

    def decide_family_weights(self):
        """The generator's tensors, checked complete and of the shapes the config implies."""
        original, path = self.original, self.config_path
        for key, llm_key in (("vlora_llm_dim", "hidden_size"), ("vlora_llm_depth", "num_hidden_layers")):
            if original[key] != original[llm_key]:
                raise ConversionError(f"{key}={original[key]} but the LLM has {llm_key}={original[llm_key]}: the "
                                      "original's deltas would not fit its layers; expected them equal.")
        self.settings = settings_from_config(original, path)
        letters = {letter for _, letter in self.settings["kept"]}
        heads, kv_heads = original["num_attention_heads"], original.get("num_key_value_heads") or original["num_attention_heads"]
        if kv_heads != heads and letters & set("kv"):
            raise ConversionError(f"The LLM has {kv_heads} key/value heads for {heads} query heads (grouped-query "
                                  "attention) but the original's k/v deltas are D x D: it supports no GQA.")
        role = "projector" if self.projector_only else "checkpoint"
        found = {name[len(PROJECTOR_PREFIX):]: info[0] for name, info in self.shapes[role].items()
                 if name.startswith(PROJECTOR_PREFIX)}
        if not found:
            raise ConversionError(f"No generator weights ({PROJECTOR_PREFIX}*) in {ROLE_DESCRIPTIONS[role]}: expected "
                                  "VLoRA's perceptual weights generator (pos_embed, Bs, visual_proj, gen.*).")
        expected = expected_shapes(self.settings)
        described = (f"vlora_type={self.settings['vlora_type']!r}, weights_sep={self.settings['weights_sep']}, "
                     f"vlora_depth={self.settings['num_layers']}")
        unknown = sorted(set(found) - set(expected))
        if unknown:
            raise ConversionError(f"Unknown tensor(s) {_listed([PROJECTOR_PREFIX + n for n in unknown])} in "
                                  f"{ROLE_DESCRIPTIONS[role]}: not part of the generator that the config describes "
                                  f"({described}) and not on the ignore list (see conversion/README.md). Refusing to "
                                  "drop them silently.")
        missing = [name for name in expected if name not in found]
        if missing:
            raise ConversionError(f"The generator is incomplete ({described}): missing "
                                  f"{_listed([PROJECTOR_PREFIX + n for n in missing])}.")
        wrong = [f"{PROJECTOR_PREFIX}{name} {list(found[name])} (the config implies {list(shape)})"
                 for name, shape in expected.items() if tuple(found[name]) != shape]
        if wrong:
            raise ConversionError(
                f"The generator's shapes contradict the config (vlora_dim={self.settings['width']}, "
                f"vlora_rank={self.settings['rank']}, vlora_llm_dim={self.settings['llm_dim']}, vlora_visual_dim="
                f"{self.settings['visual_dim']}, vlora_pos_num={self.settings['pos_num']}, slots per letter "
                f"{self.settings['slots']}): {'; '.join(wrong[:4])}{' ...' if len(wrong) > 4 else ''}.")
        self.dropped = []
        slots = self.settings["slots"]
        for t, letter, why in self.settings["dropped"]:
            what = f"gen.{t}.*" if self.settings["weights_sep"] else "its queries"
            self.dropped.append(f"{dropped_reason(t, letter, why)}: its tensors ({PROJECTOR_PREFIX}{what}) and rows "
                                f"{t * slots}..{(t + 1) * slots - 1} of {PROJECTOR_PREFIX}Bs are not converted")
            self.warn(f"vlora_type={self.settings['vlora_type']!r}: {self.dropped[-1]}.")

    def decide_preset(self):
        self.preset = None
        if self.preset_name is not None:
            preset = get_preset(self.preset_name)
            architecture, _ = preset_differences(preset, self.original)
            if architecture:
                detail = "; ".join(f"{key}: preset expects {want!r}, checkpoint has {have!r}"
                                   for key, want, have in architecture)
                raise ConversionError(f"The checkpoint does not match preset {preset['name']!r}: {detail}.")
            self.preset = preset
        else:
            matches = match_presets(self.original)
            if len(matches) == 1:
                self.preset = get_preset(matches[0])
                logger.info("Preset auto-detected: %s", matches[0])
        if self.preset is not None:
            _, settings = preset_differences(self.preset, self.original)
            if settings:
                unverified = "" if self.preset.get("verified", True) else " (the preset's values are unverified)"
                self.warn(f"The checkpoint's settings differ from preset {self.preset['name']!r}{unverified}: "
                          + ", ".join(f"{key}={have!r} (preset {want!r})" for key, want, have in settings)
                          + "; following the checkpoint's config.")

    def decide_settings(self):
        """The model settings, from the original config, checked against the vision tower."""
        original, preset = self.original, self.preset or {}
        select_feature = original.get("mm_vision_select_feature", "patch")
        if select_feature not in ("patch", "cls_patch"):
            raise ConversionError(f"mm_vision_select_feature must be 'patch' or 'cls_patch'; got {select_feature!r}.")
        self.select_strategy = "default" if select_feature == "patch" else "full"
        vision = self.vision_config
        width = vision.get("hidden_size")
        if self.settings["visual_dim"] != width:
            raise ConversionError(f"vlora_visual_dim={self.settings['visual_dim']} but the vision tower is {width} "
                                  "wide; expected the CLIP width the generator reads.")
        grid = vision.get("image_size", 336) // vision.get("patch_size", 14)
        rows = grid * grid + (1 if self.select_strategy == "full" else 0)
        if self.settings["pos_num"] != rows:
            raise ConversionError(f"vlora_pos_num={self.settings['pos_num']} but the vision tower gives {rows} feature "
                                  f"rows ({grid}x{grid} patches{' + CLS' if rows > grid * grid else ''}, "
                                  f"mm_vision_select_feature {select_feature!r}); expected them equal.")
        if "mm_vision_select_layer" not in original:
            self.warn("config has no mm_vision_select_layer; using -2 (VLoRA's scripts).")
        self.vision_feature_layer = int(original.get("mm_vision_select_layer", preset.get("vision_feature_layer", -2)))
        self.image_aspect_ratio = original.get("image_aspect_ratio", "square")
        if self.image_aspect_ratio == "slice":
            raise ConversionError("image_aspect_ratio 'slice' is TokenPacker-HD's; VLoRA has 'pad' or plain modes.")
        if "mm_use_im_patch_token" not in original:
            logger.info("config has no mm_use_im_patch_token: the original's loader would then add an <im_patch> "
                        "token that no prompt uses (and an untrained embedding row); not reproduced.")
        if (original.get("pretraining_tp") or 1) > 1:
            self.warn(f"pretraining_tp={original['pretraining_tp']}: the original's LLaMA copy then skips the deltas "
                      "(silently); the converted model applies them.")
        if self.dtype is None:
            declared = original.get("torch_dtype") or original.get("dtype")
            self.dtype = declared if declared in DTYPES else "float16"
            logger.info("dtype: %s (from the config's torch_dtype; --dtype to change)", self.dtype)

    def load_tokenizer(self):
        """The original's tokenizer with `<image>` added (one placeholder id, outside the vocabulary: the model never
        embeds it); pad = `<unk>`, as the original trains; left padding. The vocabulary is not resized."""
        tokenizer = self.open_tokenizer()
        has_image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) not in (None, tokenizer.unk_token_id)
        if len(tokenizer) - has_image_token > self.source_vocab_rows:
            raise ConversionError(f"The tokenizer has {len(tokenizer) - has_image_token} tokens (without <image>) but "
                                  f"the embeddings only {self.source_vocab_rows} rows: ids from "
                                  f"{self.source_vocab_rows} on could not be embedded. Pass the checkpoint's own "
                                  "tokenizer (--tokenizer).")
        if not has_image_token:
            tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        tokenizer.pad_token = tokenizer.unk_token
        tokenizer.padding_side = "left"
        self.tokenizer = tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.pad_token_id = tokenizer.pad_token_id
        self.vocab_rows = self.source_vocab_rows

    def build_config(self):
        from modeling_tokenpacker import VLoRAConfig

        text = dict(self.text_source)
        if text.get("rope_theta", ROPE_BASE) != ROPE_BASE:
            self.warn(f"config rope_theta={text['rope_theta']} is ignored by the original (its LLaMA copy uses "
                      f"{ROPE_BASE:g}); the converted model uses {ROPE_BASE:g} too.")
        text.pop("rope_parameters", None)
        text.update(model_type="llama", vocab_size=self.vocab_rows, pad_token_id=self.pad_token_id,
                    bos_token_id=self.tokenizer.bos_token_id, eos_token_id=self.tokenizer.eos_token_id,
                    tie_word_embeddings=False, rope_theta=ROPE_BASE)
        alpha = self.original.get("vlora_alpha")
        try:
            self.config = VLoRAConfig(
                vision_config=dict(self.vision_config), text_config=text,
                vision_feature_layer=self.vision_feature_layer, vision_feature_select_strategy=self.select_strategy,
                generator_hidden_size=self.settings["width"], generator_num_layers=self.settings["num_layers"],
                generator_num_heads=NUM_HEADS, generator_mlp_ratio=MLP_RATIO, generator_layer_norm_eps=LAYER_NORM_EPS,
                lora_rank=self.settings["rank"], lora_alpha=alpha,
                delta_targets="".join(letter for _, letter in self.settings["kept"]),
                layer_stride=int(self.original["skip_layers"]), separate_generators=self.settings["weights_sep"],
                image_token_id=self.image_token_id, image_token_embedding_id=0,  # the original writes id 0 there
                image_aspect_ratio=self.image_aspect_ratio, bos_token_id=self.tokenizer.bos_token_id,
                eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.pad_token_id, tie_word_embeddings=False,
            )
        except ValueError as error:
            raise ConversionError(f"The original config gives an invalid VLoRA config: {error}") from None

    def write_processor(self, folder):
        """VLoRAProcessor: the CLIP folder's preprocessing values, the checkpoint's mode, vicuna_v1."""
        from modeling_tokenpacker import VLoRAImageProcessor, VLoRAProcessor, load_chat_template

        settings = image_processor_kwargs(self.clip_dir)
        settings.update(image_aspect_ratio=self.image_aspect_ratio)
        template = load_chat_template((self.preset or {}).get("chat_template", "vicuna_v1"))
        VLoRAProcessor(VLoRAImageProcessor(**settings), self.tokenizer, chat_template=template).save_pretrained(folder)

    def write_model_card(self, folder, result):
        from .model_card import write_vlora_model_card

        write_vlora_model_card(self, folder, result)


def convert(output, input=None, projector_only=None, base_llm=None, vision_tower=None, tokenizer=None, dtype=None,
            max_shard_size="5GB", overwrite=False, push_to_hub=None, private=False, verify=True, preset=None,
            progress=True):
    """Convert an original VLoRA checkpoint (`input`: folder or Hub id), or a stage-1 `projector_only`
    mm_projector.bin with `base_llm`, into `output`. Returns a `ConversionResult`; raises `ConversionError` (a
    ValueError) with expected vs. received on bad input. A failed, interrupted (Ctrl-C, SIGTERM) or killed run leaves
    `output` as it was."""
    return VLoRAConverter(
        output, input=input, projector_only=projector_only, base_llm=base_llm, vision_tower=vision_tower,
        tokenizer=tokenizer, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite, push_to_hub=push_to_hub,
        private=private, verify=verify, preset=preset, progress=progress).run()
