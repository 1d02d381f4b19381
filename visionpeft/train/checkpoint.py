"""Training checkpoints: adapters, optimizer, scheduler, RNG states and step, written
atomically into ``checkpoint-STEP`` folders, the last N kept.

Nothing is pickled: tensors go to safetensors files and the rest (optimizer param groups,
scheduler state, Python and NumPy RNG states, the step) to ``trainer_state.json``. The
adapters themselves are written by the task (``vp.save_adapter`` per trained model), so a
checkpoint's adapter folders are ordinary adapters that ``vp.load_adapter`` reads.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..core.atomic import write_dir

STATE_NAME = "trainer_state.json"
TENSORS_NAME = "trainer_tensors.safetensors"
_CKPT_RE = re.compile(r"checkpoint-(\d+)$")


def _split(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able structure with every tensor replaced by a reference into ``tensors``."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__dict__": [[_split(k, f"{path}.k{i}", tensors), _split(v, f"{path}.{i}", tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return {"__list__" if isinstance(obj, list) else "__tuple__":
                [_split(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, np.ndarray):
        return _split(torch.from_numpy(obj.copy()), path, tensors) | {"__numpy__": str(obj.dtype)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path} in a checkpoint")


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            t = tensors[obj["__tensor__"]]
            return t.numpy().astype(obj["__numpy__"]) if "__numpy__" in obj else t
        if "__dict__" in obj:
            return {_join(k, tensors): _join(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [_join(v, tensors) for v in obj["__list__"]]
        if "__tuple__" in obj:
            return tuple(_join(v, tensors) for v in obj["__tuple__"])
    return obj


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, step: int, optimizer, scheduler, write_adapters,
                    rng_states: list[dict], extra: dict | None = None, keep: int | None = None,
                    task_state: dict | None = None) -> Path:
    """Write ``folder/checkpoint-STEP`` atomically; ``write_adapters(tmp_folder)`` adds the
    task's adapter folders; ``rng_states`` holds one RNG state per process; ``task_state``
    the task's own (``Task.state_dict``, tensors allowed). Older checkpoints beyond the
    ``keep`` newest are removed."""
    tensors: dict[str, torch.Tensor] = {}
    state = {"step": step, "optimizer": _split(optimizer.state_dict(), "optimizer", tensors),
             "scheduler": _split(scheduler.state_dict(), "scheduler", tensors),
             "rng": _split(list(rng_states), "rng", tensors), "extra": extra or {},
             "task": _split(task_state or {}, "task", tensors)}
    path = folder / f"checkpoint-{step}"

    def write(tmp: Path):
        write_adapters(tmp)
        save_file(tensors, str(tmp / TENSORS_NAME))
        (tmp / STATE_NAME).write_text(json.dumps(state))

    write_dir(path, write)
    if keep:
        for old in list_checkpoints(folder)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a temporary folder of an interrupted save is
    never among them: it is renamed into place only when whole)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := _CKPT_RE.match(p.name)) and (p / STATE_NAME).is_file()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(output_dir: Path, resume: str | None) -> Path | None:
    """None, "latest" (None when there is none yet) or a path."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_NAME).is_file():
        raise FileNotFoundError(f"resume_from_checkpoint: {path} is not a checkpoint folder "
                                f"(no {STATE_NAME}); use 'latest' or a checkpoint-STEP folder")
    return path


def load_checkpoint(path: Path, optimizer, scheduler, process_index: int = 0) -> dict:
    """Restore optimizer, scheduler and this process's RNG state; returns the state
    (step, extra, task: the task's own state)."""
    state = json.loads((path / STATE_NAME).read_text())
    tensors = load_file(str(path / TENSORS_NAME))
    # how the step runs (fused / foreach) is this run's choice, not the saved one: a checkpoint
    # from an unfused optimizer would otherwise switch the fused one back, and under fp16 its
    # GradScaler (which hands a fused step its inf flags) would then fail
    modes = [{k: g.get(k) for k in ("fused", "foreach")} for g in optimizer.param_groups]
    optimizer.load_state_dict(_join(state["optimizer"], tensors))
    for group, mode in zip(optimizer.param_groups, modes):
        group.update({k: v for k, v in mode.items() if k in group})
    scheduler.load_state_dict(_join(state["scheduler"], tensors))
    rngs = _join(state["rng"], tensors)
    if process_index >= len(rngs):
        raise ValueError(f"{path} was written by {len(rngs)} processes; this run has more "
                         f"(process {process_index}): resume with the same process count")
    set_rng_state(rngs[process_index])
    state["task"] = _join(state.get("task", {}), tensors)  # absent in checkpoints from before it
    return state
