"""LLaVA-1.5's two-stage recipe, one process or many (torchrun: DDP, or FSDP for large models).

stage1  vision and LLM frozen, projector trained on captions (plain template)   -> mm_projector.bin
stage2  projector + LLM trained (or LoRA on the LLM) on instructions (vicuna_v1) -> a liuhaotian checkpoint
lm      a language model alone, from scratch, on text (the "Vicuna" of a world that has none)

Global batch = micro batch x gradient accumulation x world size. Every `save_every` steps (and on
Ctrl-C) the trainable weights, optimizer, step and RNG state are saved; `resume` continues the same
loss curve from there.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.nn.parallel import DistributedDataParallel

from ..architectures import TextConfig
from ..errors import UserError
from ..llava_json import load_llava_json
from ..reference.checkpoint import assemble_llava
from ..reference.checkpoint_writer import save_liuhaotian, save_llama, save_projector
from ..reference.llama import Llama
from ..reference.llava import Llava, causal_lm_loss
from .data import LlavaDataset, collate, modality_length_grouped_batches
from .distributed import Dist, all_mean, barrier, init_distributed, maybe_no_sync, unwrapped, wrap_distributed
from .lora import add_lora, merge_lora
from .run_state import load_state, save_state, trainable_weights
from .schedule import cosine_lr

STAGE_DEFAULTS = {
    "stage1": dict(lr=1e-3, template="plain", global_batch_size=256),
    "stage2": dict(lr=2e-5, template="vicuna_v1", global_batch_size=128),
    "lm": dict(lr=1e-3, template="vicuna_v1", global_batch_size=64),
}


@dataclass
class TrainConfig:
    stage: str
    data: str
    output_dir: str
    image_folder: str | None = None  # default: the data json's folder
    llm: str | None = None  # LLaMA dir (stage1/2); for "lm" an optional config.json to start from
    vision_tower: str | None = None
    projector: str | None = None  # stage2: stage1's mm_projector.bin
    tokenizer: str | None = None  # default: the LLM dir's tokenizer.model
    text_config: dict = field(default_factory=dict)  # "lm": TextConfig fields
    template: str | None = None
    lr: float | None = None
    projector_lr: float | None = None  # stage2 with LoRA: LLaVA's mm_projector_lr
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    epochs: float = 1.0
    global_batch_size: int | None = None
    micro_batch_size: int = 16
    model_max_length: int = 2048
    group_by_modality_length: bool = False
    gradient_checkpointing: bool = False
    bf16: str = "auto"  # auto = on CUDA devices that support it
    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    fsdp: bool = False
    save_every: int = 100
    resume: bool = False
    seed: int = 42
    num_workers: int = 0
    cache_images: bool = False  # keep preprocessed pixels in memory (epochs over a small image set)
    log_every: int = 1
    progress: bool = True
    stop_after_steps: int | None = None  # stop (with a checkpoint) as if killed there; for tests

    def __post_init__(self):
        if self.stage not in STAGE_DEFAULTS:
            raise UserError(f"unknown stage {self.stage!r} (expected stage1, stage2 or lm)")
        for key, value in STAGE_DEFAULTS[self.stage].items():
            if getattr(self, key) is None:
                setattr(self, key, value)


# ----------------------------------------------------------------------------- model


class TextOnly(torch.nn.Module):
    """The language model alone with Llava's training signature (stage "lm")."""

    def __init__(self, language: Llama):
        super().__init__()
        self.language = language

    def forward(self, input_ids, pixel_values=None, labels=None, attn_2d=None):
        logits = self.language(self.language.embed_tokens(input_ids), attn_2d)
        return logits, causal_lm_loss(logits, labels)


def build_model(cfg: TrainConfig):
    """(model, llava config or None, tokenizer path, lr per trainable parameter name), with everything
    frozen that the stage freezes. Groups are by name: FSDP replaces the parameter objects."""
    if cfg.stage == "lm":
        text_fields = dict(cfg.text_config)
        if cfg.llm:
            text_fields = {**json.loads(Path(cfg.llm).read_text()), **text_fields}
        text = TextConfig(**{k: v for k, v in text_fields.items() if k in TextConfig.__dataclass_fields__})
        model = TextOnly(Llama(text))
        if not cfg.tokenizer:
            raise UserError("stage lm needs --tokenizer (a SentencePiece model)")
        return model, None, Path(cfg.tokenizer), {n: cfg.lr for n, _ in model.named_parameters()}

    if not cfg.llm or not cfg.vision_tower:
        raise UserError(f"{cfg.stage} needs --llm DIR and --vision-tower DIR")
    projector = cfg.projector if cfg.stage == "stage2" else None
    if cfg.stage == "stage2" and projector is None:
        raise UserError("stage2 starts from stage 1's projector: pass --projector PATH/mm_projector.bin")
    model, llava_cfg = assemble_llava(cfg.llm, cfg.vision_tower, projector)
    tokenizer = Path(cfg.tokenizer) if cfg.tokenizer else Path(cfg.llm) / "tokenizer.model"
    if not tokenizer.exists():
        raise UserError(f"{tokenizer}: tokenizer not found (pass --tokenizer)")

    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    projector_lr = cfg.lr
    if cfg.stage == "stage2":
        if cfg.lora_r > 0:
            add_lora(model.language, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
            for name, p in model.language.named_parameters():
                p.requires_grad_("lora_" in name)
            projector_lr = cfg.projector_lr or cfg.lr
        else:
            model.language.requires_grad_(True)
    lrs = {n: (projector_lr if n.startswith("projector.") else cfg.lr) for n, p in model.named_parameters() if p.requires_grad}
    return model, llava_cfg, tokenizer, lrs


def param_groups(wrapped, lrs: dict[str, float]) -> list[dict]:
    groups: dict[float, list] = {}
    for name, p in unwrapped(wrapped).named_parameters():
        if name in lrs:
            groups.setdefault(lrs[name], []).append(p)
    return [{"params": params, "lr": lr} for lr, params in groups.items()]


# ----------------------------------------------------------------------------- data order


def epoch_batches(dataset: LlavaDataset, cfg: TrainConfig, world: int, epoch: int) -> list[list[int]]:
    """The micro-batches of one epoch in consumption order: consecutive runs of `world` belong to one
    optimizer micro-step, batch j of a run to rank j. The same for every rank (seeded by epoch)."""
    g = torch.Generator().manual_seed(cfg.seed + epoch)
    if cfg.group_by_modality_length:
        return modality_length_grouped_batches(dataset.modality_lengths(), cfg.micro_batch_size, world, g)
    order = torch.randperm(len(dataset), generator=g).tolist()
    mb = cfg.micro_batch_size
    return [order[i : i + mb] for i in range(0, len(order) - mb + 1, mb)]


def full_state_model(wrapped, cfg: TrainConfig, llava_cfg, d: Dist):
    """The plain module with full weights, on rank 0 (None elsewhere). Collective under FSDP."""
    if isinstance(wrapped, DistributedDataParallel):
        return wrapped.module if d.main else None
    if not (d.world > 1 and cfg.fsdp):
        return wrapped
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(wrapped, options=opts)
    if not d.main:
        return None
    with torch.device("meta"):
        plain = TextOnly(Llama(wrapped.language.cfg)) if cfg.stage == "lm" else Llava(llava_cfg)
    if cfg.stage == "stage2" and cfg.lora_r > 0:
        add_lora(plain.language, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    plain.load_state_dict(full, assign=True)
    return plain


# ----------------------------------------------------------------------------- training loop


@dataclass
class Run:
    """What the steps of one training run share."""

    cfg: TrainConfig
    d: Dist
    run_dir: Path
    dataset: LlavaDataset
    wrapped: torch.nn.Module
    optimizer: torch.optim.Optimizer
    base_lrs: list[float]  # per parameter group, before the schedule
    params: list[torch.nn.Parameter]
    accum: int  # micro-batches per optimizer step and process
    steps_per_epoch: int
    total_steps: int
    warmup: int
    use_bf16: bool


def train(cfg: TrainConfig) -> dict:
    d = init_distributed()
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    run_dir = open_run_dir(cfg, out / "run", d)
    model, llava_cfg, tokenizer_path, lrs = build_model(cfg)
    if cfg.gradient_checkpointing:
        model.language.gradient_checkpointing = True
    run = prepare_run(cfg, d, run_dir, model, lrs, make_dataset(cfg, llava_cfg, tokenizer_path))
    start = load_state(run_dir, run.wrapped, run.optimizer, d) if cfg.resume else 0
    step, history, stopped = run_steps(run, start)
    if stopped:
        return {"stopped_at": step, "history": history}
    trainable = trainable_weights(run.wrapped)
    plain = full_state_model(run.wrapped, cfg, llava_cfg, d)
    if d.main:
        save_output(cfg, plain, llava_cfg, tokenizer_path, out)
    barrier(d)
    return {"steps": step, "history": history, "output_dir": str(out), "model": plain, "trainable": trainable}


def open_run_dir(cfg: TrainConfig, run_dir: Path, d: Dist) -> Path:
    """run/ with the config written into it; refuses to start over a run that --resume should continue."""
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    if not cfg.resume and (run_dir / "last").exists():
        raise UserError(f"{run_dir / 'last'} exists: pass --resume to continue that run, or pick a new --output-dir")
    return run_dir


def prepare_run(cfg: TrainConfig, d: Dist, run_dir: Path, model, lrs: dict[str, float], dataset: LlavaDataset) -> Run:
    """The step plan (accumulation, steps, warmup), the wrapped model and its optimizer."""
    accum = cfg.global_batch_size // (cfg.micro_batch_size * d.world)
    if accum < 1 or accum * cfg.micro_batch_size * d.world != cfg.global_batch_size:
        raise UserError(
            f"global batch {cfg.global_batch_size} is not a multiple of micro batch {cfg.micro_batch_size} x {d.world} processes"
        )
    batches_per_epoch = len(epoch_batches(dataset, cfg, d.world, 0)) // d.world
    steps_per_epoch = batches_per_epoch // accum
    total_steps = max(1, math.floor(steps_per_epoch * cfg.epochs))
    model.train()
    wrapped = wrap_distributed(model, cfg.fsdp, d)
    groups = param_groups(wrapped, lrs)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    use_bf16 = cfg.bf16 == "on" or (cfg.bf16 == "auto" and d.device.type == "cuda" and torch.cuda.is_bf16_supported())
    return Run(
        cfg, d, run_dir, dataset, wrapped, optimizer, base_lrs=[g["lr"] for g in groups],
        params=[p for g in groups for p in g["params"]], accum=accum, steps_per_epoch=steps_per_epoch,
        total_steps=total_steps, warmup=math.ceil(cfg.warmup_ratio * total_steps), use_bf16=use_bf16,
    )


def run_steps(run: Run, start: int) -> tuple[int, list[dict], bool]:
    """Optimizer steps from `start` to the end (or cfg.stop_after_steps), saving the state as configured and on
    Ctrl-C. Returns the step reached, each step's record, and whether it stopped at stop_after_steps."""
    cfg, d = run.cfg, run.d
    bar = None
    if cfg.progress and d.main:
        from tqdm import tqdm

        bar = tqdm(total=run.total_steps, initial=start, desc=cfg.stage, unit="step", dynamic_ncols=True)
    history = []
    step = start
    try:
        while step < run.total_steps:
            record = optimizer_step(run, step)
            step += 1
            history.append(record)
            if d.main:
                log_step(run.run_dir / "metrics.jsonl", record, bar)
            if step % cfg.save_every == 0 or step == run.total_steps or step == cfg.stop_after_steps:
                save_state(run.run_dir, run.wrapped, run.optimizer, step, d)
            if step == cfg.stop_after_steps:
                return step, history, True
    except KeyboardInterrupt:
        if step > start:
            save_state(run.run_dir, run.wrapped, run.optimizer, step, d)
        raise UserError(f"interrupted at step {step}; continue with --resume (state in {run.run_dir / 'last'})") from None
    finally:
        if bar is not None:
            bar.close()
    return step, history, False


def optimizer_step(run: Run, step: int) -> dict:
    """Optimizer step number step + 1: this process's micro-batches of it, accumulated, clipped, applied."""
    cfg, d = run.cfg, run.d
    epoch, in_epoch = divmod(step, run.steps_per_epoch)
    order = epoch_batches(run.dataset, cfg, d.world, epoch)
    first = in_epoch * run.accum * d.world
    micro = order[first : first + run.accum * d.world][d.rank :: d.world]
    t0 = time.perf_counter()
    lr_scale = cosine_lr(step, run.total_steps, run.warmup)
    for g, base_lr in zip(run.optimizer.param_groups, run.base_lrs):
        g["lr"] = base_lr * lr_scale
    loss_sum, n_samples = 0.0, 0
    for i, indices in enumerate(micro):
        loss_sum += micro_step(run, collate([run.dataset[j] for j in indices], pad_id=0), sync=i == len(micro) - 1)
        n_samples += len(indices)
    torch.nn.utils.clip_grad_norm_(run.params, 1.0)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    loss_avg = all_mean(loss_sum / len(micro), d)
    rate = n_samples * d.world / (time.perf_counter() - t0)
    return {"step": step + 1, "epoch": round((step + 1) / run.steps_per_epoch, 4), "loss": loss_avg,
            "lr": run.optimizer.param_groups[0]["lr"], "samples_per_s": round(rate, 2)}


def micro_step(run: Run, batch: dict, sync: bool) -> float:
    """Forward and backward of one micro-batch (its loss scaled for accumulation); returns the loss."""
    device = run.d.device
    with maybe_no_sync(run.wrapped, sync, run.d):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.use_bf16):
            _, loss = run.wrapped(
                batch["input_ids"].to(device),
                pixel_values=None if batch["pixel_values"] is None else batch["pixel_values"].to(device),
                labels=batch["labels"].to(device),
                attn_2d=batch["attention_mask"].to(device),
            )
        (loss / run.accum).backward()
    return loss.item()


def log_step(metrics_path: Path, record: dict, bar) -> None:
    with open(metrics_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", sps=f"{record['samples_per_s']:.1f}")


def make_dataset(cfg: TrainConfig, llava_cfg, tokenizer_path: Path) -> LlavaDataset:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    records = load_llava_json(cfg.data)
    if cfg.stage == "lm":
        records = [r for r in records if "image" not in r]
        if not records:
            raise UserError(f"{cfg.data}: stage lm needs text-only records (no 'image' key)")
    kwargs = {}
    if llava_cfg is not None:
        kwargs = dict(
            image_size=llava_cfg.vision.image_size, mean=llava_cfg.image_mean, std=llava_cfg.image_std,
            aspect=llava_cfg.aspect, image_token_id=llava_cfg.image_token_index,
        )
    return LlavaDataset(
        records, cfg.template, sp.encode, sp.bos_id(), sp.eos_id(),
        image_folder=cfg.image_folder or Path(cfg.data).parent, model_max_length=cfg.model_max_length,
        cache_images=cfg.cache_images, **kwargs,
    )


def save_output(cfg: TrainConfig, model, llava_cfg, tokenizer_path: Path, out: Path) -> None:
    if cfg.stage == "lm":
        save_llama(model.language, model.language.cfg, out, tokenizer_path)
    elif cfg.stage == "stage1":
        save_projector(model, out / "mm_projector.bin")
    else:
        merge_lora(model.language)
        save_liuhaotian(model, out, tokenizer_path)
