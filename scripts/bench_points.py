"""Point-cloud benchmarks: Point-PEFT against full fine-tuning at Point-MAE's full size
(384 wide, 12 blocks; ScanObjectNN's 2048 points in 128 groups of 32), and the point ops
against straightforward references.

- training step (forward, backward, AdamW) of Point-PEFT (its bank lookup's frozen pass
  included) and of full fine-tuning: median seconds over ``--rounds``, and memory (GPU: the
  peak allocated; CPU: the tensors saved for backward plus gradients and AdamW's state, a
  proxy);
- farthest point sampling (ours: one batched torch loop over the picks) against a reference
  that loops over the clouds of the batch; kNN (ours: squared distances + topk) against a
  full argsort of the distances.

    python scripts/bench_points.py --device cuda --batch 32 --json points.json
    python scripts/bench_points.py --device cpu --batch 4 --rounds 3      # the CPU figures
    python scripts/bench_points.py --quick                                 # a smoke run
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import visionpeft as vp
from visionpeft.backbones import build_point_mae
from visionpeft.data.points import farthest_point_sample, knn

from bench_core import machine


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, rounds: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def fps_reference(xyz: torch.Tensor, n: int) -> torch.Tensor:
    """One cloud at a time, the textbook loop (what a port without batching does)."""
    out = []
    for cloud in xyz:
        picked = [0]
        dist = ((cloud - cloud[0]) ** 2).sum(-1)
        for _ in range(1, n):
            picked.append(int(dist.argmax()))
            dist = torch.minimum(dist, ((cloud - cloud[picked[-1]]) ** 2).sum(-1))
        out.append(torch.tensor(picked))
    return torch.stack(out)


def knn_reference(query, ref, k):
    return torch.cdist(query, ref).argsort(dim=-1)[..., :k]


def step_cost(variant: str, batch: int, points: int, groups: int, device, rounds: int, layers: int) -> dict:
    torch.manual_seed(0)
    model = build_point_mae(15, num_points=points, num_group=groups, group_size=32, depth=layers).to(device)
    if variant == "point_peft":
        vp.inject(model, vp.PointPEFTConfig(prompt_blocks=list(range(layers // 2))))
        vp.set_memory_bank(model, torch.randn(256, 384, device=device))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.05)
    x = torch.randn(batch, points, 3, device=device)
    y = torch.randint(0, 15, (batch,), device=device)
    model.train()
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    def step():
        saved[0] = 0
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, device, rounds)
    trainable = sum(p.numel() for p in params)
    state = sum(s.numel() * s.element_size() for st in opt.state.values() for s in st.values() if torch.is_tensor(s))
    row = {"variant": variant, "trainable": trainable, "step_s": round(seconds, 4),
           "saved_for_backward_mb": round(saved[0] / 2 ** 20, 1),
           "grads_and_adam_mb": round((trainable * 4 + state) / 2 ** 20, 1)}
    if device.type == "cuda":
        row["peak_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default 32 on a GPU, 4 on the CPU")
    p.add_argument("--points", type=int, default=2048)
    p.add_argument("--groups", type=int, default=128)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="toy sizes, one round: checks that it runs")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch = args.batch or (32 if device.type == "cuda" else 4)
    if args.quick:
        batch, args.points, args.groups, args.layers, args.rounds = 2, 256, 16, 2, 1
    result = {"machine": machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "device": str(device), "batch": batch, "points": args.points, "groups": args.groups,
              "layers": args.layers, "rounds": args.rounds, "steps": [], "ops": []}
    for variant in ("full_finetune", "point_peft"):
        row = step_cost(variant, batch, args.points, args.groups, device, args.rounds, args.layers)
        result["steps"].append(row)
        print(row)
    xyz = torch.randn(batch, args.points, 3, device=device)
    centres = xyz[:, :args.groups]
    for name, ours, ref in (
            ("fps", lambda: farthest_point_sample(xyz, args.groups), lambda: fps_reference(xyz, args.groups)),
            ("knn", lambda: knn(centres, xyz, 32), lambda: knn_reference(centres, xyz, 32))):
        a, b = timed(ours, device, args.rounds), timed(ref, device, args.rounds)
        row = {"op": name, "ours_ms": round(a * 1e3, 2), "reference_ms": round(b * 1e3, 2),
               "speedup": round(b / a, 2)}
        result["ops"].append(row)
        print(row)
    full, peft = result["steps"]
    result["point_peft_vs_full"] = {"step_time": round(peft["step_s"] / full["step_s"], 2),
                                    "trainable": round(peft["trainable"] / full["trainable"], 4)}
    print(result["point_peft_vs_full"])
    if args.json:
        text = json.dumps(result, indent=2)
        vp.atomic_write_file(args.json, lambda tmp: open(tmp, "w").write(text))
    return result


if __name__ == "__main__":
    main()
