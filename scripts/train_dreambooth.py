"""DreamBooth with the flags of diffusers' examples/dreambooth/train_dreambooth_lora.py,
run on visionpeft's loop with any adapter. Every flag maps to a config key of
`visionpeft train` (see configs/dreambooth_lora_sd15.yaml); --adapter picks the method
and --adapter_args adds its fields. --rank sets the method's rank field (r for LoRA,
WaRA, Block-LoRA, SNELL and LoHa; bottleneck for the bottleneck adapter; LoRA's default is 4,
as in diffusers); a method without one (KronA: use its factors a1/a2) refuses it. Without
--pretrained_model_name_or_path it trains the packaged 64 px model (`embedded-sd`), offline.

    accelerate launch scripts/train_dreambooth.py \\
      --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --instance_data_dir dog --instance_prompt "a photo of sks dog" \\
      --output_dir out/dog --resolution 512 --train_batch_size 1 --max_train_steps 500 \\
      --learning_rate 1e-4 --rank 4 --adapter lora
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import yaml

import visionpeft as vp
from visionpeft.train import TrainingError, run_config

# the diffusers example's flag -> our key (same name unless listed)
RENAMED = {"pretrained_model_name_or_path": "pretrained_model"}
FLAGS = {  # name: (type, default); None default = leave to our config defaults
    "pretrained_model_name_or_path": (str, None), "instance_data_dir": (str, None),
    "instance_prompt": (str, None), "class_data_dir": (str, None), "class_prompt": (str, None),
    "prior_loss_weight": (float, None), "num_class_images": (int, None), "output_dir": (str, "output"),
    "seed": (int, None), "resolution": (int, None), "train_batch_size": (int, None),
    "sample_batch_size": (int, None), "max_train_steps": (int, None), "checkpointing_steps": (int, None),
    "checkpoints_total_limit": (int, None), "resume_from_checkpoint": (str, None),
    "gradient_accumulation_steps": (int, None), "learning_rate": (float, None), "lr_scheduler": (str, None),
    "lr_warmup_steps": (int, None), "lr_num_cycles": (int, None), "lr_power": (float, None),
    "dataloader_num_workers": (int, None), "adam_beta1": (float, None), "adam_beta2": (float, None),
    "adam_weight_decay": (float, None), "adam_epsilon": (float, None), "max_grad_norm": (float, None),
    "mixed_precision": (str, None), "validation_prompt": (str, None), "num_validation_images": (int, None),
    "validation_steps": (int, None), "snr_gamma": (float, None),
}
SWITCHES = ("with_prior_preservation", "gradient_checkpointing", "use_8bit_adam", "center_crop")
RANK_FIELDS = ("r", "bottleneck")  # a method config's rank field, the first it has
DEFAULT_RANK = {"lora": 4}  # diffusers' --rank default, where it has a meaning
SIZE_HINTS = {"krona": ': KronA is sized by its factors a1/a2 instead, e.g. --adapter_args "{a1: 4, a2: 4}"'}


def rank_field(method: str) -> str | None:
    """The config field --rank maps to for ``method`` (None: it has no rank)."""
    try:
        cls = vp.get_method(method).config_cls
    except KeyError:
        raise ValueError(f"--adapter: unknown method {method!r}; registered: {vp.list_methods()}") from None
    names = {f.name for f in dataclasses.fields(cls)}
    return next((f for f in RANK_FIELDS if f in names), None)


def adapter_spec(method: str, rank: int | None, target_modules: str, extra: dict) -> dict:
    """The ``adapter`` mapping: method, targets, --rank on the method's rank field, then
    --adapter_args. A --rank the method cannot take, or one --adapter_args contradicts, is
    a ValueError naming the method and its fields."""
    field = rank_field(method)
    adapter = {"method": method, "target_modules": target_modules.split(",")}
    if rank is None:
        rank = DEFAULT_RANK.get(method)
    elif field is None:
        fields = [f.name for f in dataclasses.fields(vp.get_method(method).config_cls)
                  if f.name not in ("target_modules", "exclude_modules")]
        raise ValueError(f"--rank does not apply to {method!r}, which has no rank field (its fields: "
                         f"{', '.join(fields)}){SIZE_HINTS.get(method, '; set its size with --adapter_args')}")
    elif field in extra and extra[field] != rank:
        raise ValueError(f"--rank {rank} and --adapter_args {field}: {extra[field]} disagree; give one")
    if rank is not None and field is not None:
        adapter[field] = rank
    adapter.update(extra)
    return adapter


def parse(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, (kind, default) in FLAGS.items():
        p.add_argument(f"--{name}", type=kind, default=default)
    for name in SWITCHES:
        p.add_argument(f"--{name}", action="store_true")
    p.add_argument("--rank", type=int, default=None,
                   help="the adapter's rank field: r (lora, wara, block_lora, snell, loha; lora default 4) or "
                        "bottleneck (adapter); krona has none (use --adapter_args with a1/a2)")
    p.add_argument("--adapter", default="lora", help="any registered method (visionpeft methods)")
    p.add_argument("--adapter_args", default="{}", help='YAML mapping of method fields, e.g. "{a1: 4, a2: 4}"')
    p.add_argument("--target_modules", default="to_q,to_k,to_v,to_out.0")
    args = p.parse_args(argv)
    values = {"task": "dreambooth"}
    for name in FLAGS:
        value = getattr(args, name)
        if value is not None:
            values[RENAMED.get(name, name)] = value
    for name in SWITCHES:
        if getattr(args, name):
            values[name] = True
    try:
        extra = yaml.safe_load(args.adapter_args) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"--adapter_args is not YAML ({str(err).splitlines()[0]}): {args.adapter_args!r}") from None
    if not isinstance(extra, dict):
        raise ValueError(f"--adapter_args must be a YAML mapping, e.g. \"{{alpha: 2.0}}\", got {args.adapter_args!r}")
    values["adapter"] = adapter_spec(args.adapter, args.rank, args.target_modules, extra)
    return values


def main(argv=None) -> int:
    try:
        result = run_config(parse(argv))
    except Exception as err:  # same one-line treatment as the CLI for user errors
        if isinstance(err, (ValueError, FileNotFoundError, KeyError, TrainingError)):
            print(f"train_dreambooth: {err}", file=sys.stderr)
            return 2
        raise
    print(f"trained {result.step} steps; adapter in {result.adapter_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
