"""The checkpoint folder of a dense task (change detection, segmentation): the encoder's
adapter (absent for a frozen encoder), the trained head's weights and the task's config,
found in a training output_dir, its best/ or its adapter/."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import visionpeft as vp

HEAD_NAME = "decoder.safetensors"


def write_checkpoint(folder: Path, host: nn.Module, adapter_name: str, head: dict[str, torch.Tensor],
                     config: dict, config_name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if vp.adapter_names(host):  # else: a frozen encoder, the head alone is trained
        vp.save_adapter(host, folder / "encoder", name=adapter_name)
    save_file({k: v.detach().cpu().contiguous() for k, v in head.items()}, str(folder / HEAD_NAME))
    (folder / config_name).write_text(json.dumps(config, indent=2))


def find_checkpoint_folder(path, config_name: str, what: str) -> Path:
    """The folder holding ``config_name``: ``path`` itself, its ``best/`` or its ``adapter/``."""
    path = Path(path)
    for cand in (path, path / "best", path / "adapter"):
        if (cand / config_name).is_file():
            return cand
    raise FileNotFoundError(f"{path} holds no {what} checkpoint ({config_name} in it, in best/ or in adapter/)")


def validations_kept(folder: Path) -> list[dict] | None:
    """Resuming from ``folder`` = ``checkpoint-N``: the validations up to step N stand and
    later ones are redone, so rows after N leave ``val_metrics.jsonl``; returns the rows
    kept (for the best score so far), or None when there is no such log to trim."""
    if not folder.name.startswith("checkpoint-"):
        return None
    step, log = int(folder.name.split("-")[-1]), folder.parent / "val_metrics.jsonl"
    if not log.exists():
        return None
    rows = [r for r in (json.loads(line) for line in log.read_text().splitlines()) if r["step"] <= step]
    body = "".join(json.dumps(r) + "\n" for r in rows)
    vp.atomic_write_file(log, lambda tmp: Path(tmp).write_text(body))  # a crash keeps the whole log
    return rows
