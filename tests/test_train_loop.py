"""The shared training loop on a toy regression task: learning, exact resume, NaN guard,
checkpoint rotation and atomicity, metrics and plot."""
import json

import pytest
import torch
from torch import nn

import visionpeft as vp
from visionpeft.train import Task, TrainConfig, TrainingError, train
from visionpeft.train.checkpoint import list_checkpoints


class ToyTask(Task):
    """Fit y = W* x with a LoRA on a frozen random Linear; optional NaN or crash at a step."""

    def __init__(self, nan_at=None, crash_at=None, method="lora", n=64):
        self.nan_at, self.crash_at, self.method, self.calls, self.n = nan_at, crash_at, method, 0, n

    def setup(self, device, dtype):
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(self.n, 6, generator=g)
        self.model = nn.Sequential(nn.Linear(6, 5))
        with torch.no_grad():  # a target a rank-2 update can reach
            shift = 0.3 * torch.randn(5, 2, generator=g) @ torch.randn(2, 6, generator=g)
            self.y = self.model(self.x) + self.x @ shift.t()
        cfg = {"lora": vp.LoRAConfig(r=2, target_modules=["0"]),
               "krona": vp.KronAConfig(target_modules=["0"]),
               "snell": vp.SNELLConfig(r=2, sparsity=0.5, target_modules=["0"])}[self.method]
        vp.inject(self.model, cfg)

    def models(self):
        return {"net": self.model}

    def train_dataset(self):
        return torch.utils.data.TensorDataset(self.x, self.y)

    def loss(self, models, batch):
        from visionpeft.ops.compiled import compiled_kernels_enabled

        self.compiled_seen = compiled_kernels_enabled()
        self.calls += 1
        if self.crash_at is not None and self.calls == self.crash_at:
            raise KeyboardInterrupt("simulated interruption")
        x, y = batch
        noise = torch.randn(x.shape) * 0.01  # uses the global RNG, as diffusion noise does
        loss = ((models["net"](x + noise) - y) ** 2).mean()
        if self.nan_at is not None and self.calls >= self.nan_at:
            loss = loss * float("nan")
        return loss, {"n": torch.tensor(float(len(x)))}

    def validate(self, models, step, output_dir):
        torch.randn(100)  # draws from the global RNG: the loop must shield training from it
        return {}


class SnellaTask(ToyTask):
    """Two SNELL layers whose sparsities SNELLA's allocator moves from ``after_backward``;
    its EMAs go into the checkpoints through ``state_dict``."""

    def setup(self, device, dtype):
        from visionpeft.methods.snella import SNELLAAllocator

        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(self.n, 6, generator=g)
        self.model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))
        with torch.no_grad():
            self.y = self.model(self.x) + 0.3 * torch.randn(self.n, 5, generator=g)
        vp.inject(self.model, vp.SNELLConfig(r=2, sparsity=0.5, target_modules=["0", "2"]))
        self.alloc = SNELLAAllocator(self.model, target_sparsity=0.8, total_steps=12)
        self.seen = []

    def after_backward(self, models, step):
        self.seen.append((step, all(m.A.grad is not None for m in self.alloc.modules)))
        self.alloc.step(step)

    def state_dict(self):
        return {"snella": self.alloc.state_dict()}

    def load_state_dict(self, state):
        self.alloc.load_state_dict(state["snella"])


def _cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_train_steps=12, train_batch_size=8, learning_rate=5e-2,
                checkpointing_steps=4, lr_scheduler="cosine", lr_warmup_steps=2, cpu=True)
    return TrainConfig(**{**base, **kw})


def _adapter(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "net" / "adapter_model.safetensors"))


def test_loss_falls_metrics_plot_and_rotation(tmp_path):
    res = train(ToyTask(), _cfg(tmp_path, checkpoints_total_limit=2, learning_rate=0.1))
    assert res.step == 12 and sum(res.losses[-3:]) < 0.5 * sum(res.losses[:3])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13)) and rows[0]["lr"] < rows[2]["lr"]  # warmup
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-8", "checkpoint-12"]
    model = nn.Sequential(nn.Linear(6, 5))
    vp.load_adapter(model, tmp_path / "adapter" / "net")
    assert vp.trainable_parameters(model) > 0


@pytest.mark.parametrize("accumulate,n,crash_at", [(1, 64, 7), (2, 64, 14), (2, 24, 9)])
def test_resume_reproduces_an_uninterrupted_run(tmp_path, accumulate, n, crash_at):
    """Also with 3 batches per epoch and accumulation 2: accelerate then steps at each
    epoch end with one micro-batch, so resuming must count micro-batches, not steps."""
    kw = dict(gradient_accumulation_steps=accumulate, validation_steps=3)
    full = train(ToyTask(n=n), _cfg(tmp_path / "full", **kw))
    with pytest.raises(KeyboardInterrupt):  # dies after checkpoint-4, before checkpoint-8
        train(ToyTask(n=n, crash_at=crash_at), _cfg(tmp_path / "cut", **kw))
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["checkpoint-4"]
    resumed = train(ToyTask(n=n), _cfg(tmp_path / "cut", resume_from_checkpoint="latest", **kw))
    assert resumed.step == full.step == 12
    a, b = _adapter(tmp_path / "full" / "adapter"), _adapter(tmp_path / "cut" / "adapter")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # rows logged after checkpoint-4 were dropped and redone


def test_a_fresh_run_refuses_a_folder_with_checkpoints(tmp_path):
    train(ToyTask(), _cfg(tmp_path, max_train_steps=4))
    with pytest.raises(TrainingError, match="earlier run .*checkpoint-4.*resume_from_checkpoint: latest"):
        train(ToyTask(), _cfg(tmp_path, max_train_steps=4))


def test_nan_loss_stops_and_names_the_step_and_the_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingError, match=r"at step 6; stopped\. Last good checkpoint: .*checkpoint-4"):
        train(ToyTask(nan_at=6), _cfg(tmp_path))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4"]
    assert not (tmp_path / "adapter").exists()


def test_an_interrupted_checkpoint_write_leaves_nothing_half_written(tmp_path, monkeypatch):
    import visionpeft.train.checkpoint as ck

    real = ck.save_file

    def failing(tensors, path, *a, **k):
        if "checkpoint-8" in str(path):
            raise OSError("disk full")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ck, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        train(ToyTask(), _cfg(tmp_path))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith((".checkpoint", "checkpoint"))] == \
        ["checkpoint-4"]


@pytest.fixture
def compiled_off():
    from visionpeft.ops.compiled import compiled_kernels_enabled

    before = compiled_kernels_enabled()
    vp.set_compiled_kernels(False)  # whatever VISIONPEFT_COMPILED_KERNELS says
    yield
    vp.set_compiled_kernels(before)


def test_compiled_kernels_setting_holds_for_the_run_only(tmp_path, compiled_off):
    """``compiled_kernels: true`` runs the task with SNELL's compiled kernels on (same
    losses as the eager path) and the process setting comes back afterwards."""
    from visionpeft.ops.compiled import compiled_kernels_enabled

    runs = {}
    for on in (True, False):
        task = ToyTask(method="snell")
        runs[on] = train(task, _cfg(tmp_path / str(on), max_train_steps=4, compiled_kernels=on)).losses
        assert task.compiled_seen is on and not compiled_kernels_enabled()
    assert len(runs[True]) == 4
    torch.testing.assert_close(runs[True], runs[False], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="compiled_kernels must be true, false or null"):
        TrainConfig(compiled_kernels="yes")


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="lr_scheduler must be one of"):
        TrainConfig(lr_scheduler="warm")
    with pytest.raises(ValueError, match="max_train_steps must be an integer >= 1"):
        TrainConfig(max_train_steps=0)
    # `mixed_precision: no` unquoted, or --set mixed_precision=no, reaches us as YAML's false
    assert TrainConfig(mixed_precision=False).mixed_precision == "no"
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        TrainConfig(mixed_precision=True)
    with pytest.raises(ValueError, match="use_8bit_adam needs bitsandbytes"):
        pytest.importorskip("accelerate")
        train(ToyTask(), TrainConfig(use_8bit_adam=True, cpu=True, output_dir="/tmp/vp-never"))


def test_after_backward_sees_the_gradients_and_task_state_resumes_exactly(tmp_path):
    """SNELLA's allocator driven by the loop: it sees every step's gradients once, moves the
    layers' sparsities, and a resumed run (EMAs from the checkpoint) ends identical."""
    task = SnellaTask()
    full = train(task, _cfg(tmp_path / "full", gradient_accumulation_steps=2))
    assert task.seen == [(s, True) for s in range(1, 13)]
    assert len({m.sparsity for m in task.alloc.modules}) == 2  # the layers got different shares
    with pytest.raises(KeyboardInterrupt):
        train(SnellaTask(crash_at=14), _cfg(tmp_path / "cut", gradient_accumulation_steps=2))
    resumed = train(SnellaTask(), _cfg(tmp_path / "cut", resume_from_checkpoint="latest",
                                       gradient_accumulation_steps=2))
    assert resumed.step == full.step == 12
    a, b = _adapter(tmp_path / "full" / "adapter"), _adapter(tmp_path / "cut" / "adapter")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_loop_runs_adamw_fused_on_cpu_with_torch_s_own_update():
    """On CPU the loop's AdamW is the fused one (one kernel for every tensor, where the
    default loops over tensors in Python); its update equals torch's unfused AdamW."""
    from visionpeft.train.loop import _optimizer

    cfg = TrainConfig(output_dir="unused", learning_rate=1e-2, adam_weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    ps = [nn.Parameter(torch.randn(s, generator=g)) for s in ((7, 3), (3,), (2, 5, 4))]
    ref = [nn.Parameter(p.detach().clone()) for p in ps]
    start = [p.detach().clone() for p in ps]
    opt = _optimizer(ps, cfg, torch.device("cpu"))
    assert opt.defaults["fused"] is True
    plain = torch.optim.AdamW(ref, lr=1e-2, betas=(cfg.adam_beta1, cfg.adam_beta2),
                              weight_decay=0.05, eps=cfg.adam_epsilon, foreach=False)
    for _ in range(3):
        for p, q in zip(ps, ref):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        plain.step()
    for p, q, p0 in zip(ps, ref, start):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
        assert (p - p0).abs().min() > 1e-5  # every entry moved, by more than the tolerance
    # a device without the fused kernel gets torch's default
    assert not _optimizer([nn.Parameter(torch.zeros(2))], cfg, torch.device("meta")).defaults["fused"]


def test_a_checkpoint_of_an_unfused_optimizer_resumes_fused(tmp_path):
    """Checkpoints written before the loop ran AdamW fused hold fused: None in their param
    groups; loading one keeps this run's fused step (under fp16 a GradScaler needs it)."""
    from visionpeft.train.checkpoint import load_checkpoint, rng_state, save_checkpoint
    from visionpeft.train.loop import _optimizer

    cfg = TrainConfig(output_dir=str(tmp_path))
    p = nn.Parameter(torch.randn(3))
    old = torch.optim.AdamW([p], lr=1e-3)  # the unfused optimizer of an older run
    p.grad = torch.randn(3)
    old.step()
    sched = torch.optim.lr_scheduler.LambdaLR(old, lambda s: 1.0)
    folder = save_checkpoint(tmp_path, 1, old, sched, lambda tmp: None, [rng_state()])
    new = _optimizer([p], cfg, torch.device("cpu"))
    load_checkpoint(folder, new, torch.optim.lr_scheduler.LambdaLR(new, lambda s: 1.0))
    assert new.param_groups[0]["fused"] is True
    scaler = torch.amp.GradScaler("cpu")
    new.zero_grad()
    scaler.scale((p * torch.randn(3)).sum()).backward()
    scaler.step(new)  # failed with "Expected grad_scale and found_inf to be None" before
    scaler.update()


def test_checkpoints_hold_only_safetensors_and_json(tmp_path):
    train(ToyTask(), _cfg(tmp_path, max_train_steps=4))
    files = [p for p in (tmp_path / "checkpoint-4").rglob("*") if p.is_file()]
    assert files and {p.suffix for p in files} <= {".safetensors", ".json"}, sorted(p.name for p in files)


def test_validation_draws_from_a_forked_rng(tmp_path):
    """ToyTask.validate draws 100 numbers from the global RNG: the trained adapter must be
    the same with validation every 3 steps as with none."""
    train(ToyTask(), _cfg(tmp_path / "with", validation_steps=3))
    train(ToyTask(), _cfg(tmp_path / "without"))
    a, b = _adapter(tmp_path / "with" / "adapter"), _adapter(tmp_path / "without" / "adapter")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_an_earlier_checkpoint_drops_the_later_ones(tmp_path):
    """Resuming checkpoint-4 of a finished run abandons what came after it: checkpoints 8
    and 12 are removed before training goes on (here it dies at once, so nothing replaces
    them), and the run then ends as the uninterrupted one did."""
    full = train(ToyTask(), _cfg(tmp_path))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]
    done = _adapter(tmp_path / "adapter")
    with pytest.raises(KeyboardInterrupt):
        train(ToyTask(crash_at=1), _cfg(tmp_path, resume_from_checkpoint=str(tmp_path / "checkpoint-4")))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4"]
    again = train(ToyTask(), _cfg(tmp_path, resume_from_checkpoint="latest"))
    assert again.step == full.step == 12
    redone = _adapter(tmp_path / "adapter")
    assert all(torch.equal(done[k], redone[k]) for k in done)


def test_after_backward_sees_the_gradients_before_clipping(tmp_path):
    class Seeing(ToyTask):
        def after_backward(self, models, step):
            grads = [p.grad for p in models["net"].parameters() if p.grad is not None]
            self.norms = getattr(self, "norms", []) + [float(torch.linalg.vector_norm(torch.cat(
                [g.flatten() for g in grads])))]

    task = Seeing()
    train(task, _cfg(tmp_path, max_train_steps=3, max_grad_norm=1e-6))
    assert len(task.norms) == 3 and min(task.norms) > 1e-4  # far above the clip: seen unclipped


class _Frozen(ToyTask):
    def setup(self, device, dtype):
        super().setup(device, dtype)
        self.model.requires_grad_(False)

    def finish(self, models, output_dir):
        self.finished = True
        return {"evaluated": 1}


def test_a_task_with_nothing_to_train(tmp_path):
    """Refused unless the task says it trains nothing (a zero-shot baseline): then it is set
    up, saved and finished at step 0, and the report says so."""
    from visionpeft.train import TrainingError

    with pytest.raises(TrainingError, match="no trainable parameters"):
        train(_Frozen(), TrainConfig(cpu=True, output_dir=str(tmp_path / "a")))
    task = _Frozen()
    task.trains_nothing = True
    result = train(task, TrainConfig(cpu=True, output_dir=str(tmp_path / "b")))
    assert result.step == 0 and task.finished and result.report == {"evaluated": 1}
    assert json.loads((tmp_path / "b" / "train_report.json").read_text()) == {"step": 0, "evaluated": 1}
    assert (tmp_path / "b" / "adapter" / "net").is_dir() and not list((tmp_path / "b").glob("checkpoint-*"))


def test_recipe_loop_defaults_and_shared_keys(monkeypatch):
    """A task's loop_defaults fill only what the config leaves out (checked as the config's
    settings are), and shared_keys hand loop keys such as seed to the task too."""
    import visionpeft.train as train_pkg
    import visionpeft.train.task as task_mod
    from visionpeft.train import register_task, run_config

    # a registry of this test's own: the toy task is gone afterwards
    monkeypatch.setattr(task_mod, "_TASKS", dict(task_mod._TASKS))
    monkeypatch.setattr(task_mod, "_SHARED", dict(task_mod._SHARED))

    class Recipe(ToyTask):
        def loop_defaults(self, given):
            assert given == seen_given.pop()
            return {"max_train_steps": 42, "learning_rate": 3e-3, "lr_scheduler": "cosine", "lr_min": 1e-5}

    made = {}
    seen_given = [{"seed": 9, "learning_rate": 1e-2}]

    def load(values):
        made.update(values)
        return Recipe()

    register_task("toy_recipe_defaults", load, replace=True, shared_keys=("seed",))
    seen = {}
    monkeypatch.setattr(train_pkg, "train", lambda task, cfg: seen.update(cfg=cfg))
    run_config({"task": "toy_recipe_defaults", "seed": 9, "learning_rate": 1e-2})
    assert made == {"seed": 9}
    assert (seen["cfg"].max_train_steps, seen["cfg"].learning_rate, seen["cfg"].lr_min) == (42, 1e-2, 1e-5)
    seen_given.append({"learning_rate": 1e-6})
    with pytest.raises(ValueError, match="lr_min must be >= 0 and below learning_rate"):
        run_config({"task": "toy_recipe_defaults", "learning_rate": 1e-6})
