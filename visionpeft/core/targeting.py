"""Target resolution: which layers (and which slices of them) an adapter goes on.

Syntax of one entry:
  ``"to_q"``            the module named exactly so, or any whose dotted name ends in ``.to_q``
  ``"re:.*attn2.*"``     a full-match regex over dotted module names (adaptable layers only)
  ``"qkv[q,v]"``        only the q and v thirds of a fused projection (Linear out = 3 * d)
  ``"attn[q,v]"``       the same on an nn.MultiheadAttention's in_proj; ``[out]`` its out_proj
  ``"re:.*visual.*attn[q,v]"``  a regex may end in a selector too: a trailing bracket
                        that lists part names (q, k, v, in_proj, out, out_proj) is read as one
A bare nn.MultiheadAttention name adapts its whole in_proj and its out_proj.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

from torch import nn

from .adapter import HostWrapper
from .layers import AdaptedBlock, AdaptedLayerBase, TrainedCopy

LAYER_KINDS = {nn.Linear: "linear", nn.Conv2d: "conv2d", nn.MultiheadAttention: "mha"}
FUSED_SLICES = ("q", "k", "v")
MHA_PARTS = ("in_proj", "q", "k", "v", "out_proj")
_SLICE_RE = re.compile(r"^(?P<name>.+?)\[(?P<parts>[A-Za-z_,\s]+)\]$")
_PART_NAMES = {"q", "k", "v", "in_proj", "out", "out_proj"}


class TargetError(ValueError):
    """A target pattern matched nothing, or matched something that cannot be adapted."""


def layer_kind(module: nn.Module) -> str | None:
    if isinstance(module, AdaptedLayerBase):
        return module.kind
    for cls, kind in LAYER_KINDS.items():
        if isinstance(module, cls):
            return kind
    return None


def parse_entry(entry: str) -> tuple[str, tuple[str, ...] | None, bool]:
    """-> (pattern, slice parts or None, is_regex)."""
    is_regex = entry.startswith("re:")
    body = entry[3:] if is_regex else entry.strip()
    m = _SLICE_RE.match(body)
    if m:
        parts = tuple(p.strip() for p in m.group("parts").split(",") if p.strip())
        # in a regex, only a bracket made of part names is a selector, not a char class
        if not is_regex or set(parts) <= _PART_NAMES:
            parts = tuple("out_proj" if p == "out" else p for p in parts)
            body = m.group("name")
            _check_regex(entry, body, is_regex)
            return body, parts, is_regex
    _check_regex(entry, body, is_regex)
    return body, None, is_regex


def _check_regex(entry: str, pattern: str, is_regex: bool) -> None:
    if is_regex:
        try:
            re.compile(pattern)
        except re.error as err:
            raise TargetError(f"target {entry!r}: {pattern!r} is not a valid regular expression ({err})") from None


def _matches(name: str, pattern: str, is_regex: bool) -> bool:
    if is_regex:
        return re.fullmatch(pattern, name) is not None
    return name == pattern or name.endswith("." + pattern)


def canonical_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``named_modules()`` under the names the host gave them: a block wrapper answers to
    its host's name and the host's children keep theirs (no ``base_layer`` hop), so
    targets and saved files do not depend on the order adapters were added in. Our other
    wrappers stand for their host layer; their internals are not listed."""
    out: dict[str, nn.Module] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        out[prefix] = module
        if isinstance(module, AdaptedBlock):
            children = module.base_layer.named_children()
        elif isinstance(module, HostWrapper):
            return
        else:
            children = module.named_children()
        for child_name, child in children:
            walk(child, f"{prefix}.{child_name}" if prefix else child_name)

    walk(model, "")
    return out


def adaptable_layers(model: nn.Module, blocks: bool = False) -> dict[str, tuple[str, nn.Module]]:
    """{dotted name: (kind, module)} for every layer an adapter can wrap.

    Weight-space methods (``blocks=False``) see Linear, Conv2d and MultiheadAttention
    layers; modules inside our layer wrappers are skipped (the wrapper stands for them),
    and an MHA's out_proj is not listed on its own: MHA computes with its weight
    directly, so only the MHA wrapper can adapt it. A block wrapper is looked through:
    its host's layers keep their names. Block methods (``blocks=True``) see every module
    that has a forward of its own (not ModuleList/ModuleDict, not the root), kind "block".
    """
    out: dict[str, tuple[str, nn.Module]] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        if isinstance(module, TrainedCopy):
            return  # trained in full for an adapter (modules_to_save): nothing inside is adapted
        if isinstance(module, AdaptedBlock):
            if blocks:
                out[prefix] = ("block", module)
            inner = module.base_layer
            if not blocks and layer_kind(inner) is not None:
                # a layer wrapped whole by a block adapter: listed so that injection can
                # refuse it by name (two wrappers cannot answer to one name)
                out[prefix] = (layer_kind(inner), module)
                return
            for child_name, child in inner.named_children():
                walk(child, f"{prefix}.{child_name}" if prefix else child_name)
            return
        kind = layer_kind(module)
        if blocks:
            if prefix and not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
                out[prefix] = ("block", module)
            if kind is not None and kind != "block" and not isinstance(module, (nn.Linear, nn.Conv2d)):
                return  # our weight wrappers and MHA: nothing inside to wrap on its own
        elif kind is not None:
            out[prefix] = (kind, module)
            if kind == "mha" or not isinstance(module, (nn.Linear, nn.Conv2d)):
                return  # MHA and our wrappers stand for everything inside them
        for child_name, child in module.named_children():
            walk(child, f"{prefix}.{child_name}" if prefix else child_name)

    walk(model, "")
    return out


def _default_parts(kind: str) -> tuple[str, ...]:
    return ("in_proj", "out_proj") if kind == "mha" else ("full",)


def _check_parts(name: str, kind: str, module: nn.Module, parts: tuple[str, ...]):
    if kind == "block":
        raise TargetError(f"{name}: slice selectors apply to weight-space methods; a block "
                          "adapter wraps the whole module, so drop the '[...]'")
    if kind == "conv2d":
        raise TargetError(f"{name}: slice selectors apply to Linear and MultiheadAttention "
                          f"layers, not to Conv2d; drop the '[...]'")
    allowed = MHA_PARTS if kind == "mha" else FUSED_SLICES
    bad = [p for p in parts if p not in allowed]
    if bad:
        raise TargetError(f"{name}: unknown slice(s) {bad}; allowed: {list(allowed)}"
                          + (" (or 'out')" if kind == "mha" else ""))
    if kind == "linear":
        out = module.base_layer.out_features if hasattr(module, "base_layer") else module.out_features
        if out % 3:
            raise TargetError(f"{name}: q/k/v slices need a fused Linear whose out_features "
                              f"is a multiple of 3; this one has {out}")


def _merge_parts(name: str, a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, ...]:
    merged = tuple(dict.fromkeys(a + b))
    whole = {"full", "in_proj"} & set(merged)
    if whole and set(merged) & set(FUSED_SLICES):
        raise TargetError(f"{name}: targeted both as a whole and by slices {merged}; "
                          "choose one")
    return merged


def close_names(query: str, names: Iterable[str], n: int = 6) -> list[str]:
    names = list(names)
    tails = {}
    for full in names:
        parts = full.split(".")
        for i in range(len(parts)):
            tails.setdefault(".".join(parts[i:]), full)
    hits = difflib.get_close_matches(query, list(tails), n=n, cutoff=0.6)
    ordered = dict.fromkeys(tails[h] for h in hits)
    return list(ordered)[:n]


def resolve_targets(model: nn.Module, target_modules: Iterable[str],
                    exclude_modules: Iterable[str] = (),
                    blocks: bool = False) -> dict[str, tuple[str, tuple[str, ...]]]:
    """-> {layer name: (kind, parts)}, in model order. Raises TargetError on any entry
    that matches nothing, naming the closest module names. ``blocks`` resolves for a
    block method: any module can be a target, but not one inside another target."""
    target_modules, exclude_modules = list(target_modules), list(exclude_modules)
    layers = adaptable_layers(model, blocks=blocks)
    all_modules = canonical_modules(model)
    mha_names = [n for n, (k, _) in layers.items() if k == "mha"]
    chosen: dict[str, tuple[str, ...]] = {}

    # an MHA's out_proj is reached through the MHA wrapper, under its own name
    out_projs = {n + ".out_proj": n for n in mha_names}
    for entry in target_modules:
        pattern, parts, is_regex = parse_entry(entry)
        hits = [n for n in layers if _matches(n, pattern, is_regex)]
        proj_hits = [out_projs[n] for n in out_projs if _matches(n, pattern, is_regex)]
        if not hits and not proj_hits:
            _refuse_inside_trained_copies(model, entry, pattern, is_regex)
            _raise_no_match(entry, pattern, is_regex, all_modules, layers, blocks)
        for name in hits:
            kind, module = layers[name]
            if parts:
                _check_parts(name, kind, module, parts)
            chosen[name] = _merge_parts(name, chosen.get(name, ()), parts or _default_parts(kind))
        for name in proj_hits:
            if parts:
                raise TargetError(f"{name}.out_proj: slices do not apply to out_proj")
            chosen[name] = _merge_parts(name, chosen.get(name, ()), ("out_proj",))

    excluded = sorted(chosen)
    for entry in exclude_modules:
        pattern, parts, is_regex = parse_entry(entry)
        for name in list(chosen):
            if _matches(name, pattern, is_regex):
                if parts:
                    keep = tuple(p for p in chosen[name] if p not in parts)
                    if keep:
                        chosen[name] = keep
                        continue
                del chosen[name]
    if excluded and not chosen:
        raise TargetError(f"exclude_modules {list(exclude_modules)} removes every layer target_modules "
                          f"{list(target_modules)} matched ({excluded}); nothing would be adapted")
    order = {n: i for i, n in enumerate(layers)}
    if blocks:
        nested = [(inner, outer) for inner in chosen for outer in chosen
                  if inner.startswith(outer + ".")]
        if nested:
            inner, outer = nested[0]
            raise TargetError(f"block targets nest: {inner!r} is inside {outer!r} "
                              f"({len(nested)} such pair(s)); a block adapter wraps one level, "
                              "so narrow the pattern (e.g. 're:blocks\\.\\d+')")
    return {n: (layers[n][0], chosen[n]) for n in sorted(chosen, key=order.__getitem__)}


def _refuse_inside_trained_copies(model, entry, pattern, is_regex) -> None:
    """A target that names only layers of modules some adapter trains in full gets told so."""
    for name, module in model.named_modules():
        if isinstance(module, TrainedCopy):
            inner = [f"{name}.{n}" if n else name for n, _ in module.base_layer.named_modules()]
            if any(_matches(n, pattern, is_regex) for n in inner):
                raise TargetError(f"target {entry!r} lies inside {name!r}, which adapter(s) "
                                  f"{list(module.copies)} train in full (modules_to_save); a module trained in "
                                  f"full cannot also carry adapters")


def _raise_no_match(entry, pattern, is_regex, all_modules, layers, blocks=False):
    containers = [n for n in all_modules if n and _matches(n, pattern, is_regex)]
    if containers and blocks:
        name = containers[0]
        raise TargetError(f"target {entry!r} matches {name!r} ({type(all_modules[name]).__name__}), "
                          "a container with no forward of its own; a block adapter wraps its "
                          f"items: target them, e.g. 're:{re.escape(name)}\\.\\d+'")
    if containers:
        name = containers[0]
        kids = [n[len(name) + 1:] for n in layers if n.startswith(name + ".")]
        raise TargetError(
            f"target {entry!r} matches {name!r} ({type(all_modules[name]).__name__}), which "
            "is not an adaptable layer (Linear, Conv2d, MultiheadAttention)"
            + (f"; its adaptable children: {kids[:8]}" if kids else "")
        )
    close = close_names(pattern, layers)
    hint = f"closest adaptable module names: {close}" if close else \
        f"adaptable modules look like: {list(layers)[:6]}"
    raise TargetError(f"target {entry!r} matches no module; {hint}")
