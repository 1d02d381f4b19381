"""The `visionpeft` command: list methods, inspect saved adapters."""
from __future__ import annotations

import argparse
import sys
from collections import Counter


def _cmd_methods(args) -> int:
    from .core.registry import get_method, list_methods

    for name in list_methods():
        spec = get_method(name)
        doc = (spec.config_cls.__doc__ or "").strip().splitlines()
        print(f"{name:<12} {spec.config_cls.__name__:<20} layers: {', '.join(spec.layer_kinds):<16} "
              f"{'merges' if spec.weight_space else ''}")
        if args.verbose and doc:
            print("    " + "\n    ".join(doc))
    return 0


def _cmd_info(args) -> int:
    from .core.io import read_adapter_config

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


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="visionpeft", description="Parameter-efficient adapters for "
                                "vision and diffusion models.")
    p.add_argument("--version", action="version", version=f"visionpeft {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("methods", help="list registered adapter methods")
    m.add_argument("-v", "--verbose", action="store_true", help="show each config's fields")
    m.set_defaults(func=_cmd_methods)
    i = sub.add_parser("info", help="describe a saved adapter folder")
    i.add_argument("adapter_dir")
    i.add_argument("--all", action="store_true", help="list every adapted layer")
    i.set_defaults(func=_cmd_info)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"visionpeft {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
