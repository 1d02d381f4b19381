"""The `visionpeft` command: list methods, inspect saved adapters, train from a config."""
from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from collections import Counter
from pathlib import Path


# `visionpeft methods` reads this file (written from the registry by `make methods-catalog`,
# checked equal to it by a test), so that listing methods needs no torch import
METHODS_CATALOG = Path(__file__).parent / "methods" / "catalog.json"


def _cmd_methods(args) -> int:
    import json

    try:
        catalog = json.loads(METHODS_CATALOG.read_text())
    except FileNotFoundError:  # a source tree without the file: ask the registry itself
        catalog = describe_methods_live()
    for m in catalog:
        files = f"files: {m['factor_layout']}" if m["factor_layout"] else ""
        print(f"{m['name']:<12} {m['config']:<20} layers: {', '.join(m['layer_kinds']):<16} "
              f"{'merges' if m['weight_space'] else '':<8}{files}".rstrip())
        if args.verbose:
            if m["doc"]:
                print("    " + "\n    ".join(m["doc"].splitlines()))
            for field, default in m["fields"]:
                print(f"      {field} = {default}")
    return 0


def describe_methods_live() -> list[dict]:
    """Each registered method as plain data: name, config class, layer kinds, file layout,
    doc and every config field (the shared ones too) with its default. Imports torch."""
    from . import get_method, list_methods

    out = []
    for name in list_methods():
        spec = get_method(name)
        fields = []
        for f in dataclasses.fields(spec.config_cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            fields.append([f.name, repr(default)])
        out.append({"name": name, "config": spec.config_cls.__name__, "layer_kinds": list(spec.layer_kinds),
                    "weight_space": spec.weight_space, "factor_layout": spec.factor_layout,
                    "doc": (spec.config_cls.__doc__ or "").strip(), "fields": fields})
    return out


def write_methods_catalog(path=METHODS_CATALOG) -> None:
    """Regenerate methods/catalog.json from the registry (`make methods-catalog`)."""
    import json

    path.write_text(json.dumps(describe_methods_live(), indent=1) + "\n")


def _safetensors_summary(file) -> tuple[int, int]:
    """(tensor count, parameter count) of a .safetensors file, from its header alone."""
    import json
    import math
    import struct

    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{file} is not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(size))
        except (ValueError, MemoryError, OverflowError):
            raise ValueError(f"{file} is not a safetensors file (unreadable header)") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    return len(tensors), sum(math.prod(v.get("shape", ())) for v in tensors.values())


def _tensor_line(file) -> str:
    n, params = _safetensors_summary(file)
    return f"{n} tensors, {params:,} parameters in {file.name}"


def _info_peft(path, doc: dict) -> int:
    """A PEFT folder (adapter_config.json with peft_type): what its config and weights say."""
    print(f"adapter:     PEFT {doc.get('peft_type')} adapter  ({path})")
    main_keys = ("r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "bias", "task_type")
    print("config:      " + ", ".join(f"{k}={doc[k]}" for k in main_keys if k in doc))
    if doc.get("base_model_name_or_path"):
        print(f"base model:  {doc['base_model_name_or_path']}")
    print(f"targets:     {doc.get('target_modules')}")
    weights = [path / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (path / n).is_file()]
    if not weights:
        print("weights:     none found (adapter_model.safetensors / adapter_model.bin)")
    elif weights[0].suffix == ".safetensors":
        print(f"weights:     {_tensor_line(weights[0])}")
    else:
        print(f"weights:     {weights[0].name} (a pickle: not opened; convert it to safetensors)")
    print(f"load:        vp.load_adapter(model, {str(path)!r}) imports it into a visionpeft adapter")
    return 0


def _info_change_detection(path, folders: list) -> int:
    """A change-detection checkpoint (cd_config.json, decoder weights, the encoder's adapter
    in encoder/): what each folder holds and where the adapter is."""
    import json

    for folder in folders:
        cfg = json.loads((folder / "cd_config.json").read_text())
        backbone = cfg.get("backbone") or {}
        print(f"change-detection checkpoint: {folder}")
        print(f"  backbone:  {backbone.get('name')} ({backbone.get('source', 'timm')}"
              f"{', random init' if backbone.get('pretrained') is False else ''})")
        print(f"  model:     image_size={cfg.get('image_size')}, decoder_channels={cfg.get('decoder_channels')}, "
              f"exchange={cfg.get('exchange')}")
        holds = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
        print(f"  holds:     {', '.join(holds)}")
        if (folder / "decoder.safetensors").is_file():
            print(f"  decoder:   {_tensor_line(folder / 'decoder.safetensors')}")
        encoder = folder / "encoder"
        if (encoder / "adapter_config.json").is_file():
            method = (cfg.get("adapter") or {}).get("method", "?")
            print(f"  adapter:   {encoder} ({method}; visionpeft info {encoder} describes it)")
        else:
            print("  adapter:   none (the encoder was trained frozen)")
    print(f"use:         visionpeft evaluate-cd --checkpoint {path} / visionpeft predict-cd --checkpoint {path}")
    return 0


def _cmd_info(args) -> int:
    import json
    from pathlib import Path

    from . import read_adapter_config

    path = Path(args.adapter_dir)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    cd = [f for f in (path, path / "best", path / "adapter") if (f / "cd_config.json").is_file()]
    if cd and not (path / "adapter_config.json").is_file():
        return _info_change_detection(path, cd[:1] if cd[0] == path else cd)
    cfg_file = path / "adapter_config.json"
    subs = sorted(p for p in path.iterdir() if (p / "adapter_config.json").is_file()) \
        if path.is_dir() and not cfg_file.is_file() else []
    if subs:  # a folder per model (a training's adapter/, DreamBooth's export/peft/): each in turn
        print(f"{path} holds {len(subs)} adapter folders, one per model: {', '.join(p.name for p in subs)}")
        for sub in subs:
            print()
            _cmd_info(argparse.Namespace(adapter_dir=str(sub), all=args.all))
        return 0
    if cfg_file.is_file():
        try:
            raw = json.loads(cfg_file.read_text())
        except ValueError as err:
            raise ValueError(f"{cfg_file} is not valid JSON: {err}") from None
        if isinstance(raw, dict) and "peft_type" in raw and raw.get("format") != "visionpeft":
            return _info_peft(path, raw)
    doc = read_adapter_config(args.adapter_dir)
    cfg = doc["config"]
    print(f"adapter:     {doc.get('name')}  ({args.adapter_dir})")
    print(f"method:      {doc['method']} (layout v{doc.get('method_version')}, file format "
          f"v{doc['format_version']}, written by visionpeft {doc.get('visionpeft_version')})")
    fields = {k: v for k, v in cfg.items() if k not in ("method", "target_modules", "exclude_modules")}
    print("config:      " + ", ".join(f"{k}={v}" for k, v in fields.items()))
    print(f"targets:     {cfg.get('target_modules')}")
    print(f"trainable:   {doc.get('trainable_parameters', 0):,} parameters")
    targets = doc.get("targets", {})
    kinds = Counter(t["kind"] for t in targets.values())
    print(f"layers:      {len(targets)} ({', '.join(f'{n} {k}' for k, n in kinds.items())})")
    rows = list(targets.items())
    shown = rows if args.all else rows[:12]
    width = max((len(n) for n, _ in shown), default=0)
    for name, info in shown:
        parts = ",".join(info["parts"])
        print(f"  {name:<{width}}  {info['kind']:<7} base {tuple(info['base_shape'])}  parts {parts}")
    if len(rows) > len(shown):
        print(f"  ... {len(rows) - len(shown)} more (--all lists every layer)")
    for name, shapes in doc.get("modules_to_save", {}).items():
        print(f"  trained in full: {name} {shapes}")
    return 0


def _yaml_loader():
    """PyYAML's safe loader, also reading exponent floats without a dot or an exponent sign
    (``1e-4``, ``2e5``: floats in YAML 1.2 and Python, strings under PyYAML's YAML 1.1)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                                 list("-+0123456789."))
    return Loader


def load_config(path: str, overrides: list[str]) -> dict:
    """A YAML file plus ``key=value`` overrides (values parsed as YAML; dotted keys reach
    into mappings, e.g. ``adapter.r=8``)."""
    from pathlib import Path

    import yaml

    loader = _yaml_loader()

    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    if not file.is_file():
        raise FileNotFoundError(f"config file {path} is not a file")
    try:
        values = yaml.load(file.read_text(), Loader=loader) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{_yaml_problem(err, path)} (not valid YAML)") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text (YAML) file") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of keys (key: value lines), got a "
                         f"{type(values).__name__}")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE (e.g. --set adapter.r=8), got {item!r}")
        target = values
        *parents, leaf = key.split(".")
        for p in parents:
            target = target.setdefault(p, {})
            if not isinstance(target, dict):
                raise ValueError(f"--set {key}: {p} is not a mapping in {path}")
        try:
            target[leaf] = yaml.load(raw, Loader=loader)
        except yaml.YAMLError as err:
            raise ValueError(f"--set {key}: the value {raw!r} is not valid YAML: "
                             f"{_yaml_problem(err, None)}") from None
    return values


def _yaml_problem(err, path: str | None) -> str:
    """``path:line:column: problem`` of a YAML error (line and column from 1), on one line."""
    import yaml

    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}"
        what = err.problem or "syntax error"
        if err.context:
            ctx = err.context
            if err.context_mark is not None and (err.context_mark.line, err.context_mark.column) != \
                    (mark.line, mark.column):
                ctx += f" that started at line {err.context_mark.line + 1}, column {err.context_mark.column + 1}"
            what += f" ({ctx})"
        return f"{path}:{mark.line + 1}:{mark.column + 1}: {what}" if path else f"{where}: {what}"
    first = (str(err).splitlines() or ["syntax error"])[0]
    return f"{path}: {first}" if path else first


def _cmd_train(args) -> int:
    from .train import run_config

    result = run_config(load_config(args.config, args.set or []))
    print(f"trained {result.step} steps; adapter in {result.adapter_dir}")
    return 0


def _cmd_evaluate_cd(args) -> int:
    import json
    from pathlib import Path

    from .data.change_detection import ChangeDetectionDataset, find_triples
    from .pipelines.change_detection import evaluate, load_detector

    model, cfg = load_detector(args.checkpoint)
    data = ChangeDetectionDataset(find_triples(args.data_root, args.split))
    metrics = evaluate(model, data, cfg["image_size"], args.batch_size)
    keys = ("oa", "kappa", "precision", "recall", "f1", "iou")
    print("  ".join(f"{k} {metrics[k]:.4f}" for k in keys))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(metrics, indent=2))
    return 0


def _read_rgb(path: str):
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except (FileNotFoundError, UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def _cmd_predict_cd(args) -> int:
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from .pipelines.change_detection import load_detector, predict_probs

    a, b = _read_rgb(args.image_a), _read_rgb(args.image_b)
    if a.shape != b.shape:
        raise ValueError(f"{args.image_a} is {a.shape[3]}x{a.shape[2]} but {args.image_b} is "
                         f"{b.shape[3]}x{b.shape[2]}; the two dates must have the same size")
    model, cfg = load_detector(args.checkpoint)  # a bad checkpoint leaves no folders behind
    for out in (args.output, args.overlay):  # like evaluate-cd --output: parent folders are made
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
    tile = args.tile or cfg["image_size"]
    probs = predict_probs(model, a, b, tile, args.stride)[0]
    mask = (probs > 0.5).numpy().astype(np.uint8) * 255
    Image.fromarray(mask).save(args.output)
    changed = float((mask > 0).mean()) * 100
    if args.overlay:
        base = (b[0].permute(1, 2, 0).numpy() * 255).astype(np.float32)
        red = np.zeros_like(base)
        red[..., 0] = 255
        m = (mask > 0)[..., None]
        Image.fromarray(np.where(m, 0.5 * base + 0.5 * red, base).astype(np.uint8)).save(args.overlay)
    print(f"changed area {changed:.2f}%; mask written to {args.output}"
          + (f", overlay to {args.overlay}" if args.overlay else ""))
    return 0


def _cmd_evaluate_seg(args) -> int:
    import json
    from pathlib import Path

    from .data.segmentation import SegmentationDataset, find_split
    from .pipelines.segmentation import evaluate, load_segmenter

    model, cfg = load_segmenter(args.checkpoint)
    options = dict(cfg.get("dataset_options") or {})
    split = find_split(args.dataset or cfg.get("dataset") or "folder", args.data_root, args.split,
                       domain=args.domain, **options)
    if len(split.classes) != cfg["num_classes"]:
        raise ValueError(f"{args.data_root} has {len(split.classes)} classes {split.classes} but the checkpoint "
                         f"predicts {cfg['num_classes']}")
    # the validation's settings unless overridden: the same tiles, windows and stride
    data = SegmentationDataset(split, tile=cfg.get("cut_tiles"))
    metrics = evaluate(model, data, args.tile or cfg["image_size"], cfg["num_classes"], split.ignore_index,
                       args.stride or cfg.get("eval_stride"), scale=cfg.get("base_scale", 1.0))
    metrics["classes"] = list(split.classes)
    print("  ".join(f"{k} {metrics[k]:.4f}" for k in ("oa", "miou", "mf1")))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(metrics, indent=2))
    return 0


def _cmd_predict_seg(args) -> int:
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from .pipelines.segmentation import load_segmenter, predict_probs
    from .pipelines.segmentation.render import colour_overlay

    image = _read_rgb(args.image)
    model, cfg = load_segmenter(args.checkpoint)  # a bad checkpoint leaves no files behind
    for out in (args.output, args.overlay):
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
    classes = cfg.get("classes") or [f"class {i}" for i in range(cfg["num_classes"])]
    mask = predict_probs(model, image, args.tile or cfg["image_size"], args.stride or cfg.get("eval_stride"),
                         cfg.get("base_scale", 1.0))[0].argmax(0).numpy()
    Image.fromarray(mask.astype(np.uint8)).save(args.output)
    if args.overlay:
        colour_overlay(image[0].permute(1, 2, 0).numpy(), mask, classes).save(args.overlay)
    areas = np.bincount(mask.ravel(), minlength=len(classes)) / mask.size * 100
    print("; ".join(f"{c} {a:.1f}%" for c, a in zip(classes, areas)) + f"; class indices written to {args.output}"
          + (f", overlay to {args.overlay}" if args.overlay else ""))
    return 0


def _write_json_atomic(path: str, data) -> None:
    """``data`` as JSON at ``path``, written whole or not at all (vp.atomic_write_file)."""
    import json
    from pathlib import Path

    import visionpeft as vp

    out = Path(path)
    if out.is_dir():
        raise ValueError(f"--output {path} is a folder; give a file name like metrics.json")
    text = json.dumps(data, indent=2)
    vp.atomic_write_file(out, lambda tmp: Path(tmp).write_text(text))


def _check_json_output(output) -> None:
    if output and not output.endswith(".json"):
        raise ValueError(f"--output {output}: give a .json file name")


def _check_top(top: int, what: str) -> None:
    if top < 1:
        raise ValueError(f"--top {top}: give how many classes to list per {what}, 1 or more")


def _device(name):
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name; give cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is visible to torch here; give --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible; give cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1}")
    return name


def _cmd_evaluate_fewshot(args) -> int:
    from .data.fewshot import ClassificationImages, check_files, find_classification_split
    from .pipelines.fewshot_clip import eval_transform, evaluate, image_settings, load_classifier

    _check_json_output(args.output)
    if args.workers < 0 or args.batch_size < 1:
        raise ValueError(f"--workers {args.workers} --batch-size {args.batch_size}: give workers >= 0 and a "
                         f"batch size >= 1")
    model, cfg = load_classifier(args.checkpoint, _device(args.device))  # fails before any data is read
    dataset = args.dataset or cfg.get("dataset") or "imagefolder"
    name = args.dataset_name or cfg.get("dataset_name")
    split = find_classification_split(dataset, args.data_root, args.split, name, cfg.get("classnames_option"))
    check_files(split, None, f"{split.name} {args.split} split")
    if split.classnames != model.classnames:  # CLIP reads any class names: these data's
        print(f"note: the data's {len(split.classnames)} classes differ from the checkpoint's "
              f"{len(model.classnames)}; classifying among the data's")
        model.set_classes(split.classnames)
    size, mean, std = image_settings(model.clip)
    data = ClassificationImages(split, split.items, eval_transform(size, mean, std))
    metrics = evaluate(model, data, args.batch_size, progress=True, num_workers=args.workers)
    metrics.update(split=args.split, checkpoint=str(args.checkpoint))
    print(f"accuracy {metrics['accuracy']:.4f} on {metrics['images']} images ({len(split.classnames)} classes)")
    if args.output:
        _write_json_atomic(args.output, metrics)
    return 0


def _cmd_predict_fewshot(args) -> int:
    from PIL import Image, UnidentifiedImageError

    from .pipelines.fewshot_clip import load_classifier, predict_topk

    _check_json_output(args.output)
    _check_top(args.top, "image")
    images = []
    for path in args.images:  # every image is read before the model is built
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except (FileNotFoundError, UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
            raise ValueError(f"cannot read image {path}: {err}") from None
    model, _ = load_classifier(args.checkpoint, _device(args.device))
    results = []
    for start in range(0, len(images), 32):
        for path, top in zip(args.images[start:start + 32], predict_topk(model, images[start:start + 32], args.top)):
            results.append({"path": path, "top": [[c, p] for c, p in top]})
            print(f"{path}: " + ", ".join(f"{c} {p:.3f}" for c, p in top))
    if args.output:
        _write_json_atomic(args.output, results)
    return 0


def _point_split(args, cfg: dict, split: str):
    """The data split a point-cloud command reads: the checkpoint's data set and variant
    unless --dataset / --variant say otherwise; its classes must be the checkpoint's."""
    from .data.points import read_point_split

    dataset = args.dataset or cfg.get("dataset")
    if dataset not in ("modelnet40", "scanobjectnn"):
        raise ValueError(f"--dataset {dataset}: point-cloud files are read as modelnet40 or scanobjectnn (a "
                         f"checkpoint trained on synthetic shapes names its data set with --dataset)")
    data = read_point_split(dataset, args.data_root, split, args.variant or cfg.get("variant") or "PB_T50_RS")
    if list(data.classes) != list(cfg["classes"]):
        raise ValueError(f"the {dataset} classes ({len(data.classes)}: {data.classes[:4]} ...) are not the "
                         f"checkpoint's ({len(cfg['classes'])}: {cfg['classes'][:4]} ...)")
    return data


def _cmd_evaluate_points(args) -> int:
    from .data.points import PointClouds
    from .pipelines.pointcloud import evaluate, load_classifier

    _check_json_output(args.output)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: give 1 or more")
    model, cfg = load_classifier(args.checkpoint, _device(args.device))  # fails before any data is read
    data = _point_split(args, cfg, args.split)
    metrics = evaluate(model, PointClouds(data, cfg["num_points"], cfg.get("dataset", ""), train=False),
                       cfg["classes"], args.batch_size, progress=True)
    metrics.update(split=args.split, checkpoint=str(args.checkpoint))
    print(f"accuracy {metrics['accuracy']:.4f}, mean-class accuracy {metrics['mean_class_accuracy']:.4f} on "
          f"{metrics['clouds']} clouds")
    if args.output:
        _write_json_atomic(args.output, metrics)
    return 0


def _cmd_predict_points(args) -> int:
    import torch

    from .data.points import read_cloud, resample
    from .pipelines.pointcloud import load_classifier

    _check_json_output(args.output)
    _check_top(args.top, "cloud")
    clouds = [read_cloud(p) for p in args.clouds]  # every cloud is read and checked before the model is built
    model, cfg = load_classifier(args.checkpoint, _device(args.device))
    device = next(model.parameters()).device
    results = []
    with torch.no_grad():
        for path, cloud in zip(args.clouds, clouds):
            points = torch.from_numpy(resample(cloud, cfg["num_points"], None))[None].to(device)
            probs = torch.softmax(model(points).float(), -1)[0].cpu()
            top = probs.topk(min(args.top, len(probs)))
            pairs = [[cfg["classes"][i], float(p)] for p, i in zip(top.values.tolist(), top.indices.tolist())]
            results.append({"path": path, "top": pairs})
            print(f"{path}: " + ", ".join(f"{c} {p:.3f}" for c, p in pairs))
    if args.output:
        _write_json_atomic(args.output, results)
    return 0


def _cmd_build_bank(args) -> int:
    import visionpeft as vp

    from .data.points import PointClouds
    from .pipelines.pointcloud import find_checkpoint, frozen_features, load_classifier

    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: give 1 or more")
    folder = find_checkpoint(args.checkpoint)
    model, cfg = load_classifier(folder, _device(args.device))
    name = cfg.get("adapter_name", "default")
    model.eval()
    method = cfg["adapter"].get("method") if isinstance(cfg.get("adapter"), dict) else None
    if method != "point_peft":
        raise ValueError(f"{folder}: its adapter is {method or 'none (full fine-tuning)'}; only point_peft has a "
                         f"memory bank")
    data = _point_split(args, cfg, args.split)
    feats = frozen_features(model, PointClouds(data, cfg["num_points"], cfg.get("dataset", ""), train=False),
                            args.batch_size)
    vp.set_memory_bank(model, feats, name=name)
    vp.save_adapter(model, folder / "model", name=name)  # replaced whole or not at all
    print(f"memory bank of {len(feats)} {args.split} clouds written to {folder / 'model'}")
    return 0


def _parse_concept(text: str) -> dict:
    """ADAPTER:PROMPT:WORDS (the prompt may hold colons; words comma-separated)."""
    if text.count(":") < 2:
        raise ValueError(f"--concept {text!r}: give ADAPTER:PROMPT:WORDS, e.g. 'dog:a sks dog and a cat:sks dog'")
    adapter, rest = text.split(":", 1)
    prompt, words = rest.rsplit(":", 1)
    words = [w.strip() for w in words.split(",") if w.strip()]
    if not adapter.strip() or not prompt.strip() or not words:
        raise ValueError(f"--concept {text!r}: ADAPTER, PROMPT and WORDS must each be non-empty")
    return {"adapter": adapter.strip(), "prompt": prompt.strip(), "words": words}


def _cmd_compose(args) -> int:
    import json
    import os
    import time
    from pathlib import Path

    import torch

    import visionpeft as vp

    from .pipelines.clora import compose, load_pipeline_adapter, mask_picture

    adapters = {}
    for item in args.adapter:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"--adapter {item!r}: give NAME=PATH")
        if name.strip() in adapters:
            raise ValueError(f"--adapter {name.strip()!r} is given twice")
        adapters[name.strip()] = path.strip()
    concepts = [_parse_concept(c) for c in args.concept]
    from .backbones import embedded_sd

    sampling = embedded_sd.guidance_defaults(args.pipeline)  # embedded-sd's evaluated ones, by name or path
    guidance = sampling["guidance_scale"] if args.guidance is None else args.guidance
    rescale = sampling["guidance_rescale"] if args.guidance_rescale is None else args.guidance_rescale
    if not 0 <= rescale <= 1:
        raise ValueError(f"--guidance-rescale {rescale:g}: give 0 (off) to 1 (about 0.7 for zero-terminal-SNR models)")
    used = {c["adapter"] for c in concepts} | ({args.style} if args.style else set())
    unknown = sorted(used - set(adapters))
    if unknown:
        raise ValueError(f"the concepts name adapters {unknown} that no --adapter NAME=PATH loads "
                         f"(loaded: {sorted(adapters)})")
    scales = {}
    for item in args.scale:
        name, _, value = item.partition("=")
        if name not in adapters:
            raise ValueError(f"--scale {item!r}: no adapter named {name!r} (loaded: {sorted(adapters)})")
        try:
            scales[name] = float(value)
        except ValueError:
            raise ValueError(f"--scale {item!r}: give NAME=NUMBER") from None
    for name, path in adapters.items():
        if not Path(path).exists():
            raise FileNotFoundError(f"--adapter {name}={path}: no such file or folder")
    out = Path(args.output)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise ValueError(f"-o {out}: give an image file name (.png, .jpg, .webp)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device != "cpu" else torch.float32)
    pipe = _load_diffusion_pipeline(args.pipeline, dtype)
    pipe.to(device)
    for name, path in adapters.items():
        load_pipeline_adapter(pipe, path, name)
    for name, value in scales.items():
        for comp in ("unet", "text_encoder", "text_encoder_2"):
            model = getattr(pipe, comp, None)
            if model is not None and name in vp.adapter_names(model):
                vp.set_scale(model, name, value)
    refine_at = tuple(int(v) for v in args.refine_at.split(",") if v.strip()) if args.refine_at else ()
    generator = torch.Generator(device=device).manual_seed(args.seed)
    start = time.perf_counter()
    result = compose(pipe, args.prompt, concepts, style=args.style, num_inference_steps=args.steps,
                     guidance_scale=guidance, guidance_rescale=rescale, step_size=args.step_size,
                     update_until=args.update_until, refine_at=refine_at, refine_rounds=args.refine_rounds,
                     mask_alpha=args.mask_alpha,
                     attn_res=args.attn_res, batched=not args.sequential, generator=generator,
                     negative_prompt=args.negative_prompt, height=args.height, width=args.width)
    seconds = time.perf_counter() - start
    image = result.images[0]
    labels = [f"0 base: {args.prompt}"] + [f"{k + 1} {c['adapter']}: {c['prompt']}" for k, c in enumerate(concepts)]
    masks_path = out.with_name(out.stem + ".masks.png")
    json_path = out.with_name(out.stem + ".json")
    report = {"settings": result.settings, "adapters": adapters, "seed": args.seed, "device": device,
              "dtype": str(dtype).replace("torch.", ""), "seconds": round(seconds, 2),
              "unet_calls": result.unet_calls, "losses": result.losses,
              "refine_losses": {str(k): v for k, v in result.refine_losses.items()},
              "branches": result.branches, "image": out.name, "masks": masks_path.name}
    out.parent.mkdir(parents=True, exist_ok=True)
    files = [(out, lambda f: image.save(f, format=_image_format(out))),
             (masks_path, lambda f: mask_picture(result.masks, image.size, labels).save(f, format="PNG")),
             (json_path, lambda f: f.write(json.dumps(report, indent=2).encode()))]
    tmps = [path.with_name(f".{path.name}.tmp") for path, _ in files]
    try:  # all three written aside first, then put in place: a failed write leaves none
        for (_, write), tmp in zip(files, tmps):
            with open(tmp, "wb") as f:
                write(f)
        for (path, _), tmp in zip(files, tmps):
            os.replace(tmp, path)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
    print(f"wrote {out}, {masks_path.name} and {json_path.name} ({seconds:.1f} s, {result.unet_calls} UNet passes)")
    return 0


def _image_format(path) -> str:
    return {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")


def _load_diffusion_pipeline(folder: str, dtype):
    """diffusers' own loader on a pipeline folder; a folder that is not one is a one-line error."""
    from pathlib import Path

    from diffusers import DiffusionPipeline

    from .backbones.embedded_sd import resolve

    folder = resolve(folder)  # the packaged `embedded-sd` by name
    if not (Path(folder) / "model_index.json").is_file():
        raise FileNotFoundError(f"--pipeline {folder}: not a diffusers pipeline folder (no model_index.json)")
    try:
        pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype)
    except OSError as err:
        raise FileNotFoundError(f"--pipeline {folder}: {err}") from None
    pipe.set_progress_bar_config(leave=False)
    return pipe


def _demo_hub():
    """demos/app.py of the source tree this package runs from (the demos are not packaged)."""
    import importlib.util
    from pathlib import Path

    app = Path(__file__).resolve().parents[1] / "demos" / "app.py"
    if not app.is_file():
        raise FileNotFoundError(f"no {app}: the Gradio demos ship with the source tree, not the installed "
                                "package; run from a clone installed with pip install -e .")
    if importlib.util.find_spec("gradio") is None:
        raise ValueError("gradio is not installed (pip install gradio)")
    spec = importlib.util.spec_from_file_location("visionpeft_demo_hub", app)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cmd_demo(args) -> int:
    # the hub's own parser reads the options, so a new tab's flag needs no change here
    return _demo_hub().main(args.hub_args, prog="visionpeft demo")


# the task names YAML configs take (the pipelines register them; tests check this list is complete,
# so that `train --help` need not import every pipeline)
TASKS = ("change_detection", "dreambooth", "fewshot_clip", "point_classification", "pretrain_clip",
         "pretrain_embedded", "pretrain_point_mae", "pretrain_sd_unet", "pretrain_sd_vae", "segmentation")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="visionpeft", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Parameter-efficient adapters for "
                                "vision and diffusion models.")
    p.add_argument("--version", action="version", version=f"visionpeft {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser = functools.partial(sub.add_parser, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = sub.add_parser("methods", help="list registered adapter methods")
    m.add_argument("-v", "--verbose", action="store_true", help="show each config's doc and every field with "
                   "its default")
    m.set_defaults(func=_cmd_methods)
    i = sub.add_parser("info", help="describe a saved adapter folder")
    i.add_argument("adapter_dir")
    i.add_argument("--all", action="store_true", help="list every adapted layer")
    i.set_defaults(func=_cmd_info)
    t = sub.add_parser("train", help="train an adapter from a YAML config (see configs/)",
                       epilog=f"tasks (the config's task: key): {', '.join(TASKS)}. Their keys: README.md "
                              "'Training' (the loop's and DreamBooth's), 'Change detection (PeftCD)', and the "
                              "commented configs/*.yaml; a mistyped key is refused naming the closest.")
    t.add_argument("config")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key (repeatable; dotted keys reach into mappings)")
    t.set_defaults(func=_cmd_train)
    e = sub.add_parser("evaluate-cd", help="change-detection metrics of a checkpoint on a data split")
    e.add_argument("--checkpoint", required=True, help="a training output_dir, its best/ or adapter/")
    e.add_argument("--data-root", required=True, help="a LEVIR-CD / WHU-CD / S2Looking layout or list files")
    e.add_argument("--split", default="test", help="the split to evaluate")
    e.add_argument("--batch-size", type=int, default=4, help="image pairs per forward")
    e.add_argument("--output", help="write the metrics as JSON here")
    e.set_defaults(func=_cmd_evaluate_cd)
    d = sub.add_parser("predict-cd", help="change mask of one image pair (sliding window)")
    d.add_argument("--checkpoint", required=True)
    d.add_argument("image_a")
    d.add_argument("image_b")
    d.add_argument("-o", "--output", required=True, help="0/255 mask PNG")
    d.add_argument("--overlay", help="date B with the changes in red")
    d.add_argument("--tile", type=int, help="window size (default: the training image size)")
    d.add_argument("--stride", type=int, help="window stride (default: half the tile)")
    d.set_defaults(func=_cmd_predict_cd)
    e = sub.add_parser("evaluate-seg", help="segmentation metrics (OA, macro mIoU / mF1, per class) of a checkpoint")
    e.add_argument("--checkpoint", required=True, help="a training output_dir, its best/ or adapter/")
    e.add_argument("--data-root", required=True, help="the data set's folder")
    e.add_argument("--dataset", help="loveda, potsdam, vaihingen, mmseg, folder, synthetic (default: the checkpoint's)")
    e.add_argument("--domain", help="LoveDA Urban / Rural; synthetic source / target")
    e.add_argument("--split", default="val", help="the split to evaluate (case-insensitive)")
    e.add_argument("--tile", type=int, help="window size (default: the training image size)")
    e.add_argument("--stride", type=int, help="window stride (default: two thirds of the tile)")
    e.add_argument("--output", help="write the metrics as JSON here")
    e.set_defaults(func=_cmd_evaluate_seg)
    d = sub.add_parser("predict-seg", help="class map of one image (sliding window)")
    d.add_argument("--checkpoint", required=True)
    d.add_argument("image")
    d.add_argument("-o", "--output", required=True, help="PNG of class indices")
    d.add_argument("--overlay", help="the image with the classes in colour and a legend")
    d.add_argument("--tile", type=int, help="window size (default: the training image size)")
    d.add_argument("--stride", type=int, help="window stride (default: two thirds of the tile)")
    d.set_defaults(func=_cmd_predict_seg)
    e = sub.add_parser("evaluate-fewshot", help="few-shot CLIP accuracy (overall and per class) of a checkpoint")
    e.add_argument("--checkpoint", required=True, help="a training output_dir or its adapter/")
    e.add_argument("--data-root", required=True, help="the folder holding the data set folders (as in training)")
    e.add_argument("--split", default="test", choices=["train", "val", "test"], help="the split to evaluate")
    e.add_argument("--dataset", choices=["coop", "imagenet", "imagefolder"], help="default: the checkpoint's")
    e.add_argument("--dataset-name", help="a CoOp data set, e.g. EuroSAT (default: the checkpoint's)")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--workers", type=int, default=0, help="DataLoader processes decoding images (default 0)")
    e.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when there is one)")
    e.add_argument("--output", help="write the metrics (accuracy, per_class_accuracy) as JSON here")
    e.set_defaults(func=_cmd_evaluate_fewshot)
    d = sub.add_parser("predict-fewshot", help="top classes of images with a few-shot CLIP checkpoint")
    d.add_argument("--checkpoint", required=True)
    d.add_argument("images", nargs="+", help="image files")
    d.add_argument("--top", type=int, default=5, help="how many classes per image")
    d.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when there is one)")
    d.add_argument("--output", help='JSON list of {"path", "top": [[class, probability], ...]}')
    d.set_defaults(func=_cmd_predict_fewshot)
    for cmd, helptext in (("evaluate-points", "point-cloud classification accuracy (overall, mean-class) of a "
                                              "checkpoint"),
                          ("build-bank", "rebuild a Point-PEFT checkpoint's memory bank from a data split")):
        e = sub.add_parser(cmd, help=helptext)
        e.add_argument("--checkpoint", required=True, help="a training output_dir, its best/ or adapter/")
        e.add_argument("--data-root", required=True, help="ModelNet40's or ScanObjectNN's folder")
        e.add_argument("--split", default="test" if cmd == "evaluate-points" else "train", choices=["train", "test"])
        e.add_argument("--dataset", choices=["modelnet40", "scanobjectnn"], help="default: the checkpoint's")
        e.add_argument("--variant", choices=["PB_T50_RS", "OBJ_BG", "OBJ_ONLY"],
                       help="ScanObjectNN's variant (default: the checkpoint's)")
        e.add_argument("--batch-size", type=int, default=64)
        e.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when there is one)")
        if cmd == "evaluate-points":
            e.add_argument("--output", help="write the metrics (accuracy, mean_class_accuracy) as JSON here")
        e.set_defaults(func=_cmd_evaluate_points if cmd == "evaluate-points" else _cmd_build_bank)
    d = sub.add_parser("predict-points", help="top classes of point clouds (.ply, .npy, .txt) with a checkpoint")
    d.add_argument("--checkpoint", required=True)
    d.add_argument("clouds", nargs="+", help="cloud files: .ply, .npy or .txt (x y z per row)")
    d.add_argument("--top", type=int, default=5, help="how many classes per cloud")
    d.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when there is one)")
    d.add_argument("--output", help='JSON list of {"path", "top": [[class, probability], ...]}')
    d.set_defaults(func=_cmd_predict_points)
    c = sub.add_parser("compose", help="CLoRA: several concept adapters in one image (one UNet pass per step)")
    c.add_argument("--pipeline", required=True, help="a diffusers Stable Diffusion 1.x/2.x or SDXL pipeline folder, or "
                   "embedded-sd (the packaged one)")
    c.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="an adapter to load (repeatable): our folder, a DreamBooth output folder, or a diffusers / "
                        "PEFT / kohya / LyCORIS file")
    c.add_argument("--prompt", required=True, help="the base prompt, mentioning every concept")
    c.add_argument("--concept", action="append", default=[], required=True, metavar="ADAPTER:PROMPT:WORDS",
                   help="a concept (repeatable): its adapter, its prompt, and the words of that prompt that are "
                        "the concept (comma-separated), e.g. 'dog:a sks dog and a cat:sks dog'")
    c.add_argument("--style", metavar="NAME", help="an adapter on in every branch (loaded with --adapter)")
    c.add_argument("--scale", action="append", default=[], metavar="NAME=VALUE", help="an adapter's scale")
    c.add_argument("--steps", type=int, default=50, help="denoising steps")
    c.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: 7.5; for embedded-sd "
                   "the guidance it was evaluated with)")
    c.add_argument("--guidance-rescale", type=float, help="diffusers' guidance_rescale in [0, 1] (default: 0; for "
                   "embedded-sd the value it was evaluated with)")
    c.add_argument("--step-size", type=float, default=20, help="latent update step size")
    c.add_argument("--update-until", type=int, default=25, help="update the latent while step < this")
    c.add_argument("--refine-at", default="0,10,20", help="steps with extra refinement rounds (comma-separated)")
    c.add_argument("--refine-rounds", type=int, default=20, help="extra rounds at each of those steps")
    c.add_argument("--mask-alpha", type=float, default=0.3, help="mask = token map > alpha * its max")
    c.add_argument("--attn-res", type=int, help="width of the captured attention grid (default: 16 at 512 px "
                   "on SD 1.5, the middle cross-attention resolution elsewhere)")
    c.add_argument("--negative-prompt", help="negative prompt of every branch")
    c.add_argument("--height", type=int, help="image height (default: the pipeline's)")
    c.add_argument("--width", type=int, help="image width (default: the pipeline's)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--sequential", action="store_true", help="one UNet pass per branch, as the authors' code")
    c.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when there is one)")
    c.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="default: float16 on a GPU, float32 on the CPU")
    c.add_argument("-o", "--output", required=True, help="the image; NAME.masks.png and NAME.json go beside it")
    c.set_defaults(func=_cmd_compose)
    g = sub.add_parser("demo", add_help=False,
                       help="serve the Gradio demos, one tab per pipeline (demos/app.py; "
                            "visionpeft demo --help lists its options)")
    g.set_defaults(func=_cmd_demo)  # its options (--cd-checkpoint DIR, --port N, ...) go to the hub's parser
    return p


def _user_errors() -> tuple[type, ...]:
    """Errors that mean bad input, not a bug: they end in one line. A TrainingError can only
    come from a loaded training package, so it is not imported (and torch with it) to catch it."""
    task = sys.modules.get(f"{__package__}.train.task")  # where TrainingError is defined
    return (FileNotFoundError, ValueError, KeyError) + ((task.TrainingError,) if task else ())


def main(argv=None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        args.hub_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        # the reader of our stdout went away (visionpeft info DIR | head -1): stop quietly, as
        # the Python docs' "Note on SIGPIPE" does, with the status a SIGPIPE death gives; a
        # broken pipe inside training or the demo server (a data loader's, a socket's) is
        # not ours to hide
        if args.command in ("train", "demo"):
            raise
        _silence_stdout()
        return 141
    except _user_errors() as err:
        # user errors end in one line, not a traceback (the loaders' OfflineWeightsError is
        # a FileNotFoundError, their UnknownModelError a ValueError)
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        msg = " ".join(str(msg).split()) or type(err).__name__  # one line, however it was worded
        print(f"visionpeft {args.command}: {msg}", file=sys.stderr)
        return 2


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush cannot raise again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (captured stdout)
        pass


if __name__ == "__main__":
    sys.exit(main())
