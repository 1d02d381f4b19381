"""DreamBooth with the flags of diffusers' examples/dreambooth/train_dreambooth_lora.py,
run on visionpeft's loop with any adapter. Every flag maps to a config key of
`visionpeft train` (see configs/dreambooth_lora_sd15.yaml); --adapter picks the method
and --adapter_args adds its fields.

    accelerate launch scripts/train_dreambooth.py \\
      --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --instance_data_dir dog --instance_prompt "a photo of sks dog" \\
      --output_dir out/dog --resolution 512 --train_batch_size 1 --max_train_steps 500 \\
      --learning_rate 1e-4 --rank 4 --adapter lora
"""
from __future__ import annotations

import argparse
import sys

import yaml

from visionpeft.train import run_config

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


def parse(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, (kind, default) in FLAGS.items():
        p.add_argument(f"--{name}", type=kind, default=default)
    for name in SWITCHES:
        p.add_argument(f"--{name}", action="store_true")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank (r) when --adapter is lora")
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
    adapter = {"method": args.adapter, "target_modules": args.target_modules.split(",")}
    if args.adapter == "lora":
        adapter["r"] = args.rank
    adapter.update(yaml.safe_load(args.adapter_args) or {})
    values["adapter"] = adapter
    return values


def main(argv=None) -> int:
    values = parse(argv)
    try:
        result = run_config(values)
    except Exception as err:  # same one-line treatment as the CLI for user errors
        from visionpeft.train import TrainingError

        if isinstance(err, (ValueError, FileNotFoundError, KeyError, TrainingError)):
            print(f"train_dreambooth: {err}", file=sys.stderr)
            return 2
        raise
    print(f"trained {result.step} steps; adapter in {result.adapter_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
