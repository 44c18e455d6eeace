"""The conversion flow every LLaVA-1.5-fork family shares: inputs located and checked apart from the output,
weights scanned and checked complete, the target model's parameters matched one to one, the output written into a
staging folder beside the target, verified in a fresh process and swapped into place whole. A family
(`TokenPackerConverter`, ...) decides its own weights, settings, config and processor.

A failed, interrupted (Ctrl-C, SIGTERM) or killed run leaves the output as it was: the staging and scratch folders
are removed on the way out, or by the next run when this one was killed; the verification child ends with its
parent.
"""

import contextlib
import logging
import math
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from modeling_tokenpacker.staging import StagingFolder, remove_dead_stagings, terminate_cleanly

from .common import (
    CHECKPOINT_PATTERNS,
    CLIP_PATTERNS,
    DTYPES,
    TOKENIZER_PATTERNS,
    ConversionError,
    check_free_space,
    check_output_apart_from_inputs,
    describe_os_error,
    folder_of,
    parse_size,
    read_json,
    resolve_dtype,
    resolve_location,
    round_up,
    set_config_dtype,
)
from .hub import push_folder_to_hub
from .llava import (
    EMBEDDED_TOWER_RULE,
    IGNORED_CONFIG_KEYS,
    IMAGE_TOKEN,
    LLAMA_CONFIG_KEYS,
    LLAVA_CONFIG_KEYS,
    PAD_TOKEN,
    ROLE_DESCRIPTIONS,
    VOCAB_MULTIPLE,
    Plan,
    classify_common,
    clip_vision_config_from_file,
    clip_vision_config_from_shapes,
    iter_converted,
    mapped_shapes,
)
from .reading import SourceFile, find_weight_files, scan_sources
from .verification import verify_output
from .writing import StreamingShardWriter

logger = logging.getLogger("tokenpacker.conversion")


@dataclass
class ConversionResult:
    output: str
    dtype: str
    projector_type: str
    preset: str = None
    source_tensors: int = 0
    mapped_tensors: int = 0
    written_tensors: int = 0
    ignored: dict = field(default_factory=dict)  # reason -> count
    ignored_names: list = field(default_factory=list)
    bytes_written: int = 0
    shards: int = 0
    seconds: float = 0.0
    weights_seconds: float = 0.0  # streaming the tensors (read, map, write), without start-up and side files
    verified_tensors: int = None
    image_token_id: int = None
    pad_token_id: int = None
    vocab_size: int = None
    warnings: list = field(default_factory=list)
    dropped: list = field(default_factory=list)  # source content the original computes but never uses, not converted
    pushed_to: str = None

    def summary(self):
        ignored = ", ".join(f"{count} x {reason}" for reason, count in sorted(self.ignored.items())) or "none"
        verified = ("skipped (--no-verify)" if self.verified_tensors is None
                    else f"{self.verified_tensors} tensors bit-exact after loading through the Auto classes")
        return "\n".join([
            f"Converted to {self.output}",
            f"  projector: {self.projector_type}; preset: {self.preset or 'none'}; dtype: {self.dtype}",
            f"  source tensors read: {self.source_tensors}; mapped: {self.mapped_tensors}; ignored: "
            f"{sum(self.ignored.values())} ({ignored})",
            f"  tensors written: {self.written_tensors} in {self.shards} shard(s), {self.bytes_written / 1e6:.1f} MB",
            f"  vocabulary: {self.vocab_size} rows; <image> id {self.image_token_id}; <pad> id {self.pad_token_id}",
            *(f"  dropped: {line}" for line in self.dropped),
            f"  verification: {verified}",
            f"  time: {self.seconds:.1f} s (tensors streamed in {self.weights_seconds:.1f} s, "
            f"{self.bytes_written / max(self.weights_seconds, 1e-9) / 1e6:.0f} MB/s)"
            + (f"; pushed to {self.pushed_to}" if self.pushed_to else ""),
        ])



class LlavaFamilyConverter:
    """One conversion of a LLaVA-1.5-fork checkpoint; `run()` does it. Subclasses fill in the family hooks."""

    def __init__(self, output, input=None, projector_only=None, base_llm=None, vision_tower=None, tokenizer=None,
                 dtype=None, max_shard_size="5GB", overwrite=False, push_to_hub=None, private=False, verify=True,
                 preset=None, progress=True):
        if input is None and projector_only is None:
            raise ConversionError("Give --input ORIG_DIR (a full checkpoint) or --projector-only mm_projector.bin "
                                  "(with --base-llm and --vision-tower).")
        if projector_only is not None and (base_llm is None or vision_tower is None):
            raise ConversionError("--projector-only needs --base-llm LLM_DIR (the language model) and --vision-tower "
                                  "CLIP_DIR (a stage-1 save holds neither).")
        if base_llm is not None and projector_only is None:
            raise ConversionError("--base-llm is only used with --projector-only; a full checkpoint holds its LLM.")
        self.output = os.path.abspath(output)
        self.input = input
        self.projector_only = projector_only
        self.base_llm = base_llm
        self.vision_tower = vision_tower
        self.tokenizer_location = tokenizer
        self.dtype = resolve_dtype(dtype) if dtype is not None else None
        self.max_bytes = parse_size(max_shard_size)
        self.overwrite = overwrite
        self.push_to_hub = push_to_hub
        self.private = private
        self.verify = verify
        self.preset_name = preset
        self.preset = None
        self.progress = progress
        self.warnings = []
        self.dropped = []  # sentences for the summary and model card (the family fills them)

    def warn(self, message):
        logger.warning(message)
        self.warnings.append(message)

    # -- inputs ------------------------------------------------------------------------------------------------

    def resolve_inputs(self):
        """Every input located (Hub ids downloaded) and checked apart from the output; the original config read and
        checked; the weight files found. Nothing is written yet."""
        if self.projector_only is not None:
            self.projector_file = resolve_location(self.projector_only, "--projector-only")
            if not os.path.isfile(self.projector_file):
                raise ConversionError(f"--projector-only must name the mm_projector.bin file; got {self.projector_file}.")
            self.input_dir = (resolve_location(self.input, "--input", CHECKPOINT_PATTERNS) if self.input
                              else os.path.dirname(self.projector_file))
            self.base_llm_dir = resolve_location(self.base_llm, "--base-llm", CHECKPOINT_PATTERNS)
        else:
            self.projector_file = None
            self.input_dir = resolve_location(self.input, "--input", CHECKPOINT_PATTERNS)
            if not os.path.isdir(self.input_dir):
                raise ConversionError(f"--input must be a checkpoint folder; got the file {self.input_dir}.")
            self.base_llm_dir = None
        self.clip_dir = resolve_location(self.vision_tower, "--vision-tower", CLIP_PATTERNS)
        self.tokenizer_location = resolve_location(self.tokenizer_location, "--tokenizer", TOKENIZER_PATTERNS)
        check_output_apart_from_inputs(self.output, {
            "the input checkpoint": self.input_dir, "the projector file": self.projector_file,
            "the base LLM": self.base_llm_dir, "the vision tower": self.clip_dir,
            "the tokenizer": folder_of(self.tokenizer_location)})
        if os.path.exists(self.output) and not os.path.isdir(self.output):
            raise ConversionError(f"The output path {self.output} exists and is not a folder.")
        config_path = os.path.join(self.input_dir, "config.json")
        if not os.path.isfile(config_path):
            raise ConversionError(f"No config.json in {self.input_dir}; the original checkpoint's config.json is needed.")
        self.config_path = config_path
        self.original = read_json(config_path)  # never AutoConfig: model_type 'llava' is transformers' own LLaVA
        self.validate_original_config(self.original, config_path)
        if self.projector_file is not None:
            fmt = "safetensors" if self.projector_file.endswith(".safetensors") else "bin"
            self.checkpoint_files, self.checkpoint_index = [SourceFile(self.projector_file, fmt, "projector")], None
            self.base_llm_files, self.base_llm_index = find_weight_files(self.base_llm_dir, "base_llm",
                                                                         ROLE_DESCRIPTIONS["base_llm"])
        else:
            self.checkpoint_files, self.checkpoint_index = find_weight_files(self.input_dir, "checkpoint",
                                                                             ROLE_DESCRIPTIONS["checkpoint"])
            self.base_llm_files, self.base_llm_index = [], None
        if self.clip_dir is not None:
            if not os.path.isfile(os.path.join(self.clip_dir, "config.json")):
                raise ConversionError(f"--vision-tower {self.clip_dir} has no config.json (expected a CLIPVisionModel "
                                      "or CLIPModel folder).")
            self.clip_files, self.clip_index = find_weight_files(self.clip_dir, "vision", ROLE_DESCRIPTIONS["vision"])
        else:
            self.clip_files, self.clip_index = [], None

    def scan(self):
        """Every source file checked complete and its tensors' shapes read (checked against the index files); unknown
        names fail later in the decisions, all before anything is written."""
        groups = [(self.checkpoint_files, self.checkpoint_index), (self.base_llm_files, self.base_llm_index),
                  (self.clip_files, self.clip_index)]
        self.shapes, self.file_shapes = scan_sources(groups, ROLE_DESCRIPTIONS)

    # -- decisions -----------------------------------------------------------------------------------------------

    def decide_vision(self):
        embedded_prefix = "model.vision_tower.vision_tower.vision_model."
        embedded = {k: v for k, v in self.shapes["checkpoint"].items() if k.startswith("model.vision_tower.")}
        mm_vision_tower = self.original.get("mm_vision_tower")
        if self.clip_dir is not None:
            self.use_embedded_tower = False
            clip_config_path = os.path.join(self.clip_dir, "config.json")
            self.vision_config = clip_vision_config_from_file(read_json(clip_config_path), clip_config_path)
            if embedded:
                logger.info("The checkpoint embeds a vision tower copy (%d tensors); using --vision-tower instead, as "
                            "the original does.", len(embedded))
                self.check_embedded_matches_folder(embedded)
        elif embedded:
            self.use_embedded_tower = True
            self.warn(
                f"No --vision-tower given: using the vision tower embedded in the checkpoint ({len(embedded)} tensors, "
                f"{next(iter(embedded.values()))[1]}). The original ignores this copy and reads CLIP from "
                f"mm_vision_tower={mm_vision_tower!r} (in its own dtype), so outputs can differ slightly; pass "
                "--vision-tower for exact parity."
            )
            if self.preset is not None and "vision_config" in self.preset:
                self.vision_config = dict(self.preset["vision_config"], model_type="clip_vision_model")
            else:
                self.vision_config = clip_vision_config_from_shapes(self.shapes["checkpoint"], embedded_prefix)
                self.warn(f"Vision config inferred from the embedded tensors' shapes with CLIP conventions: "
                          f"{self.vision_config}.")
        else:
            raise ConversionError(
                "No vision tower: the checkpoint embeds none, and no --vision-tower was given. Pass --vision-tower "
                f"CLIP_DIR (a CLIP checkpoint folder or Hub id; the config names mm_vision_tower={mm_vision_tower!r}), "
                "or convert a checkpoint that embeds the tower (model.vision_tower.vision_tower.vision_model.*)."
                + self.vision_tower_hint(mm_vision_tower)
            )
        if self.original.get("mm_hidden_size") not in (None, self.vision_config.get("hidden_size")):
            self.warn(f"config mm_hidden_size={self.original['mm_hidden_size']} differs from the vision tower's hidden "
                      f"size {self.vision_config.get('hidden_size')}; the original ignores mm_hidden_size.")

    def check_embedded_matches_folder(self, embedded):
        folder = {}
        for name, info in self.shapes["vision"].items():
            mapping = classify_common("vision", name)
            if not mapping.ignored:
                folder[mapping.targets[0]] = info[0]
        for name, info in embedded.items():
            match = EMBEDDED_TOWER_RULE[0].fullmatch(name)
            if match:
                target = EMBEDDED_TOWER_RULE[0].sub(EMBEDDED_TOWER_RULE[1], name)
                if target in folder and folder[target] != info[0]:
                    raise ConversionError(f"The embedded vision tower does not match --vision-tower: {name} has shape "
                                          f"{list(info[0])} in the checkpoint but {list(folder[target])} in {self.clip_dir}.")

    def decide_text_config(self):
        source = self.original
        if self.base_llm_dir is not None:
            llm_config_path = os.path.join(self.base_llm_dir, "config.json")
            if not os.path.isfile(llm_config_path):
                raise ConversionError(f"--base-llm {self.base_llm_dir} has no config.json.")
            source = read_json(llm_config_path)
            if source.get("model_type") != "llama":
                raise ConversionError(f"--base-llm must be a LLaMA folder (model_type 'llama'); got "
                                      f"{source.get('model_type')!r} in {llm_config_path}.")
            for key in ("hidden_size", "num_hidden_layers"):
                if key in self.original and self.original[key] != source.get(key):
                    raise ConversionError(f"--base-llm {key}={source.get(key)} differs from the projector's config "
                                          f"({self.original[key]}).")
        self.text_source = {key: source[key] for key in LLAMA_CONFIG_KEYS if key in source}
        unknown = sorted(set(self.original) - set(LLAMA_CONFIG_KEYS) - set(LLAVA_CONFIG_KEYS) - set(IGNORED_CONFIG_KEYS)
                         - set(self.family_config_keys))
        if unknown:
            self.warn(f"config keys not used by the converted model: {unknown}.")
        llm_role = "base_llm" if self.base_llm_dir else "checkpoint"
        shapes = self.shapes[llm_role]
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            if name not in shapes:
                raise ConversionError(f"{ROLE_DESCRIPTIONS[llm_role]} has no {name}; expected a LLaMA causal LM.")
        self.source_vocab_rows = shapes["model.embed_tokens.weight"][0][0]
        if shapes["lm_head.weight"][0][0] != self.source_vocab_rows:
            raise ConversionError(f"embed_tokens has {self.source_vocab_rows} rows but lm_head has "
                                  f"{shapes['lm_head.weight'][0][0]}; expected equal vocabularies.")

    def open_tokenizer(self):
        """The original's tokenizer as it is, from --tokenizer, else the input folder, else --base-llm; sets
        `self.tokenizer_dir`."""
        from transformers import LlamaTokenizerFast

        candidates = [self.tokenizer_location] if self.tokenizer_location else [self.input_dir, self.base_llm_dir]
        folder = None
        for candidate in candidates:
            if candidate is None:
                continue
            candidate = resolve_location(candidate, "--tokenizer", TOKENIZER_PATTERNS)
            if any(os.path.isfile(os.path.join(candidate, name)) for name in ("tokenizer.model", "tokenizer.json")):
                folder = candidate
                break
        if folder is None:
            raise ConversionError(f"No tokenizer (tokenizer.model or tokenizer.json) in {[c for c in candidates if c]}; "
                                  "pass --tokenizer DIR (e.g. the base Vicuna folder).")
        # Never AutoTokenizer here: on a folder whose config says model_type 'llava', transformers 5 returns a
        # generic tokenizer without SentencePiece's dummy prefix (different ids). LLaMA's own class gives the
        # original's ids.
        self.tokenizer_dir = folder
        return LlamaTokenizerFast.from_pretrained(folder)

    def load_tokenizer(self):
        tokenizer = self.open_tokenizer()
        if len(tokenizer) > self.source_vocab_rows:
            self.warn(f"The tokenizer has {len(tokenizer)} tokens but the embeddings only {self.source_vocab_rows} "
                      "rows; the extra tokens get the mean row.")
        if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) in (None, tokenizer.unk_token_id):
            tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        if tokenizer.convert_tokens_to_ids(PAD_TOKEN) in (None, tokenizer.unk_token_id):
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        tokenizer.pad_token = PAD_TOKEN
        tokenizer.padding_side = "left"
        self.tokenizer = tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.pad_token_id = tokenizer.pad_token_id
        self.vocab_rows = round_up(max(len(tokenizer), self.source_vocab_rows), VOCAB_MULTIPLE)

    def build_plan(self):
        files = list(self.checkpoint_files) + list(self.base_llm_files) + list(self.clip_files)
        num = sum(len(self.file_shapes[source.path]) for source in files)
        self.plan = Plan(files=files, family=self.family, dtype=self.dtype, vocab_rows=self.vocab_rows,
                         use_embedded_tower=self.use_embedded_tower, settings=self.plan_settings(),
                         image_token_id=self.image_token_id, num_source_tensors=num)

    def check_against_model(self):
        """Every parameter of the target model gets exactly one source tensor of the right shape."""
        with torch.device("meta"):
            model = self.model_class()(self.config)
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        planned, ignored = {}, Counter()
        for source in self.plan.files:
            for name, (shape, _) in self.file_shapes[source.path].items():
                mapping = self.plan.classify(source.role, name)
                if mapping.ignored:
                    ignored[mapping.ignored] += 1
                    continue
                for target, target_shape in mapped_shapes(mapping, shape, self.vocab_rows):
                    if target in planned:
                        raise ConversionError(f"Two source tensors map to {target}; the second is {name}.")
                    planned[target] = target_shape
        missing = sorted(set(expected) - set(planned))
        extra = sorted(set(planned) - set(expected))
        wrong = [(n, planned[n], expected[n]) for n in sorted(set(planned) & set(expected)) if planned[n] != expected[n]]
        if missing or extra or wrong:
            parts = []
            if missing:
                parts.append(f"no source tensor for {missing[:10]}{' ...' if len(missing) > 10 else ''}")
            if extra:
                parts.append(f"source tensors for names the model lacks: {extra[:10]}")
            if wrong:
                parts.append("shape mismatches (source -> expected): "
                             + ", ".join(f"{n} {list(a)} -> {list(b)}" for n, a, b in wrong[:10]))
            raise ConversionError(f"The checkpoint does not fit the {self.model_class().__name__} built from its config: "
                                  + "; ".join(parts) + ".")
        self.expected_ignored = ignored

    # -- output --------------------------------------------------------------------------------------------------

    def output_entries(self):
        """`[(our name, shape)]` in the order `iter_converted` will produce the tensors (from the scan)."""
        entries = []
        for source in self.plan.files:
            for name, (shape, _) in self.file_shapes[source.path].items():
                mapping = self.plan.classify(source.role, name)
                if not mapping.ignored:
                    entries.extend(mapped_shapes(mapping, shape, self.plan.vocab_rows))
        return entries

    def write_weights(self, folder, result):
        from tqdm.auto import tqdm

        start = time.perf_counter()
        writer = StreamingShardWriter(folder, self.output_entries(), DTYPES[self.plan.dtype], self.max_bytes)
        bar = tqdm(total=self.plan.num_source_tensors, unit="tensor", desc="Converting", disable=not self.progress)
        total, done, reported = max(self.plan.num_source_tensors, 1), [0], [0]

        def on_tensor():
            bar.update(1)
            done[0] += 1
            percent = 100 * done[0] // total
            if percent >= reported[0] + 10:  # machine-readable markers every 10 %, for logs and tests
                reported[0] = percent - percent % 10
                logger.info("progress: converted %d of %d tensors (%d%%)", done[0], total, reported[0])

        try:
            for name, mapping, outputs in iter_converted(self.plan, on_tensor=on_tensor):
                result.source_tensors += 1
                if mapping.ignored:
                    result.ignored[mapping.ignored] = result.ignored.get(mapping.ignored, 0) + 1
                    result.ignored_names.append(name)
                    continue
                result.mapped_tensors += 1
                for target, tensor in outputs:
                    writer.add(target, tensor)
        finally:
            bar.close()
            writer.close()
        result.shards = writer.finish()
        result.written_tensors = writer.count
        result.bytes_written = writer.total_bytes
        result.weights_seconds = time.perf_counter() - start

    def write_config_files(self, folder):
        from modeling_tokenpacker.remote_code import ENTRY_MODULES, shipped_files
        from transformers import GenerationConfig

        config = self.config
        config.auto_map = dict(self.auto_map())
        config.architectures = [self.model_class().__name__]
        set_config_dtype(config, DTYPES[self.dtype])
        config.save_pretrained(folder)
        for name, path in shipped_files(self.remote_code_entry_modules or ENTRY_MODULES).items():
            shutil.copyfile(path, os.path.join(folder, name))
        generation = GenerationConfig(bos_token_id=self.tokenizer.bos_token_id, eos_token_id=self.tokenizer.eos_token_id,
                                      pad_token_id=self.pad_token_id)
        generation.save_pretrained(folder)

    def prepare(self):
        """Everything decided and checked from the inputs, before anything is written (after `resolve_inputs`)."""
        logger.info("progress: scanning the inputs")
        self.scan()
        self.decide_family_weights()
        self.decide_preset()
        self.decide_vision()
        self.decide_settings()
        self.decide_text_config()
        self.load_tokenizer()
        self.build_config()
        self.build_plan()
        self.check_against_model()

    def run(self):
        start = time.perf_counter()
        with terminate_cleanly():
            self.resolve_inputs()
            parent = os.path.dirname(self.output)
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as error:
                raise ConversionError(f"Cannot create the output's folder {parent}: {error.strerror}.") from None
            for sentence in remove_dead_stagings(parent):  # the debris of killed runs; interrupted swaps repaired
                logger.info(sentence)
            if os.path.exists(self.output) and not self.overwrite:
                raise ConversionError(f"The output folder {self.output} exists; pass --overwrite to replace it.")
            with contextlib.ExitStack() as stack:
                try:
                    staging = stack.enter_context(StagingFolder(self.output, "convert"))
                except OSError as error:
                    raise ConversionError(f"Cannot write beside {self.output}: {parent} is not writable "
                                          f"({error.strerror}); nothing was written.") from None
                result = self.convert_into(staging.path)
                logger.info("progress: committing %s", self.output)
                try:
                    staging.commit()
                except OSError as error:
                    raise ConversionError(describe_os_error(error, f"moving the output into {self.output}") +
                                          "; the previous output, if any, is unchanged.") from None
        if self.push_to_hub:
            result.pushed_to = push_folder_to_hub(self.output, self.push_to_hub, self.private, self.hub_commit_message)
        result.seconds = time.perf_counter() - start
        result.warnings = list(self.warnings)
        logger.info("progress: done")
        return result

    def convert_into(self, folder):
        """Decide, check, then write the whole output into `folder` (the staging folder) and verify it."""
        self.prepare()
        check_free_space(os.path.dirname(self.output), self.expected_bytes())
        result = ConversionResult(output=self.output, dtype=self.dtype, projector_type=self.result_kind(),
                                  preset=(self.preset or {}).get("name"), image_token_id=self.image_token_id,
                                  pad_token_id=self.pad_token_id, vocab_size=self.vocab_rows,
                                  dropped=list(self.dropped))
        try:
            self.write_weights(folder, result)
            logger.info("progress: writing the config, processor and remote code")
            self.write_config_files(folder)
            self.write_processor(folder)
            if self.verify:
                result.verified_tensors = verify_output(folder, self.plan, scratch_beside=self.output)
            self.write_model_card(folder, result)
        except OSError as error:
            raise ConversionError(describe_os_error(error, f"writing the output for {self.output}") +
                                  "; nothing was written there.") from None
        return result

    def expected_bytes(self):
        """Bytes of the weights the output will hold (the side files are small)."""
        itemsize = DTYPES[self.plan.dtype].itemsize
        return sum(itemsize * math.prod(shape) for _, shape in self.output_entries())


    # -- what each family says -----------------------------------------------------------------------------------

    family = None  # the conversion.<family> module that classifies the family's tensor names
    family_config_keys = ()  # original config keys the family reads, beyond LLaVA-1.5's
    remote_code_entry_modules = ()  # () = TokenPacker's (modeling_tokenpacker.remote_code.ENTRY_MODULES)
    hub_commit_message = None  # None = TokenPacker's

    def vision_tower_hint(self, mm_vision_tower):
        """More words for the error when there is no vision tower at all."""
        return ""

    def validate_original_config(self, config, path):
        raise NotImplementedError(f"{type(self).__name__} must say which original configs it converts")

    def decide_family_weights(self):
        """Check the family's own tensors (projector, generator) in `self.shapes` and record their kind."""
        raise NotImplementedError(f"{type(self).__name__} must check its projector or generator weights")

    def decide_preset(self):
        """Pick `self.preset` (a dict from configuration/) or leave it None."""

    def decide_settings(self):
        """The family's model settings, from the original config and the preset; sets `self.dtype` if unset."""
        raise NotImplementedError(f"{type(self).__name__} must decide its model settings")

    def build_config(self):
        """`self.config`, the transformers config of the converted model."""
        raise NotImplementedError(f"{type(self).__name__} must build its config")

    def plan_settings(self):
        """What the family's `classify` needs to know (stored in the plan, read back by the verifier)."""
        return {}

    def model_class(self):
        raise NotImplementedError(f"{type(self).__name__} must name its model class")

    def auto_map(self):
        raise NotImplementedError(f"{type(self).__name__} must give its auto_map")

    def result_kind(self):
        """The projector (or generator) type reported in the result."""
        return self.family

    def write_processor(self, folder):
        raise NotImplementedError(f"{type(self).__name__} must write its processor")

    def write_model_card(self, folder, result):
        raise NotImplementedError(f"{type(self).__name__} must write its model card")
