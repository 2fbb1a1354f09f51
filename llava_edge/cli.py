"""The `llava-edge` command: parse, call, print. Heavy imports happen inside the commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import UserError
from .extras import require_extra, require_heavy
from .caption.caption_config import VISION_BATCH, CaptionConfig
from .eval.eval_config import EvalConfig
from .runtime.engine_config import DEFAULT_DEVICE, DEVICE_HELP, MAX_DEFAULT_N_CTX, EngineConfig
from .runtime.kv_type import KV_TYPE_HELP
from .runtime.sampling import SamplingConfig
from .server.server_config import ServerConfig

# rich_markup_mode=None: typer 0.29's rich help panel prints every option's type, flags included (`--json <bool>`,
# even `--help <bool>`), though a flag takes no value; its plain formatter leaves the type off flags.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        from . import __version__

        try:
            typer.echo(f"llava-edge {version('llava-edge')}")
        except PackageNotFoundError:  # run from a source tree that pip never installed
            typer.echo(f"llava-edge {__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    show_version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version"),
):
    """Run LLaVA-1.5 on edge devices: export a checkpoint to an edge bundle, chat with it, serve it, bench it."""


def default(config: type, name: str):
    """A config dataclass's default for one field: the CLI states no default of its own."""
    return config.__dataclass_fields__[name].default


IMAGE_TOKENS_HELP = ("tokens per image: fewer prefill faster (VisionZip-style selection in the vision graph; "
                     "default: all, as the model was trained)")
FORMAT_HELP = "json (any JSON object) or a JSON schema file: the answer is held to it"


def _check_threads(threads: Optional[int]) -> None:
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1 (got {threads})")


@app.command()
def info(
    ckpt: str = typer.Argument(..., help="checkpoint dir or name (llava-hf or liuhaotian layout)"),
    vision_tower: Optional[str] = typer.Option(None, help="CLIP vision dir for liuhaotian checkpoints"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
):
    """Format, dimensions, image size, image tokens, parameter counts and vocab of a checkpoint."""
    require_heavy("info", ("export",))
    from .reference.info import checkpoint_info, format_info

    summary = checkpoint_info(ckpt, vision_tower)
    typer.echo(json.dumps(summary, indent=2) if as_json else format_info(summary))


@app.command()
def export(
    ckpt: str = typer.Option(..., help="checkpoint dir or name (llava-hf or liuhaotian layout; local or HF cache)"),
    out: str = typer.Option(..., help="bundle dir to write (atomically)"),
    quant: str = typer.Option("Q4_K_M", help="Q4_K_M|Q4_0|Q5_K_M|Q8_0|F16|F32"),
    vision_precision: str = typer.Option("auto", help="auto|fp32|fp16|int8 (auto: int8 only at cosine >= 0.999)"),
    vision_tower: Optional[str] = typer.Option(None, help="CLIP vision dir for liuhaotian checkpoints"),
    mmproj: bool = typer.Option(False, help="also write a llama.cpp mmproj GGUF of the same vision weights"),
    overwrite: bool = typer.Option(False, help="replace an existing bundle dir"),
    threads: Optional[int] = typer.Option(None, help="CPU threads for ONNX Runtime / llama.cpp"),
):
    """Checkpoint -> edge bundle: vision ONNX + 4-bit GGUF decoder + manifest with measured parity."""
    _check_threads(threads)
    require_heavy("export", ("export",))
    from .export.pipeline import ExportOptions, export_bundle
    from .quiet import quiet_third_party

    quiet_third_party()

    manifest = export_bundle(ExportOptions(ckpt, out, quant, vision_precision, vision_tower, mmproj, overwrite, threads))
    p = manifest["parity"]
    typer.echo(f"wrote {out}: vision {manifest['vision']['precision']} (cosine {p['vision']['cosine_min']:.6f}), "
               f"decoder {manifest['decoder']['quant']}")
    from .peak_memory import format_peaks

    typer.echo(format_peaks(manifest["export"]))


@app.command()
def chat(
    image: Path = typer.Argument(..., help="an image file (PNG, JPEG, WebP, GIF, BMP, TIFF)"),
    bundle: Optional[Path] = typer.Option(None, help="edge bundle dir (default: the demo bundle in the package)"),
    prompt: Optional[str] = typer.Option(None, help="one question, one answer on stdout; without it, interactive chat"),
    max_tokens: int = typer.Option(default(SamplingConfig, "max_tokens"), help="most tokens per answer"),
    temperature: float = typer.Option(default(SamplingConfig, "temperature"),
                                      help="0 = greedy and deterministic; > 0 samples"),
    top_p: float = typer.Option(default(SamplingConfig, "top_p"), help="nucleus sampling (with temperature > 0)"),
    seed: Optional[int] = typer.Option(default(SamplingConfig, "seed"), help="sampling seed"),
    as_json: bool = typer.Option(False, "--json", help="with --prompt: one JSON object with the answer and timings; "
                                                       "without it, one JSON line per question read from stdin"),
    image_tokens: Optional[int] = typer.Option(default(EngineConfig, "image_tokens"), help=IMAGE_TOKENS_HELP),
    answer_format: Optional[str] = typer.Option(None, "--format", help=FORMAT_HELP),
    device: str = typer.Option(DEFAULT_DEVICE, help=DEVICE_HELP),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: all)"),
    n_ctx: Optional[int] = typer.Option(None, help=f"context length (default: the model's, at most "
                                                  f"{MAX_DEFAULT_N_CTX}; more is cut to the model's trained context)"),
    cache_dir: Optional[Path] = typer.Option(None, help="keep image embeddings here too (.npy per image content)"),
    kv_cache_dir: Optional[Path] = typer.Option(
        None, help="keep the KV of the image prompt here: a later run about the same image skips its prefill"),
    kv_type: str = typer.Option(default(EngineConfig, "kv_type"), help=KV_TYPE_HELP),
):
    """Ask about an image with an edge bundle (ONNX Runtime vision + llama.cpp decoder)."""
    from .chat import answer_once, demo_note, repl
    from .runtime import ChatSession, Model
    from .runtime.constraint import format_argument

    _check_threads(threads)
    sampling = SamplingConfig(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                              format=format_argument(answer_format))
    model = Model.open(bundle, device=device, threads=threads, image_cache_dir=cache_dir)
    config = EngineConfig(parallel=1, n_ctx=n_ctx, image_tokens=image_tokens, kv_type=kv_type,
                          kv_cache_dir=str(kv_cache_dir) if kv_cache_dir else None)
    session = ChatSession(model, config, owns_model=True)
    if prompt is not None:
        answer_once(session, image, prompt, sampling, as_json)
        demo_note(model)
    else:
        repl(session, image, sampling, note=demo_note(model, print_it=False), as_json=as_json)


@app.command()
def caption(
    inputs: list[str] = typer.Argument(..., help="image files, folders and glob patterns"),
    out: Path = typer.Option(..., help="JSONL file: one line per image; a rerun with the same file skips what is done"),
    prompt: str = typer.Option(default(CaptionConfig, "prompt"), help="what to ask about every image"),
    bundle: Optional[Path] = typer.Option(None, help="edge bundle dir (default: the demo bundle in the package)"),
    parallel: int = typer.Option(default(CaptionConfig, "parallel"),
                                 help="answers decoded at once (sequences in the one llama.cpp context)"),
    max_tokens: int = typer.Option(default(CaptionConfig, "max_tokens"), help="most tokens per answer"),
    temperature: float = typer.Option(default(CaptionConfig, "temperature"),
                                      help="0 = greedy: each answer equals `chat --prompt`'s"),
    seed: Optional[int] = typer.Option(default(CaptionConfig, "seed"), help="sampling seed (with temperature > 0)"),
    recursive: bool = typer.Option(default(CaptionConfig, "recursive"),
                                   help="also the images in subfolders of the folders given"),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: all)"),
    device: str = typer.Option(default(CaptionConfig, "device"), help=DEVICE_HELP),
    vision_batch: Optional[int] = typer.Option(None, help=f"images per vision run (default {VISION_BATCH}; 1 for int8 "
                                                          "graphs, whose batch mates would change an image's embeddings)"),
    image_tokens: Optional[int] = typer.Option(default(CaptionConfig, "image_tokens"), help=IMAGE_TOKENS_HELP),
    answer_format: Optional[str] = typer.Option(None, "--format", help=FORMAT_HELP + " (each line also gets it "
                                                                      "parsed, as `parsed`)"),
    ray: Optional[str] = typer.Option(None, help="caption on a Ray cluster: local (start one here), auto, HOST:PORT "
                                                 "or ray://HOST:PORT; the paths must be readable on every node"),
    workers: Optional[int] = typer.Option(None, help="with --ray: engines (Ray actors), each --threads cores "
                                                     "(default: one per node, the cores it can have)"),
    kv_type: str = typer.Option(default(CaptionConfig, "kv_type"), help=KV_TYPE_HELP),
):
    """Caption (or ask one question about) every image of a folder: a JSONL line per image, resumable."""
    from .caption.local_run import format_summary, run_caption
    from .chat import DEMO_NOTE
    from .runtime.constraint import format_argument

    _check_threads(threads)
    if workers is not None and ray is None:
        raise UserError("--workers needs --ray (a local run has one engine; --parallel sets its sequences)")
    cfg = CaptionConfig(inputs, str(out), prompt, str(bundle) if bundle else None, parallel, max_tokens,
                        temperature, seed, recursive, threads, device, vision_batch, image_tokens, kv_type=kv_type,
                        format=format_argument(answer_format))
    if ray is not None:
        require_extra("caption --ray", "ray")
        from .caption.ray_run import RayConfig, run_caption_ray

        summary = run_caption_ray(cfg, RayConfig(ray, workers))
    else:
        summary = run_caption(cfg)
    print(format_summary(summary, out), file=sys.stderr)
    if summary.demo:
        print(DEMO_NOTE, file=sys.stderr)
    if summary.exit_code:
        raise typer.Exit(summary.exit_code)


@app.command()
def train(
    stage: str = typer.Argument(..., help="stage1 (projector on captions), stage2 (instructions) or lm (text only)"),
    data: str = typer.Option(..., help="LLaVA json: stage1 captions, stage2 conversations, lm text-only records"),
    output_dir: str = typer.Option(..., help="where the run state and the result go"),
    llm: Optional[str] = typer.Option(None, help="LLaMA dir (stage1/2); lm: a config.json to start from"),
    vision_tower: Optional[str] = typer.Option(None, help="CLIP vision dir"),
    projector: Optional[str] = typer.Option(None, help="stage2: stage 1's mm_projector.bin"),
    tokenizer: Optional[str] = typer.Option(None, help="SentencePiece model (default: the LLM dir's)"),
    image_folder: Optional[str] = typer.Option(None, help="image paths are relative to this (default: the json's dir)"),
    lr: Optional[float] = typer.Option(None, help="peak learning rate (stage1 1e-3, stage2 2e-5)"),
    projector_lr: Optional[float] = typer.Option(None, help="stage2 with LoRA: the projector's own lr"),
    epochs: float = typer.Option(1.0),
    global_batch_size: Optional[int] = typer.Option(None, help="stage1 256, stage2 128"),
    micro_batch_size: int = typer.Option(16, help="per process; the rest is gradient accumulation"),
    weight_decay: float = typer.Option(0.0),
    warmup_ratio: float = typer.Option(0.03),
    model_max_length: int = typer.Option(2048),
    group_by_modality_length: bool = typer.Option(False),
    gradient_checkpointing: bool = typer.Option(False),
    cache_images: bool = typer.Option(False, help="keep preprocessed images in memory (many epochs, few images)"),
    bf16: str = typer.Option("auto", help="auto|on|off"),
    lora_r: int = typer.Option(0, help="stage2: LoRA rank (0 = train the LLM in full)"),
    lora_alpha: float = typer.Option(16.0),
    lora_dropout: float = typer.Option(0.05),
    fsdp: bool = typer.Option(False, help="under torchrun: shard the model with FSDP instead of DDP"),
    save_every: int = typer.Option(100, help="checkpoint every N optimizer steps"),
    resume: bool = typer.Option(False, help="continue the run in --output-dir from its last checkpoint"),
    seed: int = typer.Option(42),
):
    """Train with LLaVA-1.5's recipe (run under torchrun for several processes)."""
    require_heavy("train", ("train",))
    from .train.recipe import TrainConfig
    from .train.recipe import train as run_training

    cfg = TrainConfig(**{k: v for k, v in locals().items() if k in TrainConfig.__dataclass_fields__})
    result = run_training(cfg)
    typer.echo(f"{stage}: {result['steps']} steps, final loss {result['history'][-1]['loss']:.4f} -> {output_dir}"
               if result["history"] else f"{stage}: nothing left to train in {output_dir}")


@app.command("eval")
def eval_(
    benchmark: str = typer.Argument(..., help="pope|mme|mmbench|seed|shapes"),
    data: str = typer.Argument(..., help="the benchmark's files as LLaVA-1.5 lays them out (docs/eval.md), e.g. "
                                         "playground/data/eval/pope; for shapes, the world's test.json"),
    bundle: Optional[str] = typer.Option(None, help="edge bundle dir: answer with the runtime"),
    ckpt: Optional[str] = typer.Option(None, help="checkpoint dir or name: answer with the reference (with --bundle: "
                                                  "side by side)"),
    compare: Optional[str] = typer.Option(None, help="an earlier run's --predictions: its answers are the reference "
                                                     "column beside --bundle"),
    image_tokens: Optional[str] = typer.Option(None, help="tokens per image for the bundle, or a sweep: 576,192,64 "
                                                          "('all' or the image's token count: every token)"),
    parallel: int = typer.Option(default(EvalConfig, "parallel"),
                                 help="answers decoded together by the bundle's engine"),
    limit: Optional[int] = typer.Option(None, help="only the first N questions"),
    predictions: Optional[str] = typer.Option(None, help="append every answer here (JSONL); a rerun resumes from it"),
    report: Optional[str] = typer.Option(None, help="write a markdown report (and a PNG when K is swept) here"),
    max_tokens: int = typer.Option(default(EvalConfig, "max_tokens"), help="most tokens per answer"),
    threads: Optional[int] = typer.Option(None, help="CPU threads"),
    device: str = typer.Option(DEFAULT_DEVICE, help=DEVICE_HELP),
    kv_type: str = typer.Option(default(EvalConfig, "kv_type"), help=KV_TYPE_HELP),
    vision_tower: Optional[str] = typer.Option(None, help="CLIP vision dir for liuhaotian checkpoints"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    all_metrics: bool = typer.Option(False, "--all-metrics", help="every metric, not only the paper's"),
):
    """LLaVA-1.5's benchmarks on a bundle, its reference, or both side by side (greedy, LLaVA's prompts and
    answer parsing)."""
    from .eval.eval_config import parse_sweep
    from .eval.run import run_eval
    from .eval.table import as_json as table_json, markdown_table, rows_of

    cfg = EvalConfig(benchmark, data, bundle, ckpt, compare, parse_sweep(image_tokens), parallel, limit, predictions,
                     max_tokens, threads, device, kv_type=kv_type)
    reference = None
    if ckpt is not None:
        require_heavy("eval --ckpt", ("train",))
        from .train.reference_answers import answer_prompts

        def reference(items, k):
            return answer_prompts(ckpt, items, vision_tower=vision_tower, image_tokens=k, max_new_tokens=max_tokens)
    run = run_eval(cfg, reference)
    if run.interrupted:
        typer.echo("llava-edge: interrupted: run the same command again to continue"
                   + ("" if predictions else " (with --predictions FILE to keep the answers)"), err=True)
        raise typer.Exit(130)
    rows = rows_of(run, all_metrics)
    if report:
        from .eval.sweep_report import write_report

        for path in write_report(run, report):
            typer.echo(f"wrote {path}", err=True)
    typer.echo(json.dumps(table_json(run, rows), indent=2) if as_json else markdown_table(rows))
    if run.failed:
        typer.echo(f"llava-edge: {run.failed} answers failed in the engine; rerun with --predictions to ask them "
                   "again", err=True)


@app.command()
def build_demo(
    out_dir: str = typer.Option("runs/demo", help="work dir: data, parts, stages, report"),
    install: bool = typer.Option(False, help="also replace the demo model installed in the package (its checkpoint "
                                             "and bundle) with the new build"),
):
    """Rebuild the demo model from nothing on CPU (shapes world, CLIP tower, LM, stage 1, stage 2, eval), about
    40 minutes on 2 cores. The result stays in --out-dir; the installed demo changes only with --install."""
    require_heavy("build-demo", ("train", "export"))
    from .quiet import quiet_third_party

    quiet_third_party()
    from .demo.build import DemoConfig, build_demo as run

    run(DemoConfig(out_dir=out_dir, install=install))


@app.command()
def bench(
    out_dir: str = typer.Option("bench/reports", help="where <device-id>.json / .md / .png go"),
    work_dir: str = typer.Option("runs/bench", help="models made for the bench (kept for the next run)"),
    threads: Optional[int] = typer.Option(None, help="CPU threads for every path (default: all cores)"),
    runs: int = typer.Option(5, help="timed runs per metric, after one warm-up"),
    n_decode: int = typer.Option(32, help="tokens decoded per answer"),
    quick: bool = typer.Option(False, help="1 decoder block, the bundle's vision graph only, no PyTorch path"),
    shape: str = typer.Option("small", help="7B-shape decoder depth: small (2 blocks) or 7b (all 32; needs ~30 GB disk)"),
    case: list[str] = typer.Option(["demo", "llava7b"], help="cases to run: demo, llava7b"),
    torch_baseline: bool = typer.Option(True, help="also time the PyTorch eager reference"),
):
    """Latency and memory of llava-edge vs llama.cpp's own LLaVA path on this device, with a report."""
    import os

    _check_threads(threads)
    require_heavy("bench", ("bench",))

    from .bench.harness import BenchConfig, run_bench

    if shape not in ("small", "7b") or not set(case) <= {"demo", "llava7b"} or runs < 1 or n_decode < 2:
        raise UserError("--shape is small|7b, --case demo|llava7b, --runs >= 1, --n-decode >= 2")
    cfg = BenchConfig(out_dir, work_dir, threads or os.cpu_count() or 1, runs, n_decode, quick, shape, tuple(case),
                      torch_baseline)
    report = run_bench(cfg)
    typer.echo(f"wrote {out_dir}/{report['device']['id']}.md ({report['seconds']:.0f} s)")
    typer.echo(json.dumps(report["ratios"], indent=2))


@app.command()
def serve(
    bundle: Optional[Path] = typer.Option(None, help="edge bundle dir (default: the demo bundle in the package)"),
    host: str = typer.Option(default(ServerConfig, "host"), help="address to bind (0.0.0.0: every interface)"),
    port: int = typer.Option(default(ServerConfig, "port"), help="TCP port (0: any free one; the printed URL names it)"),
    parallel: int = typer.Option(default(EngineConfig, "parallel"),
                                 help="requests decoded at once (sequences in the one llama.cpp context)"),
    n_ctx: Optional[int] = typer.Option(
        None, help=f"context positions per sequence (default: the model's, at most {MAX_DEFAULT_N_CTX})"),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: all)"),
    api_key: Optional[str] = typer.Option(None, help="require Authorization: Bearer KEY (all but /health)"),
    media_dir: Optional[Path] = typer.Option(None, help="file:// image URLs are allowed inside this dir only"),
    allow_remote_images: bool = typer.Option(False, help="fetch http(s) image URLs"),
    model_name: Optional[str] = typer.Option(None, help="the model's name in both APIs (default: the bundle dir's)"),
    queue: int = typer.Option(default(EngineConfig, "queue"), help="requests that may wait for a slot; more get 503"),
    max_images: int = typer.Option(default(ServerConfig, "max_images"), help="images per request"),
    image_tokens: Optional[int] = typer.Option(
        default(EngineConfig, "image_tokens"),
        help=IMAGE_TOKENS_HELP + "; a request's image_tokens (OpenAI) or options.image_tokens (Ollama) wins"),
    device: str = typer.Option(DEFAULT_DEVICE, help=DEVICE_HELP),
    kv_cache_dir: Optional[Path] = typer.Option(
        None, help="keep the KV of each image prompt here: a restarted server skips the prefill of images it saw"),
    kv_type: str = typer.Option(default(EngineConfig, "kv_type"), help=KV_TYPE_HELP),
    temperature: float = typer.Option(default(ServerConfig, "temperature"),
                                      help="for requests that send none (0: greedy, the answers `chat` gives)"),
    top_p: float = typer.Option(default(ServerConfig, "top_p"), help="for requests that send none (with temperature > 0)"),
    seed: Optional[int] = typer.Option(default(ServerConfig, "seed"), help="for requests that send none (with temperature > 0)"),
    quiet: bool = typer.Option(not default(ServerConfig, "request_log"), "--quiet", help="no line per request on stderr"),
):
    """OpenAI- and Ollama-compatible HTTP server (chat with images, several requests at once)."""
    from .chat import demo_note
    from .runtime import Model
    from .server.serve import serve as run_server

    _check_threads(threads)
    name = model_name or ("llava-edge-demo" if bundle is None else bundle.resolve().name)
    engine_config = EngineConfig(parallel=parallel, n_ctx=n_ctx, queue=queue, image_tokens=image_tokens, kv_type=kv_type,
                                 kv_cache_dir=str(kv_cache_dir) if kv_cache_dir else None)
    server_config = ServerConfig(host=host, port=port, model_name=name, api_key=api_key,
                                 media_dir=str(media_dir) if media_dir else None,
                                 allow_remote_images=allow_remote_images, max_images=max_images,
                                 temperature=temperature, top_p=top_p, seed=seed, request_log=not quiet)
    model = Model.open(bundle, device=device, threads=threads)
    try:
        run_server(model, engine_config, server_config, note=demo_note(model, print_it=False))
    finally:
        model.close()


def main() -> None:
    try:
        app()
    except UserError as e:
        print(f"llava-edge: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
