"""LoRA <-> HF PEFT: a folder with adapter_config.json + adapter_model.safetensors that
`PeftModel.from_pretrained(model, folder)` reads (keys
``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``)."""
from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors.torch import load_file, save_file

from ..core.atomic import write_dir
from .factors import Factors, export_lora_factors, lora_entries, peft_scale
from .formats import ExportReport, FileFormat, InteropError, register_format

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def is_peft_folder(path: Path) -> bool:
    cfg = path / CONFIG_NAME
    return path.is_dir() and cfg.is_file() and "peft_type" in json.loads(cfg.read_text())


def write(factors: dict[str, Factors], folder: Path) -> None:
    r"""Scale 1 everywhere: lora_alpha = r, and per-module ranks (slices, SVD) go to
    rank_pattern / alpha_pattern. PEFT matches list targets by dotted suffix and pattern
    keys as ``(.*\.)?(key)$``: targets are written as one full-match regex and pattern
    keys anchored with ``^``, so no other layer (``head.fc1`` for ``fc1``) is caught."""
    ranks = {m: f.rank for m, f in factors.items()}
    r = max(ranks.values())
    pattern = {"^" + re.escape(m): k for m, k in ranks.items() if k != r}
    targets = "|".join(re.escape(m) for m in sorted(factors))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": f"(?:{targets})",
              "rank_pattern": pattern, "alpha_pattern": dict(pattern), "lora_dropout": 0.0,
              "bias": "none", "task_type": None, "base_model_name_or_path": None,
              "inference_mode": True, "fan_in_fan_out": False, "use_rslora": False,
              "use_dora": False, "init_lora_weights": True, "modules_to_save": None}
    tensors = {}
    for m, f in factors.items():
        up = f.up if f.down.dim() == 2 else f.up[:, :, None, None]
        tensors[f"{PREFIX}{m}.lora_A.weight"] = f.down.contiguous()
        tensors[f"{PREFIX}{m}.lora_B.weight"] = up.contiguous()
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))


def read(folder: Path) -> dict[str, Factors]:
    if not is_peft_folder(folder):
        raise InteropError(f"{folder} is not a PEFT adapter folder (adapter_config.json with peft_type)")
    config = json.loads((folder / CONFIG_NAME).read_text())
    if config.get("peft_type") != "LORA":
        raise InteropError(f"{folder} is a PEFT {config.get('peft_type')} adapter; only LORA converts")
    if config.get("use_dora"):
        raise InteropError(f"{folder} is a DoRA adapter (use_dora); its magnitude vector has no LoRA form")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise InteropError(f"{folder} has no {WEIGHTS_NAME} (pickled .bin files are not read)")
    tensors = load_file(str(weights))
    pairs: dict[str, dict] = {}
    unplaced = []
    for key, t in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m is None:
            unplaced.append(key)
            continue
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    if unplaced:
        raise InteropError(f"{folder}: {len(unplaced)} key(s) are not LoRA A/B weights: {unplaced[:8]}")
    out = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise InteropError(f"{folder}: {module} has only lora_{''.join(ab)}")
        down, up = ab["A"].float(), ab["B"].float().flatten(1)
        out[module] = Factors(down, up * peft_scale(config, module))
    return out


def _export(model, name, path: Path, rank, prefix) -> ExportReport:
    factors, errors = export_lora_factors(model, name, rank, "peft", grouped_convs_ok=False)
    write_dir(path, lambda folder: write(factors, folder))
    return ExportReport(path, "peft", len(factors), max((f.rank for f in factors.values()), default=0), errors)


register_format(FileFormat("peft", detect_folder=is_peft_folder,
                           read=lambda model, path, prefix: lora_entries(read(path)), write=_export))
