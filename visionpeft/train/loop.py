"""The one training loop: accelerate (devices, mixed precision, gradient accumulation,
DDP/FSDP through ``accelerate launch``), AdamW (8-bit with bitsandbytes), warmup
schedules, atomic checkpoints with exact resume, JSON-lines metrics and a loss plot,
a NaN guard. A `Task` supplies models, data and loss.

Exact resume: the data order of every epoch comes from (seed, epoch), the consumed
batches of the current epoch are skipped, and optimizer, scheduler and every process's
RNG states are restored, so a resumed run reproduces an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..core.atomic import write_file
from .checkpoint import list_checkpoints, load_checkpoint, resolve_checkpoint, rng_state, save_checkpoint
from .task import Task, TrainingError

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
PRECISIONS = ("no", "fp16", "bf16")


@dataclass
class TrainConfig:
    """The loop's settings; names follow the diffusers training examples."""

    output_dir: str = "output"
    seed: int = 0
    max_train_steps: int = 500
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    # the floor of lr_scheduler cosine (torch's CosineAnnealingLR eta_min; CLIP-LoRA: 1e-6)
    lr_min: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    use_8bit_adam: bool = False
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    validation_steps: int | None = None
    dataloader_num_workers: int = 0
    cpu: bool = False
    # vp.kernels(compiled=...) around this run (SNELL's torch.compile'd kernels), restored
    # afterwards; None leaves the process setting as it is
    compiled_kernels: bool | None = None

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"training config: {msg}")

        for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps",
                     "checkpointing_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(f"{name} must be an integer >= 1, got {v!r}")
        if self.lr_scheduler not in SCHEDULERS:
            bad(f"lr_scheduler must be one of {SCHEDULERS}, got {self.lr_scheduler!r}")
        if self.mixed_precision is False:  # YAML 1.1 reads an unquoted `no` (also from --set) as false
            self.mixed_precision = "no"
        if self.mixed_precision not in PRECISIONS:
            bad(f"mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}")
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            bad(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if not (isinstance(self.lr_min, (int, float)) and 0 <= self.lr_min < self.learning_rate):
            bad(f"lr_min must be >= 0 and below learning_rate {self.learning_rate}, got {self.lr_min!r}")
        if self.lr_min and self.lr_scheduler != "cosine":
            bad(f"lr_min is the floor of lr_scheduler cosine; it has no meaning for {self.lr_scheduler!r}")
        if self.compiled_kernels is not None and not isinstance(self.compiled_kernels, bool):
            bad(f"compiled_kernels must be true, false or null, got {self.compiled_kernels!r}")
        if self.resume_from_checkpoint not in (None, "latest") and not isinstance(self.resume_from_checkpoint, str):
            bad("resume_from_checkpoint must be null, 'latest' or a checkpoint folder")

    @classmethod
    def split(cls, values: dict) -> tuple["TrainConfig", dict]:
        """(loop settings, the rest) from one flat mapping."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names}), \
            {k: v for k, v in values.items() if k not in names}


@dataclass
class TrainResult:
    step: int
    output_dir: Path
    adapter_dir: Path | None
    losses: list[float] = field(default_factory=list)
    report: dict = field(default_factory=dict)


class EpochSampler(torch.utils.data.Sampler):
    """A permutation drawn from (seed, epoch) alone, so a resumed run sees the same order."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def _optimizer(params, cfg: TrainConfig, device: torch.device):
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError("use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    # one fused kernel for every tensor: adapters hold many small ones (WaRA a pair per
    # band), and AdamW's default on CPU loops over them one by one in Python
    flat = [p for g in params for p in g["params"]] if params and isinstance(params[0], dict) else params
    fused = device.type in fused_adamw_devices() and all(p.is_floating_point() for p in flat)
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)


def fused_adamw_devices() -> tuple[str, ...]:
    """Device types on which the loop runs AdamW fused (where this torch has the kernel)."""
    try:  # a private helper: a torch without it gets the default (unfused) AdamW
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
    except ImportError:
        return ()
    return tuple(d for d in ("cpu", "cuda") if d in _get_fused_kernels_supported_devices())


def _plot(metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(task: Task, cfg: TrainConfig) -> TrainResult:
    """Run ``task`` under ``cfg``; see the module docstring."""
    from accelerate.state import AcceleratorState, GradientState

    from ..ops.kernels import kernels

    try:
        with kernels(compiled=cfg.compiled_kernels):  # this run only; None keeps the caller's choice
            return _train(task, cfg)
    finally:
        # accelerate keeps one state per process: release it, so that the next train()
        # in this process (a notebook, a sweep) may choose another mixed precision.
        # Private, but accelerate (1.15) has no public reset: free_memory() keeps the state.
        AcceleratorState._reset_state()
        GradientState._reset_state()


def _train(task: Task, cfg: TrainConfig) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    out = Path(cfg.output_dir)
    # rng_types=[]: accelerate would otherwise re-synchronise RNGs across processes at
    # every epoch; our data order comes from (seed, epoch) and noise stays per process
    acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.cpu, rng_types=[],
                      gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    set_seed(cfg.seed)  # the same on every process: adapters start identical
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32)
    task.setup(acc.device, dtype)
    task.check_output(out)
    models = task.models()
    params = [p for m in models.values() for p in m.parameters() if p.requires_grad]
    if not params and task.trains_nothing:
        return _without_training(acc, task, models, out)
    if not params:
        raise TrainingError("the task's models have no trainable parameters")
    dataset = task.train_dataset()
    if len(dataset) == 0:
        raise TrainingError("the training set is empty")
    sampler = EpochSampler(len(dataset), cfg.seed)
    # the loader's own generator: each new iterator draws a worker seed from it, which from
    # the global RNG would shift the noise of a resumed run
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.train_batch_size, sampler=sampler,
                                         collate_fn=task.collate, num_workers=cfg.dataloader_num_workers,
                                         drop_last=task.drop_last and len(dataset) >= cfg.train_batch_size,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    exempt = {id(p) for m in models.values() for n, p in m.named_parameters()
              if p.requires_grad and task.no_weight_decay(n, p)}
    groups = params if not exempt else [
        {"params": [p for p in params if id(p) not in exempt]},
        {"params": [p for p in params if id(p) in exempt], "weight_decay": 0.0}]
    optimizer = _optimizer(groups, cfg, acc.device)
    scheduler = _scheduler(optimizer, cfg)
    names = list(models)
    *prepared, optimizer, loader = acc.prepare(*models.values(), optimizer, loader)
    prepared = dict(zip(names, prepared))
    for m in task.frozen_models().values():
        m.to(acc.device)

    step = consumed = 0
    ckpt = resolve_checkpoint(out, cfg.resume_from_checkpoint)
    if ckpt is None and list_checkpoints(out):
        raise TrainingError(f"{out} holds checkpoints of an earlier run ({list_checkpoints(out)[-1].name}); "
                            "resume it with resume_from_checkpoint: latest, or use another output_dir")
    if ckpt is not None:
        task.load_adapters({n: acc.unwrap_model(m) for n, m in prepared.items()}, ckpt)
        state = load_checkpoint(ckpt, optimizer, scheduler, acc.process_index)
        step = state["step"]
        task.load_state_dict(state["task"])
        # micro-batches, not steps * accumulation: accelerate also steps at every epoch end
        consumed = state["extra"].get("consumed", step * cfg.gradient_accumulation_steps)
        acc.print(f"resumed from {ckpt} at step {step}")
    if ckpt is None:  # per-process noise from here on (a resumed run restored its RNG)
        set_seed(cfg.seed + 1 + acc.process_index)

    batches_per_epoch = len(loader)
    metrics_path = out / "metrics.jsonl"
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if ckpt is None and metrics_path.exists():
            metrics_path.unlink()
        elif ckpt is not None:
            _drop_rows_after(metrics_path, step)  # rows logged after the checkpoint are redone
            for later in list_checkpoints(out):  # checkpoints of the abandoned continuation
                if int(later.name.split("-")[1]) > step:
                    shutil.rmtree(later, ignore_errors=True)
    losses: list[float] = []
    progress = tqdm(total=cfg.max_train_steps, initial=step, desc="train", disable=not acc.is_main_process)
    micro: list[float] = []
    for m in prepared.values():
        m.train()
    while step < cfg.max_train_steps:
        epoch, skip = divmod(consumed, batches_per_epoch)
        sampler.set_epoch(epoch)
        if hasattr(dataset, "set_epoch"):  # per-epoch augmentation draws, replayable on resume
            dataset.set_epoch(epoch)
        batches = acc.skip_first_batches(loader, skip) if skip else loader
        if hasattr(batches, "set_epoch"):  # accelerate re-sets its sampler's epoch on iteration
            batches.set_epoch(epoch)
        for batch in batches:
            with acc.accumulate(*prepared.values()):
                loss, logs = task.loss(prepared, batch)
                finite = acc.gather(torch.isfinite(loss.detach()).float().reshape(1)).min() > 0
                if not finite:
                    good = list_checkpoints(out)
                    raise TrainingError(f"loss became {float(loss.detach())} at step {step + 1}; stopped. "
                                        f"Last good checkpoint: {good[-1] if good else 'none'}")
                acc.backward(loss)
                if acc.sync_gradients:
                    task.after_backward(prepared, step + 1)
                if acc.sync_gradients and cfg.max_grad_norm:
                    acc.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()  # accelerate skips it while gradients accumulate
                if acc.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            consumed += 1
            micro.append(loss.detach().float())
            if not acc.sync_gradients:
                continue
            step += 1
            # the mean over this step's micro-batches and processes
            value = acc.gather(torch.stack(micro).mean().reshape(1)).mean().item()
            micro.clear()
            losses.append(value)
            progress.update(1)
            progress.set_postfix(loss=f"{value:.4g}")
            if acc.is_main_process:
                row = {"step": step, "loss": value, "lr": scheduler.get_last_lr()[0],
                       **{k: float(v) for k, v in logs.items()}}
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            if step % cfg.checkpointing_steps == 0 or step == cfg.max_train_steps:
                _checkpoint(acc, task, prepared, out, step, consumed, optimizer, scheduler, cfg)
            if cfg.validation_steps and step % cfg.validation_steps == 0 and acc.is_main_process:
                # validation must not move the training RNG (a resumed run would diverge)
                devices = [acc.device.index or 0] if acc.device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):
                    task.validate({n: acc.unwrap_model(m) for n, m in prepared.items()}, step, out)
            if step >= cfg.max_train_steps:
                break
    progress.close()
    acc.wait_for_everyone()
    report = {}
    adapter_dir = out / "adapter"
    unwrapped = {n: acc.unwrap_model(m) for n, m in prepared.items()}
    report["param_checksums"] = _checksums(acc, params)
    if acc.is_main_process:
        from ..core.atomic import write_dir

        write_dir(adapter_dir, lambda tmp: task.save_adapters(unwrapped, tmp))
        rows = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
        if rows:
            _plot(rows, out / "loss.png")
        report.update(task.finish(unwrapped, out))
        _write_json(out / "train_report.json", {"step": step, **report})
    acc.wait_for_everyone()
    acc.end_training()
    return TrainResult(step, out, adapter_dir, losses, report)


def _scheduler(optimizer, cfg: TrainConfig):
    from diffusers.optimization import get_scheduler

    if cfg.lr_scheduler == "cosine" and cfg.lr_min:
        # cosine from the peak down to lr_min (not 0) after the warmup, as torch's
        # CosineAnnealingLR(T_max=steps - warmup, eta_min=lr_min)
        import math

        warm, total, floor = cfg.lr_warmup_steps, cfg.max_train_steps, cfg.lr_min / cfg.learning_rate

        def factor(step: int) -> float:
            if step < warm:
                return step / max(1, warm)
            t = min(1.0, (step - warm) / max(1, total - warm))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                         num_training_steps=cfg.max_train_steps, num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)


def _without_training(acc, task: Task, models: dict, out: Path) -> TrainResult:
    """A task with nothing to train (a zero-shot baseline): its output folder and report
    as a trained run would write them, at step 0."""
    from ..core.atomic import write_dir

    if list_checkpoints(out) or (out / "adapter").exists():
        raise TrainingError(f"{out} holds the output of an earlier run; use another output_dir")
    report: dict = {}
    adapter_dir = out / "adapter"
    models = {n: m.to(acc.device) for n, m in models.items()}
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_dir(adapter_dir, lambda tmp: task.save_adapters(models, tmp))
        report.update(task.finish(models, out))
        _write_json(out / "train_report.json", {"step": 0, **report})
    acc.wait_for_everyone()
    acc.end_training()
    return TrainResult(0, out, adapter_dir, [], report)


def _write_json(path: Path, value: dict) -> None:
    text = json.dumps(value, indent=2)  # serialised first: a bad value leaves the old file
    write_file(path, lambda tmp: Path(tmp).write_text(text))


def _drop_rows_after(path: Path, step: int) -> None:
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))


def _checkpoint(acc, task, prepared, out, step, consumed, optimizer, scheduler, cfg):
    from accelerate.utils import gather_object

    states = gather_object([rng_state()])
    if acc.is_main_process:
        unwrapped = {n: acc.unwrap_model(m) for n, m in prepared.items()}
        save_checkpoint(out, step, optimizer, scheduler, lambda tmp: task.save_adapters(unwrapped, tmp),
                        states, extra={"consumed": consumed}, keep=cfg.checkpoints_total_limit,
                        task_state=task.state_dict())
    acc.wait_for_everyone()


def _checksums(acc, params) -> list[float]:
    """One number per process summarising the trained weights: DDP must keep them equal."""
    local = torch.stack([p.detach().double().sum() + p.detach().double().abs().sum() * 1e-3 for p in params]).sum()
    return acc.gather(local.float().reshape(1).to(acc.device)).tolist()
