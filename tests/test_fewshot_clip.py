"""`task: fewshot_clip`: CLIP-LoRA's recipe on a tiny open_clip built from a local folder
(open_clip's own loader), checked against hand computations with open_clip's encoders,
torch's CosineAnnealingLR, scikit-learn's logistic regression and brute-force loops."""
import json
import pickle
import subprocess
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors.torch import save_file

import visionpeft as vp
from visionpeft.data.fewshot import coop_split, fewshot_subset
from visionpeft.pipelines.fewshot_clip import (CLIPClassifier, build_clip, eval_transform, load_classifier,
                                               predict_topk, train_transform)
from visionpeft.train import TrainingError, run_config

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
CLASSES = ["red_thing", "blue thing", "green"]


def _clip_folder(folder: Path, width: int = 32, seed: int = 0) -> Path:
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": width, "layers": 2,
                                           "head_width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {
        "mean": MEAN, "std": STD}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def _dataset(root: Path, name: str = "toy") -> Path:
    rng = np.random.default_rng(0)
    split = {}
    for s, n in (("train", 5), ("val", 3), ("test", 4)):
        rows = []
        for label, c in enumerate(CLASSES):
            for i in range(n):
                img = (rng.random((40, 48, 3)) * 80).astype(np.uint8)
                img[..., label] += 150
                rel = f"{c}/{s}_{i}.png"
                (root / name / c).mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(root / name / rel)
                rows.append([rel, label, c])
        split[s] = rows
    (root / name / f"split_zhou_{name}.json").write_text(json.dumps(split))
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("fewshot")
    return {"clip": _clip_folder(base / "clip"), "data": _dataset(base / "data"), "base": base}


def _config(env, out, **kw):
    return {"task": "fewshot_clip", "dataset": "coop", "dataset_name": "toy", "data_root": str(env["data"]),
            "shots": 2, "seed": 3, "backbone": {"source": "open_clip", "name": str(env["clip"])},
            "max_train_steps": 4, "train_batch_size": 4, "output_dir": str(out), **kw}


@pytest.fixture(scope="module")
def trained(env):
    out = env["base"] / "run"
    result = run_config(_config(env, out, adapter={"method": "block_lora", "r": 2, "n_blocks": 2, "alpha": 1,
                                                   "rank_stabilized": True, "dropout": 0.25},
                                learning_rate=5e-2))
    return out, result


def test_logits_are_100_cosine_of_open_clips_encoders(env):
    clip, tok = build_clip({"name": str(env["clip"])})
    model = CLIPClassifier(clip, tok, ["a_b", "c"], "a photo of a {}.")
    images = torch.randn(3, 3, 32, 32)
    text = open_clip.get_tokenizer("local-dir:" + str(env["clip"]))(["a photo of a a b.", "a photo of a c."])
    with torch.no_grad():
        i = clip.encode_image(images)
        t = clip.encode_text(text)
        want = 100 * (i / i.norm(dim=-1, keepdim=True)) @ (t / t.norm(dim=-1, keepdim=True)).t()
        assert torch.allclose(model(images), want, atol=1e-4)
    # a fixed 100, not CLIP's learned scale
    assert model.logit_scale == 100.0 and float(clip.logit_scale.detach().exp()) != 100.0


def test_transforms_are_clip_loras():
    from torchvision import transforms as T

    crop, flip, _, norm = train_transform(224, MEAN, STD).transforms
    assert isinstance(crop, T.RandomResizedCrop) and crop.size == (224, 224) and crop.scale == (0.08, 1.0)
    assert crop.interpolation == T.InterpolationMode.BICUBIC and isinstance(flip, T.RandomHorizontalFlip)
    assert flip.p == 0.5 and list(norm.mean) == MEAN and list(norm.std) == STD
    resize, centre, _, norm = eval_transform(224, MEAN, STD).transforms
    assert resize.interpolation == T.InterpolationMode.BICUBIC and centre.size == (224, 224)


def test_recipe_defaults_reach_the_loop(env, monkeypatch, tmp_path):
    """Without loop keys in the config: 500 x shots steps, batch 32, AdamW 2e-4 wd 1e-2,
    cosine to 1e-6, no clipping; keys in the config win."""
    import visionpeft.train as train_pkg

    seen = {}
    monkeypatch.setattr(train_pkg, "train", lambda task, cfg: seen.update(cfg=cfg, task=task))
    cfg = _config(env, tmp_path / "o", shots=4)
    for k in ("max_train_steps", "train_batch_size"):
        cfg.pop(k)
    run_config(cfg)
    c = seen["cfg"]
    assert (c.max_train_steps, c.train_batch_size, c.learning_rate, c.adam_weight_decay) == (2000, 32, 2e-4, 1e-2)
    assert (c.lr_scheduler, c.lr_min, c.max_grad_norm, c.seed) == ("cosine", 1e-6, 0.0, 3)
    assert seen["task"].cfg.seed == 3  # the few-shot draw reads the loop's seed
    assert seen["task"].cfg.adapter == {"method": "lora", "r": 2, "alpha": 1, "rank_stabilized": True,
                                        "dropout": 0.25, "target_modules": ["attn[q,k,v]"]}
    run_config({**cfg, "max_train_steps": 7, "learning_rate": 1e-3})
    assert (seen["cfg"].max_train_steps, seen["cfg"].learning_rate) == (7, 1e-3)


def test_cosine_to_floor_equals_torch_cosine_annealing():
    from visionpeft.train.loop import TrainConfig, _scheduler

    p = torch.nn.Parameter(torch.zeros(1))
    ours = torch.optim.AdamW([p], lr=2e-4)
    ref = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    s1 = _scheduler(ours, TrainConfig(max_train_steps=50, learning_rate=2e-4, lr_scheduler="cosine", lr_min=1e-6))
    s2 = torch.optim.lr_scheduler.CosineAnnealingLR(ref, 50, eta_min=1e-6)
    for _ in range(50):
        assert abs(s1.get_last_lr()[0] - s2.get_last_lr()[0]) < 1e-12
        ours.step(), ref.step(), s1.step(), s2.step()
    with pytest.raises(ValueError, match="lr_min is the floor of lr_scheduler cosine"):
        TrainConfig(lr_min=1e-6)


def test_training_run(env, trained):
    out, result = trained
    assert result.step == 4
    # the drawn shots, written before training, are the seeded draw
    drawn = json.loads((out / "fewshot_split.json").read_text())
    train = coop_split(env["data"], "toy", "train")
    assert drawn["train"] == [[it.path, it.label, it.classname] for it in fewshot_subset(train.items, 2, 3)]
    from visionpeft.pipelines.fewshot_clip.task import VAL_SEED_OFFSET

    val = coop_split(env["data"], "toy", "val")
    assert drawn["val"] == [[it.path, it.label, it.classname]  # min(4, shots) per class, from val
                            for it in fewshot_subset(val.items, 2, 3 + VAL_SEED_OFFSET)]
    # q, k and v of every attention of both towers, and both towers learned
    model, cfg = load_classifier(out)
    names = [n for n, m in model.clip.named_modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert len(names) == 4 and any(n.startswith("visual.") for n in names) and any(
        n.startswith("transformer.") for n in names)
    # B starts at zero: a B that moved got gradients, in the image tower and the text tower
    ups = {n for n, p in model.clip.named_parameters() if n.endswith(".B") and p.abs().sum() > 0}
    assert len(ups) == 12 and sum(n.startswith("transformer.") for n in ups) == 6
    assert cfg["classnames"] == CLASSES and cfg["template"] == "a photo of a {}."
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lrs[-1] == pytest.approx(1e-6)


def test_test_accuracy_against_a_loop(env, trained):
    out, _ = trained
    metrics = json.loads((out / "metrics.json").read_text())
    model, _ = load_classifier(out)
    test = coop_split(env["data"], "toy", "test")
    tf = eval_transform(32, MEAN, STD)
    hits = {c: [] for c in CLASSES}
    with torch.no_grad():
        for it in test.items:
            x = tf(Image.open(test.absolute(it)).convert("RGB"))[None]
            img = F.normalize(model.clip.encode_image(x), dim=-1)
            txt = F.normalize(model.clip.encode_text(model.tokens), dim=-1)
            hits[it.classname].append(int((img @ txt.t()).argmax()) == it.label)
    assert metrics["per_class_accuracy"] == {c: sum(h) / len(h) for c, h in hits.items()}
    assert metrics["accuracy"] == sum(map(sum, hits.values())) / 12
    # Block-LoRA r 2, n 2 on 3 slices x 4 attentions of width 32: r (in / n + out) each
    assert metrics["trainable_parameters"] == 3 * 4 * 2 * (32 // 2 + 32) == sum(
        p.numel() for n, p in model.clip.named_parameters() if ".adapters." in n)


def test_zero_shot_baseline(env, tmp_path):
    result = run_config(_config(env, tmp_path / "zs", adapter=None))
    assert result.step == 0
    assert not (tmp_path / "zs" / "adapter" / "clip").exists()
    model, cfg = load_classifier(tmp_path / "zs")
    assert cfg["adapter"] is None and not vp.adapter_names(model.clip)
    metrics = json.loads((tmp_path / "zs" / "metrics.json").read_text())
    clip, tok = build_clip({"name": str(env["clip"])})
    plain = CLIPClassifier(clip.eval(), tok, CLASSES, "a photo of a {}.")
    test = coop_split(env["data"], "toy", "test")
    tf = eval_transform(32, MEAN, STD)
    with torch.no_grad():
        x = torch.stack([tf(Image.open(test.absolute(it)).convert("RGB")) for it in test.items])
        pred = plain(x).argmax(-1)
    assert metrics["accuracy"] == float((pred == torch.tensor([it.label for it in test.items])).double().mean())


def _cli(args):
    """`visionpeft ARGS` in this process (the entry point's own main): (code, stderr)."""
    import contextlib
    import io

    from visionpeft.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(args)
    return subprocess.CompletedProcess(args, code, "", err.getvalue())


def test_cli_evaluate_and_predict(env, trained, tmp_path):
    out, _ = trained
    run = _cli(["evaluate-fewshot", "--checkpoint", str(out), "--data-root", str(env["data"]), "--split", "test",
                "--workers", "1", "--output", str(tmp_path / "m.json")])
    assert run.returncode == 0, run.stderr
    got = json.loads((tmp_path / "m.json").read_text())
    want = json.loads((out / "metrics.json").read_text())
    assert got["accuracy"] == want["accuracy"] and got["per_class_accuracy"] == want["per_class_accuracy"]
    test = coop_split(env["data"], "toy", "test")
    paths = [str(test.absolute(it)) for it in test.items[:2]]
    run = _cli(["predict-fewshot", "--checkpoint", str(out), *paths, "--output", str(tmp_path / "p.json")])
    assert run.returncode == 0, run.stderr
    preds = json.loads((tmp_path / "p.json").read_text())
    model, _ = load_classifier(out)
    direct = predict_topk(model, [Image.open(p) for p in paths], 5)
    assert [p["path"] for p in preds] == paths
    for p, d in zip(preds, direct):
        assert len(p["top"]) == 3 and [c for c, _ in p["top"]] == [c for c, _ in d]
        assert np.allclose([q for _, q in p["top"]], [q for _, q in d], atol=1e-6)
        assert sum(q for _, q in p["top"]) == pytest.approx(1.0) and p["top"][0][1] >= p["top"][1][1]


def test_cli_refusals(env, trained, tmp_path):
    out, _ = trained
    for args, msg in [
        (["predict-fewshot", "--checkpoint", str(out), str(tmp_path / "no.png")], "cannot read image"),
        (["evaluate-fewshot", "--checkpoint", str(tmp_path), "--data-root", str(env["data"])],
         "holds no few-shot CLIP checkpoint"),
        (["evaluate-fewshot", "--checkpoint", str(out), "--data-root", str(tmp_path)], "no split_zhou_toy.json"),
        (["predict-fewshot", "--checkpoint", str(out), str(tmp_path / "no.png"), "--output",
          str(tmp_path / "x.txt")],
         "give a .json file name"),
        (["predict-fewshot", "--checkpoint", str(out), str(tmp_path / "no.png"), "--top", "0"], "--top 0"),
        (["predict-fewshot", "--checkpoint", str(out), str(env["data"] / "toy/green/test_0.png"),
          "--device", "cuda:99"],
         "--device cuda:99"),
        (["evaluate-fewshot", "--checkpoint", str(out), "--data-root", str(env["data"]), "--device", "gpu"],
         "not a device name"),
        (["evaluate-fewshot", "--checkpoint", str(out), "--data-root", str(env["data"]), "--workers", "-1"],
         "--workers -1"),
    ]:
        run = _cli(args)
        assert run.returncode == 2 and msg in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert not (tmp_path / "x.txt").exists()


def test_checkpoint_for_another_backbone(env, trained, tmp_path):
    import shutil

    out, _ = trained
    copy = tmp_path / "ckpt"
    shutil.copytree(out / "adapter", copy)
    other = _clip_folder(tmp_path / "wide", width=48)
    cfg = json.loads((copy / "fewshot_config.json").read_text())
    cfg["backbone"]["name"] = str(other)
    (copy / "fewshot_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="cannot load its adapter into backbone") as err:
        load_classifier(copy)
    assert "\n" not in str(err.value)
    run = _cli(["predict-fewshot", "--checkpoint", str(copy), str(env["data"] / "toy/green/test_0.png")])
    assert run.returncode == 2 and "cannot load its adapter into backbone" in run.stderr


def test_data_refusals(env, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(env["data"], data)
    for p in sorted((data / "toy" / "green").glob("test_*.png"))[:2]:
        p.unlink()
    with pytest.raises(TrainingError, match=r"toy test split: 2 of 12 images are missing .*green/test_0.png"):
        run_config(_config(env, tmp_path / "o", data_root=str(data)))
    assert not (tmp_path / "o").exists()
    split = json.loads((data / "toy" / "split_zhou_toy.json").read_text())
    split["train"] = [r for r in split["train"] if r[1] != 1]
    (data / "toy" / "split_zhou_toy.json").write_text(json.dumps(split))
    with pytest.raises(TrainingError, match=r"no images for label\(s\) \[1\]"):
        run_config(_config(env, tmp_path / "o", data_root=str(data)))
    with pytest.raises(ValueError, match="dataset: coop needs dataset_name"):
        run_config({**_config(env, tmp_path / "o"), "dataset_name": None})
    with pytest.raises(ValueError, match="unknown adapter method 'nope'"):
        run_config(_config(env, tmp_path / "o", adapter={"method": "nope"}))


class _Code:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling would create the marker file
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_pickle_with_code_is_refused(env, tmp_path):
    """An official-style .pt checkpoint is read with torch.load(weights_only=True): a pickle
    that would run code is refused with one line, nothing run."""
    bad = tmp_path / "weights.pt"
    with open(bad, "wb") as f:
        pickle.dump({"state_dict": _Code(tmp_path / "ran")}, f)
    with pytest.raises(ValueError, match="cannot load open_clip") as err:
        build_clip({"name": "ViT-B-16", "pretrained": str(bad)})
    assert "\n" not in str(err.value) and not (tmp_path / "ran").exists()


def test_template_option_and_prompts(env, tmp_path):
    from visionpeft.pipelines.fewshot_clip import FewShotCLIPConfig, prompts

    assert prompts("a photo of a {}.", ["Sea_or_Lake"]) == ["a photo of a Sea or Lake."]
    cfg = FewShotCLIPConfig.from_dict({k: v for k, v in _config(env, tmp_path).items()
                                       if k not in ("task", "max_train_steps", "train_batch_size", "output_dir")}
                                      | {"template": "dataset"})
    assert cfg.resolved_template("EuroSAT") == "a centered satellite photo of {}."
    with pytest.raises(ValueError, match="has no {} for the class name"):
        prompts("a photo", ["x"])


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("fewshot_*.yaml")))
def test_shipped_configs_run(env, tmp_path, name):
    """Every shipped few-shot config, with only its backbone and data swapped for the tiny ones."""
    values = yaml.safe_load((ROOT / "configs" / name).read_text())
    assert values["task"] == "fewshot_clip" and values["backbone"]["source"] == "open_clip"
    values.update(backbone={"source": "open_clip", "name": str(env["clip"])}, data_root=str(env["data"]),
                  dataset_name="toy", max_train_steps=2, train_batch_size=4, output_dir=str(tmp_path / "o"),
                  checkpointing_steps=2)
    assert run_config(values).step == 2
    assert (tmp_path / "o" / "adapter" / "clip").is_dir()


def test_linear_probe_equals_scikit_learn():
    """fit_logistic minimises scikit-learn's LogisticRegression objective (C * sum CE +
    ||W||^2 / 2, bias free): the same coefficients; C chosen on validation."""
    sklearn = pytest.importorskip("sklearn.linear_model")
    from visionpeft.pipelines.fewshot_clip.probe import fit_logistic, linear_probe

    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(30, 6, generator=g), dim=-1)
    y = torch.arange(30) % 3
    x[torch.arange(30), y] += 0.8
    for c in (0.1, 10.0):
        w, b = fit_logistic(x, y, 3, c)
        ref = sklearn.LogisticRegression(C=c, tol=1e-10, max_iter=10000).fit(x.double().numpy(), y.numpy())
        assert np.allclose(w.numpy(), ref.coef_, atol=1e-4) and np.allclose(b.numpy(), ref.intercept_, atol=1e-4)
    w, b, chosen, scores = linear_probe(x[:18], y[:18], x[18:], y[18:], 3, grid=(0.001, 1.0, 100.0))
    assert scores[chosen] == max(scores.values()) and set(scores) == {0.001, 1.0, 100.0}
    assert torch.equal(w, fit_logistic(x[:18], y[:18], 3, chosen)[0])  # fitted on the training shots only


def test_draw_sizes_in_the_task(env):
    """k shots per class (with replacement past the 5 the split has), min(4, k) validation
    images per class (with replacement past its 3)."""
    from collections import Counter

    from visionpeft.pipelines.fewshot_clip import FewShotCLIPConfig, FewShotCLIPTask

    values = {k: v for k, v in _config(env, "unused").items()
              if k not in ("task", "max_train_steps", "train_batch_size", "output_dir")}
    task = FewShotCLIPTask(FewShotCLIPConfig.from_dict({**values, "shots": 6}))
    task.setup(torch.device("cpu"), torch.float32)
    assert Counter(it.label for it in task.train_items) == {0: 6, 1: 6, 2: 6}
    assert Counter(it.label for it in task.val_items) == {0: 4, 1: 4, 2: 4}
    assert len({it.path for it in task.val_items if it.label == 0}) == 3


def test_evaluate_counts_per_class():
    """evaluate against counts by hand on fixed predictions (classes right 1/2, 2/3, 0/1)."""
    from visionpeft.pipelines.fewshot_clip import evaluate

    class Fixed(torch.nn.Module):
        classnames = ["a", "b", "c"]

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def text_features(self):
            return torch.eye(3)

        def forward(self, x, text_features):
            return x @ text_features.t()

    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    preds = torch.tensor([0, 1, 1, 1, 0, 0])
    data = torch.utils.data.TensorDataset(F.one_hot(preds, 3).float(), labels)
    m = evaluate(Fixed(), data, batch_size=4)
    assert m["per_class_accuracy"] == {"a": 1 / 2, "b": 2 / 3, "c": 0.0} and m["accuracy"] == 3 / 6


def test_openai_weights_get_quick_gelu(monkeypatch):
    """open_clip's plain ViT-B-16 config has GELU; OpenAI's weights need QuickGELU."""
    seen = []

    def fake(name, **kwargs):
        seen.append(kwargs)
        from visionpeft.backbones.tiny import build_tiny

        return build_tiny("open_clip")

    monkeypatch.setattr(open_clip, "create_model", fake)
    build_clip({"name": "ViT-B-16", "pretrained": "openai"})
    build_clip({"name": "ViT-B-16", "pretrained": "laion2b_s34b_b88k"})
    assert seen[0].get("force_quick_gelu") is True and "force_quick_gelu" not in seen[1]


def test_imagenet_validation_comes_from_train_not_test(tmp_path):
    """ImageNet's labelled val/ is the test split: the validation shots are training images
    that were not drawn as shots."""
    from visionpeft.pipelines.fewshot_clip import FewShotCLIPConfig, FewShotCLIPTask

    root = tmp_path / "imagenet"
    for s, n in (("train", 6), ("val", 2)):
        for w in ("n01", "n02"):
            (root / "images" / s / w).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / s / w / f"{i}.png")
    (root / "classnames.txt").write_text("n01 tench\nn02 goldfish\n")
    clip = _clip_folder(tmp_path / "clip")
    task = FewShotCLIPTask(FewShotCLIPConfig.from_dict({"dataset": "imagenet", "data_root": str(tmp_path),
                                                        "backbone": {"name": str(clip)}, "shots": 2}))
    task.setup(torch.device("cpu"), torch.float32)
    val = {it.path for it in task.val_items}
    assert all(p.startswith("train/") for p in val) and not val & {it.path for it in task.train_items}
    assert {it.path for it in task.splits["test"].items} == {f"val/{w}/{i}.png" for w in ("n01", "n02")
                                                             for i in range(2)}


def test_output_folder_rules(env, tmp_path):
    """The draw file of an earlier run is kept: another draw into its folder is refused
    before anything is written; a zero-shot run into a trained folder is refused."""
    out = tmp_path / "o"
    run_config(_config(env, out, adapter={"method": "lora", "r": 2}, max_train_steps=2))
    before = (out / "fewshot_split.json").read_text()
    with pytest.raises(TrainingError, match="holds another draw"):
        run_config(_config(env, out, adapter={"method": "lora", "r": 2}, seed=4,
                           resume_from_checkpoint="latest", max_train_steps=3))
    assert (out / "fewshot_split.json").read_text() == before
    with pytest.raises(TrainingError, match="holds the output of an earlier run"):
        run_config(_config(env, out, adapter=None))
    assert (out / "fewshot_split.json").read_text() == before


def test_every_image_every_epoch_and_other_schedulers(env, tmp_path, monkeypatch):
    """CLIP-LoRA keeps each epoch's last partial batch (6 shots at batch 4: 4 + 2); a config
    with another scheduler gets no cosine floor."""
    from visionpeft.pipelines.fewshot_clip import FewShotCLIPTask

    sizes = []
    real = FewShotCLIPTask.loss
    monkeypatch.setattr(FewShotCLIPTask, "loss", lambda self, m, b: (sizes.append(len(b[1])), real(self, m, b))[1])
    run_config(_config(env, tmp_path / "o", adapter={"method": "lora", "r": 2}, max_train_steps=4,
                       lr_scheduler="constant"))
    assert sizes == [4, 2, 4, 2]


def test_block_method_targets_and_early_checks(env, tmp_path):
    from visionpeft.pipelines.fewshot_clip import FewShotCLIPConfig

    base = {k: v for k, v in _config(env, tmp_path).items()
            if k not in ("task", "max_train_steps", "train_batch_size", "output_dir")}
    cfg = FewShotCLIPConfig.from_dict({**base, "adapter": {"method": "adapter", "bottleneck": 4}})
    assert cfg.adapter["target_modules"] == list(vp.presets.CLIP_BLOCKS)
    with pytest.raises(ValueError, match="template 'a photo'.*has no {}"):
        FewShotCLIPConfig.from_dict({**base, "template": "a photo"})
    result = run_config(_config(env, tmp_path / "blocks", adapter={"method": "adapter", "bottleneck": 4},
                                max_train_steps=2))
    assert result.step == 2


def test_checkpoint_without_its_adapter_folder_is_refused(env, trained, tmp_path):
    import shutil

    out, _ = trained
    copy = tmp_path / "ckpt"
    shutil.copytree(out / "adapter", copy)
    shutil.rmtree(copy / "clip")
    with pytest.raises(FileNotFoundError, match="names adapter 'block_lora' but clip/ is missing") as err:
        load_classifier(copy)
    assert "\n" not in str(err.value)
    run = _cli(["predict-fewshot", "--checkpoint", str(copy), str(env["data"] / "toy/green/test_0.png")])
    assert run.returncode == 2 and "clip/ is missing" in run.stderr, run.stderr


def test_config_defaults_and_checks_in_python(env, monkeypatch):
    """Built in Python, the config is checked as from YAML; no backbone is CLIP-LoRA's
    ViT-B/16 `openai`; fp16 only on a GPU and not when the run is kept on the CPU."""
    from visionpeft.pipelines.fewshot_clip import FewShotCLIPConfig, FewShotCLIPTask

    cfg = FewShotCLIPConfig(dataset="coop", data_root=str(env["data"]), dataset_name="toy")
    assert cfg.backbone == {"source": "open_clip", "name": "ViT-B-16", "pretrained": "openai"}
    assert cfg.adapter["method"] == "lora" and cfg.adapter["target_modules"] == list(vp.presets.CLIP_QKV)
    with pytest.raises(ValueError, match="shots must be an integer >= 1, got 0"):
        FewShotCLIPConfig(dataset="coop", data_root=".", dataset_name="toy", shots=0)
    task = FewShotCLIPTask(cfg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert task.loop_defaults({})["mixed_precision"] == "fp16"
    assert task.loop_defaults({"cpu": True})["mixed_precision"] == "no"


def test_splits_with_other_classes_are_named(env, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(env["data"], data)
    path = data / "toy" / "split_zhou_toy.json"
    split = json.loads(path.read_text())
    split["test"] = [[p, y, "purple" if y == 2 else c] for p, y, c in split["test"]]
    path.write_text(json.dumps(split))
    with pytest.raises(TrainingError, match=r"only in test: \['purple'\], only in train: \['green'\]") as err:
        run_config(_config(env, tmp_path / "o", data_root=str(data)))
    assert "\n" not in str(err.value) and not (tmp_path / "o").exists()


def test_a_resumed_run_redoes_the_validations_after_its_checkpoint(env, tmp_path):
    out = tmp_path / "r"
    run_config(_config(env, out, max_train_steps=2, checkpointing_steps=2, validation_steps=1))
    log = out / "val_metrics.jsonl"
    assert [json.loads(r)["step"] for r in log.read_text().splitlines()] == [1, 2]
    log.write_text(log.read_text() + '{"step": 3, "val_accuracy": 0.0}\n')  # a row after the checkpoint
    run_config(_config(env, out, max_train_steps=4, checkpointing_steps=2, validation_steps=1,
                       resume_from_checkpoint="latest"))
    assert [json.loads(r)["step"] for r in log.read_text().splitlines()] == [1, 2, 3, 4]
    assert json.loads((out / "metrics.json").read_text())["images"] == 12


def test_fewshot_table_script(env, tmp_path, capsys):
    """The table script on the tiny CLIP: every cell run once, the JSON resumed without
    rerunning, other settings and bad arguments refused."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fewshot_table", ROOT / "scripts" / "fewshot_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "t.json"
    args = ["--data-root", str(env["data"]), "--dataset-name", "toy", "--backbone", str(env["clip"]),
            "--shots", "1", "2", "--seeds", "1", "--steps-per-shot", "2", "--max-steps", "3", "--batch", "4",
            "--variants", "zero_shot", "linear_probe", "lora", "--work-dir", str(tmp_path / "w"),
            "--output", str(out)]
    first = script.main(args)
    doc = json.loads(out.read_text())
    assert sorted(doc["runs"]) == ["linear_probe/1/1", "linear_probe/2/1", "lora/1/1", "lora/2/1", "zero_shot/0/0"]
    assert doc["runs"]["lora/1/1"]["steps"] == 2 and doc["runs"]["lora/2/1"]["steps"] == 3  # 2 x shots, cap 3
    assert doc["settings"]["template"] == "a photo of a {}." and doc["table"] == first["table"]
    lora_row = next(line for line in doc["table"].splitlines() if line.startswith("| lora |"))
    want = [f"{100 * doc['runs'][f'lora/{k}/1']['accuracy']:.1f}" for k in (1, 2)]
    assert [c.strip(" |") for c in lora_row.split(" | ")[2:4]] == want
    assert doc["runs"]["zero_shot/0/0"]["steps"] == 0
    # r 2 on q, k, v of width 32 in 2 + 2 attentions: 4 x 3 x 2 x (32 + 32); the probe 3 x 16 + 3
    assert doc["runs"]["lora/1/1"]["trainable_parameters"] == 4 * 3 * 2 * 64
    assert doc["runs"]["linear_probe/1/1"]["trainable_parameters"] == 3 * 16 + 3
    again = script.main(args)
    assert again["runs"] == first["runs"]  # nothing rerun: seconds and accuracies as stored
    with pytest.raises(SystemExit, match="other settings \\(batch\\)"):
        script.main([*args[:-2], "--batch", "2", "--output", str(out)])
    for bad, msg in ((["--max-steps", "0"], "--max-steps 0"), (["--dataset-name", "EuroSAT"], "--data-root is needed")):
        with pytest.raises(SystemExit):
            script.main(bad)
        assert msg in capsys.readouterr().err
