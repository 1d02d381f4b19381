"""CLIP few-shot classification on the shared training loop (``task: fewshot_clip``), with
CLIP-LoRA's recipe (Zanella & Ben Ayed, "Low-Rank Few-Shot Adaptation of Vision-Language
Models", CVPRW 2024) as the default, read from its code: an adapter on q, k and v of every
attention of both towers, LoRA r 2, alpha 1, scale alpha / sqrt(r), dropout 0.25 on the
adapter's input; AdamW lr 2e-4, weight decay 1e-2, cosine to 1e-6 over 500 x shots
iterations, batch 32, no gradient clipping, fp16 autocast on a GPU; logits 100 x cosine;
text features recomputed at every step; test accuracy after the last iteration.
``adapter: null`` is zero-shot CLIP: nothing is trained, the test split is evaluated.

A checkpoint folder holds ``fewshot_config.json`` (backbone, class names, template) and
``clip/`` (the adapter; absent for zero-shot), which `load_classifier` rebuilds.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import visionpeft as vp
from visionpeft.data.fewshot import (DATASET_TEMPLATES, DEFAULT_TEMPLATE, ClassificationImages, check_files,
                                     find_classification_split, fewshot_subset, has_split, write_fewshot_split)
from visionpeft.train import Task, TrainingError, adapter_config, task_config

from ..checkpoints import find_checkpoint_folder, validations_kept
from .model import CLIPClassifier, build_clip, eval_transform, image_settings, prompts, train_transform

CONFIG_NAME = "fewshot_config.json"
SPLIT_FILE = "fewshot_split.json"
ADAPTER_DIR = "clip"
# CLIP-LoRA's adapter: LoRA r 2, alpha 1 at alpha / sqrt(r), dropout 0.25, q/k/v of both towers
CLIP_LORA = {"method": "lora", "r": 2, "alpha": 1, "rank_stabilized": True, "dropout": 0.25}
_DEFAULT = object()  # `adapter` left out: CLIP-LoRA; `adapter: null`: zero-shot
CLIP_LORA_BACKBONE = {"source": "open_clip", "name": "ViT-B-16", "pretrained": "openai"}
VAL_SEED_OFFSET = 1_000_003  # the validation draw's seed, apart from the training draw's


@dataclass
class FewShotCLIPConfig:
    dataset: str
    data_root: str
    backbone: object = _DEFAULT  # left out: CLIP-LoRA's open_clip ViT-B/16 with OpenAI's weights
    adapter: object = _DEFAULT
    dataset_name: str | None = None
    shots: int = 16
    seed: int = 0
    template: str = DEFAULT_TEMPLATE
    classnames: list | None = None  # imagefolder: names for the sorted class folders
    eval_batch_size: int = 64
    adapter_name: str = "default"

    @classmethod
    def from_dict(cls, values: dict) -> "FewShotCLIPConfig":
        return task_config(cls, values, "fewshot_clip")

    def __post_init__(self) -> None:
        self.check()  # a config built in Python is checked as one read from YAML

    def check(self) -> None:
        if isinstance(self.shots, bool) or not isinstance(self.shots, int) or self.shots < 1:
            raise ValueError(f"fewshot_clip: shots must be an integer >= 1, got {self.shots!r}")
        if self.dataset not in ("coop", "imagenet", "imagefolder"):
            raise ValueError(f"fewshot_clip: dataset must be coop, imagenet or imagefolder, got {self.dataset!r}")
        if self.dataset == "coop" and not self.dataset_name:
            raise ValueError("fewshot_clip: dataset: coop needs dataset_name, e.g. EuroSAT "
                             "(reads <data_root>/eurosat/split_zhou_EuroSAT.json)")
        if self.backbone is _DEFAULT:
            self.backbone = dict(CLIP_LORA_BACKBONE)
        if self.classnames is not None and self.dataset != "imagefolder":
            raise ValueError(f"fewshot_clip: classnames names an image folder's classes; dataset {self.dataset} "
                             f"reads its class names from its own files, so leave classnames out")
        if not isinstance(self.backbone, dict):
            raise ValueError(f"fewshot_clip: backbone must be a mapping like {{source: open_clip, name: ViT-B-16, "
                             f"pretrained: openai}}, got {self.backbone!r}")
        if self.adapter is _DEFAULT:
            self.adapter = dict(CLIP_LORA)
        if self.adapter is not None and not isinstance(self.adapter, dict):
            raise ValueError(f"fewshot_clip: adapter must be a mapping with a method, or null for zero-shot CLIP, "
                             f"got {self.adapter!r}")
        if self.adapter is not None:
            spec = dict(self.adapter)
            if "target_modules" not in spec:  # q/k/v of both towers; a block method: every residual block
                block = spec.get("method") in vp.list_methods() and not vp.get_method(spec["method"]).weight_space
                spec["target_modules"] = list(vp.presets.CLIP_BLOCKS if block else vp.presets.CLIP_QKV)
            adapter_config(spec, "fewshot_clip")  # a bad method or field fails now, before data is read
            self.adapter = spec
        if self.template != "dataset":
            try:
                prompts(self.template, ["x"])
            except (ValueError, IndexError, KeyError) as err:
                raise ValueError(f"fewshot_clip: template {self.template!r}: {err}") from None
        if not isinstance(self.eval_batch_size, int) or self.eval_batch_size < 1:
            raise ValueError(f"fewshot_clip: eval_batch_size must be an integer >= 1, got {self.eval_batch_size!r}")

    def resolved_template(self, dataset_label: str) -> str:
        """``template: dataset`` is CoOp's template of this data set."""
        if self.template == "dataset":
            return DATASET_TEMPLATES.get(dataset_label, DEFAULT_TEMPLATE)
        return self.template


def write_json(path: Path, value) -> None:
    """``value`` as indented JSON, written whole or not at all (a crash leaves the old file)."""
    text = json.dumps(value, indent=2)
    vp.atomic_write_file(path, lambda tmp: Path(tmp).write_text(text))


def _class_difference(train: list[str], other: list[str], what: str) -> str:
    """Why the ``what`` split's labels are not the train split's, in one line."""
    extra, missing = [c for c in other if c not in train], [c for c in train if c not in other]
    if extra or missing:
        return (f"the {what} split's classes differ from the train split's: only in {what}: {extra[:5]}, "
                f"only in train: {missing[:5]}; both splits must label the same classes")
    moved = [(i, a, b) for i, (a, b) in enumerate(zip(train, other)) if a != b]
    return (f"the {what} split numbers the classes differently from the train split; first differences "
            f"(label, train, {what}): {moved[:3]}")


def find_checkpoint(path) -> Path:
    """The folder with fewshot_config.json: ``path`` itself, its ``best/`` or its ``adapter/``."""
    return find_checkpoint_folder(path, CONFIG_NAME, "few-shot CLIP")


def load_classifier(path, device: str | torch.device = "cpu") -> tuple[CLIPClassifier, dict]:
    """The classifier of a checkpoint folder (or a training output_dir) and its config."""
    folder = find_checkpoint(path)
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    if cfg.get("adapter") is not None and not (folder / ADAPTER_DIR).is_dir():
        raise FileNotFoundError(f"checkpoint {folder}: fewshot_config.json names adapter "
                                f"{cfg['adapter'].get('method')!r} but {ADAPTER_DIR}/ is missing; copy the whole "
                                f"checkpoint folder")
    clip, tokenizer = build_clip(cfg["backbone"])
    if (folder / ADAPTER_DIR).is_dir():
        try:
            vp.load_adapter(clip, folder / ADAPTER_DIR, name=cfg.get("adapter_name", "default"))
        except (ValueError, KeyError, vp.TargetError) as err:  # shapes of another model, or an unreadable file
            first = str(err).strip().splitlines()[0]
            raise ValueError(f"checkpoint {folder}: cannot load its adapter into backbone "
                             f"{cfg['backbone'].get('name')!r}: {first}") from None
    clip.requires_grad_(False)
    model = CLIPClassifier(clip.to(device), tokenizer, cfg["classnames"], cfg["template"], cfg["logit_scale"])
    return model.eval(), cfg


@torch.no_grad()
def evaluate(model: CLIPClassifier, dataset, batch_size: int = 64, progress: bool = False,
             num_workers: int = 0) -> dict:
    """Top-1 accuracy over ``dataset`` ((image, label) pairs) and per class (the share of
    each class's images classified right), text features computed once; ``num_workers``
    DataLoader processes decode the images (what bounds a GPU evaluation at 224 px)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
        text = model.text_features()
    k = len(model.classnames)
    correct, total = torch.zeros(k, dtype=torch.long), torch.zeros(k, dtype=torch.long)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc="evaluate", leave=False)
    for images, labels in loader:
        with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):  # CLIP-LoRA's eval
            pred = model(images.to(device), text_features=text).argmax(-1).cpu()
        total += torch.bincount(labels, minlength=k)
        correct += torch.bincount(labels[pred == labels], minlength=k)
    model.train(was)
    if int(total.sum()) == 0:
        raise ValueError("evaluate: the data set is empty")
    per_class = {c: (int(correct[i]) / int(total[i]) if total[i] else None) for i, c in enumerate(model.classnames)}
    return {"accuracy": int(correct.sum()) / int(total.sum()), "per_class_accuracy": per_class,
            "images": int(total.sum())}


@torch.no_grad()
def predict_topk(model: CLIPClassifier, images: list, k: int = 5) -> list[list[tuple[str, float]]]:
    """The top ``k`` (class name, probability) of each PIL image (softmax of the logits)."""
    size, mean, std = image_settings(model.clip)
    tf = eval_transform(size, mean, std)
    device = next(model.parameters()).device
    batch = torch.stack([tf(im.convert("RGB")) for im in images]).to(device)
    probs = F.softmax(model.eval()(batch).float(), dim=-1).cpu()
    top = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return [[(model.classnames[i], float(p)) for p, i in zip(ps.tolist(), idx.tolist())]
            for ps, idx in zip(top.values, top.indices)]


class FewShotCLIPTask(Task):
    def __init__(self, cfg: FewShotCLIPConfig):
        self.cfg = cfg
        self.adapter_name = cfg.adapter_name
        self.trains_nothing = cfg.adapter is None  # zero-shot CLIP: evaluated, not trained
        self.drop_last = False  # CLIP-LoRA's loader keeps each epoch's last partial batch

    def loop_defaults(self, given: dict) -> dict:
        out = {"max_train_steps": 500 * self.cfg.shots, "train_batch_size": 32, "learning_rate": 2e-4,
               "lr_scheduler": "cosine", "adam_weight_decay": 1e-2, "max_grad_norm": 0.0,
               # CLIP-LoRA's fp16 autocast on a GPU; a run kept on the CPU (`cpu: true`) stays fp32
               "mixed_precision": "fp16" if torch.cuda.is_available() and not given.get("cpu") else "no"}
        # the 1e-6 floor belongs to the cosine schedule, and only below the peak
        if given.get("lr_scheduler", "cosine") == "cosine" and given.get("learning_rate", 2e-4) > 1e-6:
            out["lr_min"] = 1e-6
        return out

    def _split(self, split: str):
        c = self.cfg
        return find_classification_split(c.dataset, c.data_root, split, c.dataset_name, c.classnames)

    def setup(self, device, dtype):
        c = self.cfg
        try:
            train = self._split("train")
            test = self._split("test")
            own_val = has_split(c.dataset, c.data_root, "val")
            val = self._split("val") if own_val else train
        except (ValueError, FileNotFoundError) as err:
            raise TrainingError(f"fewshot_clip: {err}") from None
        for other, what in ((test, "test"), (val, "val")):
            if other.classnames != train.classnames:
                raise TrainingError(f"fewshot_clip: {_class_difference(train.classnames, other.classnames, what)}")
        self.train_items = fewshot_subset(train.items, c.shots, c.seed)
        taken = None if own_val else {it.path for it in self.train_items}
        self.val_items = fewshot_subset(val.items, min(4, c.shots), c.seed + VAL_SEED_OFFSET, exclude=taken)
        try:
            check_files(train, self.train_items, f"{train.name} train shots")
            check_files(val, self.val_items, f"{val.name} validation shots")
            check_files(test, None, f"{test.name} test split")
        except FileNotFoundError as err:
            raise TrainingError(f"fewshot_clip: {err}") from None
        self.splits = {"train": train, "val": val, "test": test}
        self.template = c.resolved_template(train.name)
        clip, tokenizer = build_clip(c.backbone)
        if c.adapter is not None:
            try:
                vp.inject(clip, adapter_config(c.adapter, "fewshot_clip"), name=self.adapter_name)
            except vp.TargetError as err:
                raise TrainingError(f"fewshot_clip: {str(err).splitlines()[0]}") from None
        else:
            clip.requires_grad_(False)
        self.model = CLIPClassifier(clip.to(device), tokenizer, train.classnames, self.template)
        self.image_size, mean, std = image_settings(clip)
        self.train_set = ClassificationImages(train, self.train_items,
                                              train_transform(self.image_size, mean, std))
        tf = eval_transform(self.image_size, mean, std)
        self.eval_sets = {"val": ClassificationImages(val, self.val_items, tf),
                          "test": ClassificationImages(test, test.items, tf)}

    def check_output(self, output_dir: Path) -> None:
        """What was drawn goes to fewshot_split.json before any training, so a run can be
        audited and repeated; a folder holding another draw's file (another seed, shots or
        data: a resumed run that would train on other images) is refused, the file kept."""
        path = Path(output_dir) / SPLIT_FILE
        drawn = {"train": [[it.path, it.label, it.classname] for it in self.train_items],
                 "val": [[it.path, it.label, it.classname] for it in self.val_items]}
        if path.exists():
            try:
                same = json.loads(path.read_text()) == drawn
            except ValueError:
                same = False
            if not same:
                raise TrainingError(f"fewshot_clip: {path} holds another draw (another seed, shots or data set); "
                                    f"use another output_dir, or the settings of the run that wrote it")
            return
        write_fewshot_split(path, self.train_items, self.val_items)

    def models(self):
        return {"clip": self.model}

    def train_dataset(self):
        return self.train_set

    def loss(self, models, batch):
        images, labels = batch
        logits = models["clip"](images)
        acc = (logits.detach().argmax(-1) == labels).float().mean()
        return F.cross_entropy(logits.float(), labels), {"train_acc": acc}

    def _config(self) -> dict:
        c = self.cfg
        backbone = dict(c.backbone)
        # local paths absolute, so the checkpoint is read from anywhere; only what build_clip
        # reads as a path (a folder as name, a file as pretrained), never a tag like `openai`
        name, pretrained = backbone.get("name"), backbone.get("pretrained")
        if isinstance(name, str) and Path(name).expanduser().is_dir():
            backbone["name"] = str(Path(name).expanduser().resolve())
        if isinstance(pretrained, str) and (os.sep in pretrained or Path(pretrained).suffix):
            backbone["pretrained"] = str(Path(pretrained).expanduser().resolve())
        return {"backbone": backbone, "adapter": c.adapter, "adapter_name": self.adapter_name,
                "classnames": self.model.classnames, "template": self.template,
                "logit_scale": self.model.logit_scale, "image_size": self.image_size,
                "dataset": c.dataset, "dataset_name": c.dataset_name, "classnames_option": c.classnames,
                "shots": c.shots, "seed": c.seed}

    def save_adapters(self, models, folder):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        clip = models["clip"].clip
        if vp.adapter_names(clip):
            vp.save_adapter(clip, folder / ADAPTER_DIR, name=self.adapter_name)
        write_json(folder / CONFIG_NAME, self._config())

    def load_adapters(self, models, folder):
        if self.cfg.adapter is not None:
            vp.load_adapter(models["clip"].clip, Path(folder) / ADAPTER_DIR, name=self.adapter_name, hotswap=True)
        validations_kept(Path(folder))  # validations after the checkpoint are redone

    def validate(self, models, step, output_dir):
        m = evaluate(models["clip"], self.eval_sets["val"], self.cfg.eval_batch_size)
        row = {"step": step, "val_accuracy": m["accuracy"]}
        with open(Path(output_dir) / "val_metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    def finish(self, models, output_dir):
        """Test accuracy after the last iteration (CLIP-LoRA's protocol: no model selection)."""
        m = evaluate(models["clip"], self.eval_sets["test"], self.cfg.eval_batch_size, progress=True)
        m.update(split="test", shots=self.cfg.shots, seed=self.cfg.seed, template=self.template,
                 adapter=self.cfg.adapter["method"] if self.cfg.adapter else None,
                 trainable_parameters=vp.trainable_parameters(models["clip"].clip) if self.cfg.adapter else 0)
        write_json(Path(output_dir) / "metrics.json", m)
        return {"test_accuracy": m["accuracy"]}


def _load_task(values: dict) -> Task:
    return FewShotCLIPTask(FewShotCLIPConfig.from_dict(values))
