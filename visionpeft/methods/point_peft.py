"""Point-PEFT (Tang et al., "Point-PEFT: Parameter-Efficient Fine-Tuning for 3D Pre-trained
Models", AAAI 2024) on a Point-MAE-style point transformer. The math lives in
`visionpeft.ops.point_peft_math`; this file holds the config and the per-block module.

Each adapted block runs itself (placement "around"): with x the block's input (position
already added) and h = x,

  prompted blocks (``prompt_blocks``, default the first 6): h = [cls, P_l, tokens], with
      P_l = dropout(E_l) + T + Up(QuickGELU(Down(T)))   (384-8-384)
      E_l 10 learnable tokens, T the 10 cache tokens of the memory bank lookup;
  h <- h + attn(norm1(h))                          (no drop path here, as the official code)
  f  = drop_path(mlp(norm2(h)));  h <- h + f + 0.7 * A(f)          (A: 384-16-384)
  tokens <- the geometry-aware update (ops.point_peft_math.local_geometry: G/2 local centres
      by FPS over the token centres, k 16, a local attention of 6 heads x 3 dims shared by
      every block, max-pool, this block's BN + GELU, + 0.3 x the centre token, spread back
      to every token with weight 0.3)
  h <- h + A1(h) (384-16-384), the prompts dropped.

Trainable besides: the biases of norm1, norm2, attn.proj, mlp.fc1 and mlp.fc2 (as
zero-initialised offsets: the same training as the official's unfrozen biases where, as
there, 1-D tensors get no weight decay; `task: point_classification` does so), the cls
token and cls position (offsets held by the first block's module), and through
``modules_to_save`` the final norm and the head. The memory bank (the training set's
features from the frozen encoder: final LayerNorm, max over the tokens; L2-normalised
columns) is a buffer of the first block's module, set with `set_memory_bank` and saved
with the adapter; the query of each sample is its own frozen feature, from a pass of the
host with every adapter off, in eval mode, once per forward.

Where we differ from the official code (Ivan-Tang-3D/Point-PEFT, MAE/):
- blocks 0-5 there gather neighbours with indices of a 128-centre grouping from the tensor
  of 10 prompts + 128 tokens, which reads other samples' rows for a batch over one, and
  place the tokens at the centres of an FPS over [10 learned points; the cloud]; here
  every block uses the token centres and each sample its own tokens (and there are no
  learned centre points);
- its query feature comes from a second pretrained encoder with 64 groups; here the same
  frozen host and grouping as the classifier (the bank is built the same way);
- prompt tokens and prompt adapters of blocks 6-11 are built there but never used; here
  only the prompted blocks have them (710,719 trainable parameters on the 15-class
  ScanObjectNN host against its 710,761 used ones: less its 12 unused gates and 30 learned
  centre coordinates).
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import BlockAdapterModule, HostSpec
from ..core.config import ConfigError, MethodConfig, check_dropout, check_positive_int
from ..core.registry import register_method
from ..ops.point_peft_math import bottleneck, local_attention, local_geometry, local_neighbourhoods, \
    retrieve_cache_tokens

MLP_ADAPTER_SCALE = 0.7  # the official code's hard-coded weight of the MLP-branch adapter


def _adapter(width: int, hidden: int) -> nn.ModuleDict:
    """Down/up pair initialised as the official AdapterSuper: Xavier-uniform weights and
    biases drawn from N(0, 1e-6^2)."""
    pair = nn.ModuleDict({"down": nn.Linear(width, hidden), "up": nn.Linear(hidden, width)})
    for lin in pair.values():
        nn.init.xavier_uniform_(lin.weight)
        nn.init.normal_(lin.bias, std=1e-6)
    return pair


def _run_adapter(pair: nn.ModuleDict, x: torch.Tensor, dropout: float, training: bool) -> torch.Tensor:
    return bottleneck(x, pair["down"].weight, pair["down"].bias, pair["up"].weight, pair["up"].bias,
                      dropout, training)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Every module in eval mode inside, each back to its own mode after."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, training in modes:
            m.training = training


class PointPEFTModule(BlockAdapterModule):
    placement = "around"

    def __init__(self, config: "PointPEFTConfig", host: HostSpec):
        super().__init__(config, host)
        width = host.in_features
        if host.out_features != width:
            raise ValueError(f"Point-PEFT adapts blocks that keep their width, got {width} -> {host.out_features}")
        inner = config.local_heads * config.local_head_dim
        self.width, self.index = width, getattr(config, "layer_index", 0)
        self.owner = self.index == 0  # the first adapted block holds the shared parts
        self.prompted = bool(getattr(config, "prompted", False))
        self.mlp_adapter = _adapter(width, config.adapter_bottleneck)
        self.out_adapter = _adapter(width, config.adapter_bottleneck)
        self.pool_norm = nn.BatchNorm1d(width)
        # offsets of the host's biases (trained in place of them)
        self.hidden = int(round(width * config.mlp_ratio))
        self.bias = nn.ParameterDict({k: nn.Parameter(torch.zeros(self.hidden if k == "fc1" else width))
                                      for k in ("norm1", "norm2", "proj", "fc1", "fc2")})
        if self.prompted:
            self.prompts = nn.Parameter(torch.empty(config.top_k + 2, width))
            nn.init.trunc_normal_(self.prompts, std=0.02, a=-2.0, b=2.0)
            self.prompt_adapter = _adapter(width, config.prompt_bottleneck)
        if self.owner:
            self.local_qkv = nn.Linear(width, 3 * inner, bias=False)  # PyTorch's default init, as official
            self.local_proj = nn.Linear(inner, width)
            self.local_norm = nn.LayerNorm(width)
            self.cls_token = nn.Parameter(torch.zeros(width))  # offsets of the host's cls token and position
            self.cls_pos = nn.Parameter(torch.zeros(width))
            self.register_buffer("bank", torch.zeros(width, config.bank_size))
        self._model = None  # the root model and adapter name, set by bind_model (never registered)
        self._name = None

    # --- shared parts and the host ---------------------------------------------------
    def bind_model(self, model: nn.Module, name: str) -> None:
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_name", name)

    def _shared(self) -> "PointPEFTModule":
        if self.owner:
            return self
        from ..core.model_ops import adapted_layers

        for layer in adapted_layers(self._model).values():
            mod = layer.adapters[self._name]["full"] if self._name in layer.adapters else None
            if isinstance(mod, PointPEFTModule) and mod.owner:
                return mod
        raise RuntimeError("Point-PEFT: the module of the first adapted block (which holds the shared local "
                           "attention and the memory bank) is gone; inject the adapter again")

    def _cache_tokens(self, points: torch.Tensor, shared: "PointPEFTModule") -> torch.Tensor:
        """The bank lookup for this forward's clouds (computed once per forward, by the
        first prompted block; the frozen pass runs the host with every adapter off)."""
        # one lookup per forward: the same clouds (object and in-place version) and bank
        key = (points, points._version, shared.bank._version, shared.bank.data_ptr())
        cached = getattr(shared, "_cache", None)
        if cached is not None and cached[0][0] is points and cached[0][1:] == key[1:]:
            return cached[1]
        if shared.bank.shape[1] == 0:
            raise RuntimeError("Point-PEFT's prompts need the memory bank of the training set's features; build "
                               "it first with vp.set_memory_bank(model, features)")
        from ..core.model_ops import disabled

        model = self._model
        if not hasattr(model, "forward_features"):
            raise TypeError(f"Point-PEFT runs the frozen host for each cloud's query feature and needs "
                            f"model.forward_features(points) -> (B, 1 + G, C); {type(model).__name__} has none")
        with torch.no_grad(), disabled(model), _eval_mode(model):
            query = model.forward_features(points)[:, 1:].max(dim=1).values
        tokens = retrieve_cache_tokens(query.to(shared.bank.dtype), shared.bank, self.config.top_k)
        object.__setattr__(shared, "_cache", (key, tokens))
        return tokens

    def _neighbourhoods(self, centres: torch.Tensor, shared: "PointPEFTModule"):
        cached = getattr(shared, "_hoods", None)
        if cached is not None and cached[0] is centres and cached[1] == centres._version:
            return cached[2]
        n_local = max(1, int(centres.shape[1] * self.config.local_ratio))
        hoods = local_neighbourhoods(centres, n_local, min(self.config.local_k, centres.shape[1]))
        object.__setattr__(shared, "_hoods", (centres, centres._version, hoods))
        return hoods

    # --- the block --------------------------------------------------------------------
    def delta(self, h: torch.Tensor) -> torch.Tensor:  # pragma: no cover - placement "around" runs run_block
        raise TypeError("Point-PEFT runs its block itself (run_block); it has no additive delta")

    def run_block(self, block: nn.Module, scale: float, x: torch.Tensor, centres: torch.Tensor | None = None,
                  points: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        for part in ("norm1", "attn", "norm2", "mlp", "drop_path"):
            if not hasattr(block, part):
                raise TypeError(f"Point-PEFT adapts pre-norm transformer blocks with norm1, attn, norm2, mlp "
                                f"(fc1, act, fc2) and drop_path (Point-MAE's); {type(block).__name__} has no {part}")
        if centres is None or (self.prompted and points is None):
            raise TypeError("Point-PEFT needs the token centres (and the cloud, for its prompts) as the block's "
                            "keywords centres= and points=, as visionpeft's Point-MAE passes them")
        if getattr(block.mlp, "fc1", None) is None or block.mlp.fc1.out_features != self.hidden:
            raise ValueError(f"Point-PEFT was built for an MLP of {self.hidden} hidden features (mlp_ratio "
                             f"{self.config.mlp_ratio}); this block's mlp.fc1 gives "
                             f"{getattr(getattr(block.mlp, 'fc1', None), 'out_features', None)}: set mlp_ratio")
        shared = self._shared()
        drop, training = self.config.dropout, self.training
        cls_offset = shared.cls_pos + (shared.cls_token if self.owner else 0)
        x = torch.cat([x[:, :1] + cls_offset, x[:, 1:]], dim=1)
        n_prompts = 0
        if self.prompted:
            cache = self._cache_tokens(points, shared).to(x.dtype)
            prompts = F.dropout(self.prompts.expand(x.shape[0], -1, -1), drop, training) + cache \
                + _run_adapter(self.prompt_adapter, cache, drop, training)
            n_prompts = prompts.shape[1]
            x = torch.cat([x[:, :1], prompts, x[:, 1:]], dim=1)
        b = self.bias
        x = x + block.attn(block.norm1(x) + b["norm1"]) + b["proj"]
        mlp = block.mlp
        hidden = mlp.act(mlp.fc1(block.norm2(x) + b["norm2"]) + b["fc1"])
        f = block.drop_path(mlp.fc2(hidden) + b["fc2"])
        x = x + f + scale * MLP_ADAPTER_SCALE * _run_adapter(self.mlp_adapter, f, drop, training)
        tokens = x[:, 1 + n_prompts:]
        local, neighbours = self._neighbourhoods(centres, shared)

        def attend(groups):
            inner = local_attention(shared.local_norm(groups), shared.local_qkv.weight, shared.local_proj.weight,
                                    shared.local_proj.bias, self.config.local_heads)
            return block.drop_path(inner)  # per neighbourhood, as the official code

        updated = local_geometry(tokens, centres, local, neighbours, attend, self.pool_norm)
        tokens = tokens + scale * (updated - tokens)
        x = torch.cat([x[:, :1 + n_prompts], tokens], dim=1)
        x = x + scale * _run_adapter(self.out_adapter, x, drop, training)
        return torch.cat([x[:, :1], x[:, 1 + n_prompts:]], dim=1)  # the prompts leave with the block

    def extra_repr(self) -> str:
        parts = ["prompts" if self.prompted else "", "shared parts, bank" if self.owner else ""]
        return f"block {self.index}, width {self.width}" + "".join(f", {p}" for p in parts if p)


def set_memory_bank(model: nn.Module, features: torch.Tensor, name: str = "default") -> None:
    """Give adapter ``name``'s Point-PEFT modules the memory bank: ``features`` (N, C), one
    frozen-encoder feature per training sample (final LayerNorm, max over the tokens);
    stored L2-normalised as columns (C, N), saved with the adapter, and ``bank_size`` in
    its config set to N."""
    from ..core.model_ops import adapted_layers, get_state

    state = get_state(model)
    config = state.configs.get(name)
    if not isinstance(config, PointPEFTConfig):
        raise ValueError(f"the model has no Point-PEFT adapter named {name!r}; its adapters: {list(state.configs)}")
    owners = [layer.adapters[name]["full"] for layer in adapted_layers(model).values()
              if name in layer.adapters and getattr(layer.adapters[name]["full"], "owner", False)]
    if not owners:
        raise ValueError(f"adapter {name!r} has no Point-PEFT module holding the bank (was it injected with "
                         f"vp.inject?)")
    owner = owners[0]
    if features.dim() != 2 or features.shape[1] != owner.width or features.shape[0] < config.top_k:
        raise ValueError(f"the memory bank takes (samples, {owner.width}) features of at least top_k={config.top_k} "
                         f"samples, got shape {tuple(features.shape)}")
    if not torch.isfinite(features).all():
        raise ValueError("the memory bank features hold NaN or inf values")
    bank = F.normalize(features.detach().to(owner.bank.device, torch.float32), dim=1).t().contiguous()
    owner.bank = bank
    object.__setattr__(owner, "_cache", None)
    state.configs[name] = config.replace(bank_size=int(bank.shape[1]))


@register_method("point_peft", PointPEFTModule, layer_kinds=("block",), weight_space=False,
                 runtime_fields=("dropout",))
@dataclass(frozen=True)
class PointPEFTConfig(MethodConfig):
    """Point-PEFT on Point-MAE's blocks (``target_modules`` defaults to them).

    prompt_blocks: positions among the adapted blocks that get point-prior prompts (None:
    the first half, the official 0-5 of Point-MAE's 12); top_k: bank entries retrieved per
    sample (the prompts are top_k + 2 tokens: 10); prompt_bottleneck 8 and adapter_bottleneck 16: the adapters' widths;
    dropout: of the adapters and the prompts (0.1); local_heads x local_head_dim: the shared
    local attention's inner width (6 x 3); local_k: tokens per neighbourhood (16);
    local_ratio: local centres per token (0.5: G/2); mlp_ratio: the blocks' MLP width over
    theirs (4); bank_size: the memory bank's sample
    count (set by set_memory_bank; 0 until then). ``modules_to_save`` defaults to the final
    norm and the head, trained in full as the official code does.
    """

    target_modules: tuple[str, ...] = (r"re:blocks\.\d+",)
    modules_to_save: tuple[str, ...] = ("norm", "head")
    prompt_blocks: tuple[int, ...] | None = None
    top_k: int = 8
    prompt_bottleneck: int = 8
    adapter_bottleneck: int = 16
    dropout: float = 0.1
    local_heads: int = 6
    local_head_dim: int = 3
    local_k: int = 16
    local_ratio: float = 0.5
    mlp_ratio: float = 4.0
    bank_size: int = 0

    def __post_init__(self):
        blocks = self.prompt_blocks
        if blocks is None:
            return super().__post_init__()
        if isinstance(blocks, int) and not isinstance(blocks, bool):
            blocks = (blocks,)
        if not isinstance(blocks, (list, tuple)) or not all(
                isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in blocks):
            raise ConfigError(f"PointPEFTConfig.prompt_blocks must be a list of block positions >= 0, "
                              f"got {self.prompt_blocks!r}")
        object.__setattr__(self, "prompt_blocks", tuple(sorted(set(blocks))))
        super().__post_init__()

    def validate(self) -> None:
        for name in ("top_k", "prompt_bottleneck", "adapter_bottleneck", "local_heads", "local_head_dim", "local_k"):
            check_positive_int(self, name)
        check_positive_int(self, "bank_size", minimum=0)
        check_dropout(self)
        ratio = self.local_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ConfigError(f"PointPEFTConfig.local_ratio is local centres per token, in (0, 1], got {ratio!r}")
        ratio = self.mlp_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0:
            raise ConfigError(f"PointPEFTConfig.mlp_ratio is the MLP's hidden width over the block's, > 0, "
                              f"got {ratio!r}")
        if self.alpha is not None:
            raise ConfigError("PointPEFTConfig has no alpha: its adapters carry the official fixed weights; "
                              "vp.set_scale scales the adapters' branches")

    def check_layers(self, names: list[str]) -> None:
        # not a field: how many blocks are adapted, for the default prompt_blocks (never saved)
        object.__setattr__(self, "adapted_count", len(names))
        over = [b for b in (self.prompt_blocks or ()) if b >= len(names)]
        if over and names:
            raise ConfigError(f"PointPEFTConfig.prompt_blocks {over} index the adapted blocks, but only "
                              f"{len(names)} are adapted ({names[0]} ... {names[-1]}): use 0-{len(names) - 1}")
        bad = [n for n in names if not re.search(r"\d+$", n)]
        if bad:
            raise ConfigError(f"Point-PEFT adapts a model's numbered blocks (blocks.0, blocks.1, ...), got {bad[:3]}")

    def for_layer(self, name: str, index: int | None = None) -> "PointPEFTConfig":
        cfg = self.replace()
        # not fields: per-layer facts for the module being built, never saved
        object.__setattr__(cfg, "layer_index", 0 if index is None else index)
        blocks = self.prompt_blocks
        if blocks is None:
            blocks = range(getattr(self, "adapted_count", 12) // 2)
        object.__setattr__(cfg, "prompted", index is not None and index in blocks)
        return cfg


__all__ = ["PointPEFTConfig", "PointPEFTModule", "set_memory_bank", "MLP_ADAPTER_SCALE"]
