"""An end-to-end example: LoRA on a small timm ViT (the quickstart of the first issues).

Trains LoRA (plus the classification head, saved with the adapter) on a synthetic
grating-orientation set, prints accuracy before and after and the trainable parameters,
saves the adapter, reloads it into a freshly built model, merges, and checks that the
merged output equals the unmerged one.

    python scripts/example_vit_lora.py [--steps 300] [--out out/example_vit_lora]
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import visionpeft as vp  # noqa: E402
from visionpeft.data import grating_classes  # noqa: E402

NUM_CLASSES = 4


def build_vit(seed: int = 0):
    # The same seed gives the same frozen base, standing in for a pretrained checkpoint
    # (no hub here); with real weights use timm.create_model(name, pretrained=True).
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4,
                             embed_dim=96, depth=4, num_heads=3, num_classes=NUM_CLASSES)


@torch.no_grad()
def accuracy(model, data) -> float:
    model.eval()
    x, y = data.tensors
    pred = torch.cat([model(x[i:i + 256]).argmax(-1) for i in range(0, len(x), 256)])
    return (pred == y).float().mean().item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", default="out/quickstart")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    train = grating_classes(2048, NUM_CLASSES, seed=args.seed)
    test = grating_classes(512, NUM_CLASSES, seed=args.seed + 1)
    model = build_vit(args.seed)
    config = vp.LoRAConfig(r=8, alpha=16, target_modules=vp.presets.TIMM_VIT_ALL,
                           modules_to_save=["head"])
    vp.inject(model, config, name="gratings")
    print(vp.summary(model))
    before = accuracy(model, test)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps)
    loader = DataLoader(train, batch_size=args.batch, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed))
    batches = iter(())
    model.train()
    bar = tqdm(range(args.steps), desc="training LoRA", unit="step")
    for _ in bar:
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if not torch.isfinite(loss):
            raise FloatingPointError("loss became non-finite; lower --lr")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    after = accuracy(model, test)
    print(f"test accuracy: {before:.1%} before, {after:.1%} after ({args.steps} steps; chance "
          f"{1 / NUM_CLASSES:.0%})")
    print(f"trainable parameters: {vp.trainable_parameters(model):,} of "
          f"{vp.summary(model).total:,}")

    folder = vp.save_adapter(model, os.path.join(args.out, "adapter"), name="gratings")
    print(f"saved to {folder}")
    fresh = build_vit(args.seed).eval()
    vp.load_adapter(fresh, folder)
    x = test.tensors[0][:64]
    with torch.no_grad():
        unmerged = fresh(x)
        same_as_trained = torch.equal(unmerged, model.eval()(x))
        vp.merge(fresh)
        merged = fresh(x)
    diff = (merged - unmerged).abs().max().item()
    print(f"reloaded adapter reproduces the trained model exactly: {same_as_trained}")
    print(f"merged vs unmerged output: max abs diff {diff:.2e}")
    if not same_as_trained or diff > 1e-4:
        raise SystemExit("quickstart check failed")
    return {"before": before, "after": after, "merge_diff": diff}


if __name__ == "__main__":
    main()
