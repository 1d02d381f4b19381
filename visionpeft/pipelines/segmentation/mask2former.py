"""Mask2Former (Cheng et al. 2022), the Earth-Adapter paper's decoder, built from transformers'
own modules on our stride 4-32 pyramid.

transformers' ``Mask2FormerForUniversalSegmentation`` owns its backbone (``load_backbone``:
Swin by default) and takes pixels, so it cannot sit on an encoder with an adapter. Its parts
take feature maps and are used here as they are: ``Mask2FormerPixelDecoder`` (multi-scale
deformable attention on strides 8-32, written with ``grid_sample``, so it runs on CPU too, and
an FPN step to stride 4), ``Mask2FormerTransformerModule`` (queries, masked attention, one mask
and class prediction per layer) and ``Mask2FormerLoss`` (Hungarian matching, point-sampled
mask BCE + dice, class cross-entropy with a down-weighted no-object class, auxiliary losses).
The class predictor is the one line transformers' model adds (a Linear to K + 1 classes).

What to know about using its parts:
- Weights start as transformers initialises them: its ``_init_weights`` is applied to our
  modules (children first, as its ``post_init`` does); a PreTrainedModel subclass of ours
  would be treated as remote code and skip the deformable-attention init.
- Training needs scipy: transformers' Hungarian matcher solves the assignment with
  ``scipy.optimize.linear_sum_assignment`` (a clear error says so when it is missing).

Semantic inference is Mask2Former's: softmax over the classes (no-object dropped) times the
sigmoid of each query's mask, summed over the queries, with the masks upsampled to the input
first (as the official code and mmseg do).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# option -> default; the decoder's YAML keys (``decoder: {name: mask2former, ...}``)
OPTIONS = {
    "hidden_size": 256,            # pixel decoder and transformer width; a multiple of 32 (GroupNorm(32))
    "mask_feature_size": None,     # per-pixel mask embedding width; None: hidden_size
    "num_queries": 100,
    "decoder_layers": 9,           # masked-attention layers (the paper's L = 9)
    "encoder_layers": 6,           # deformable-attention layers of the pixel decoder
    "num_attention_heads": 8,
    "dim_feedforward": 2048,       # transformer decoder FFN
    "encoder_feedforward_dim": 1024,  # pixel decoder FFN
    "train_num_points": 12544,     # points sampled per mask for the matching cost and the mask losses
    "oversample_ratio": 3.0,
    "importance_sample_ratio": 0.75,
    "class_weight": 2.0,
    "mask_weight": 5.0,
    "dice_weight": 5.0,
    "no_object_weight": 0.1,
}
_INTS = ("hidden_size", "mask_feature_size", "num_queries", "decoder_layers", "encoder_layers",
         "num_attention_heads", "dim_feedforward", "encoder_feedforward_dim", "train_num_points")


def mask2former_config(num_classes: int, options: dict):
    """transformers' Mask2FormerConfig for ``options`` (checked; defaults from OPTIONS)."""
    from transformers import Mask2FormerConfig

    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"decoder mask2former: unknown option(s) {unknown}; known: {sorted(OPTIONS)}")
    o = {**OPTIONS, **options}
    if o["mask_feature_size"] is None:
        o["mask_feature_size"] = o["hidden_size"]
    for k, v in o.items():
        ok = (isinstance(v, int) if k in _INTS else isinstance(v, (int, float))) and not isinstance(v, bool)
        if not ok or v < 0 or (k in _INTS and v == 0):
            kind = "a positive integer" if k in _INTS else "a number >= 0"
            raise ValueError(f"decoder mask2former: {k} must be {kind}, got {v!r}")
    if o["hidden_size"] % 32 or o["hidden_size"] % o["num_attention_heads"]:
        raise ValueError(f"decoder mask2former: hidden_size must be a multiple of 32 (transformers' pixel decoder "
                         f"uses GroupNorm(32)) and of num_attention_heads ({o['num_attention_heads']}), "
                         f"got {o['hidden_size']}")
    if not 0 <= o["importance_sample_ratio"] <= 1 or o["oversample_ratio"] < 1:
        raise ValueError(f"decoder mask2former: importance_sample_ratio must lie in [0, 1] and oversample_ratio "
                         f"be >= 1, got {o['importance_sample_ratio']} and {o['oversample_ratio']}")
    floats = {k: float(o[k]) for k in OPTIONS if k not in _INTS}
    # feature_size == hidden_dim: transformers' transformer module then projects nothing (older
    # releases keep those projections in a plain list, where they would be neither trained nor saved)
    return Mask2FormerConfig(
        num_labels=num_classes, feature_size=o["hidden_size"], hidden_dim=o["hidden_size"],
        mask_feature_size=o["mask_feature_size"], num_queries=o["num_queries"],
        decoder_layers=o["decoder_layers"] + 1,  # transformers counts the queries' first prediction as a layer
        encoder_layers=o["encoder_layers"], num_attention_heads=o["num_attention_heads"],
        dim_feedforward=o["dim_feedforward"], encoder_feedforward_dim=o["encoder_feedforward_dim"],
        train_num_points=o["train_num_points"], feature_strides=[4, 8, 16, 32], common_stride=4,
        dropout=0.0,  # transformers also uses it as the decoder's layer-drop rate
        **floats)


class QueryLogits(NamedTuple):
    """Per decoder layer (the queries' first prediction, then each layer; the last is the output):
    class logits (B, Q, K + 1) and mask logits (B, Q, H/4, W/4)."""
    classes: tuple
    masks: tuple


def _init_as_transformers(module: nn.Module, config) -> None:
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerPreTrainedModel

    ref = Mask2FormerPreTrainedModel(config)
    with torch.no_grad():
        for m in reversed(list(module.modules())):  # every module after its children, as post_init
            ref._init_weights(m)


class Mask2FormerHead(nn.Module):
    """Pixel decoder + masked-attention transformer + class predictor on four maps at strides
    4, 8, 16, 32 (``channels`` each). forward -> QueryLogits."""

    def __init__(self, channels: list[int], num_classes: int, options: dict | None = None):
        super().__init__()
        from transformers.models.mask2former.modeling_mask2former import (Mask2FormerPixelDecoder,
                                                                           Mask2FormerTransformerModule)

        self.config = config = mask2former_config(num_classes, dict(options or {}))
        self.num_classes = num_classes
        self.pixel_decoder = Mask2FormerPixelDecoder(config, feature_channels=list(channels))
        self.transformer = Mask2FormerTransformerModule(in_features=config.feature_size, config=config)
        self.class_predictor = nn.Linear(config.hidden_dim, num_classes + 1)
        _init_as_transformers(self, config)

    def forward(self, feats: list[torch.Tensor]) -> QueryLogits:
        pixel = self.pixel_decoder(list(feats))
        out = self.transformer(pixel.multi_scale_features, pixel.mask_features)
        # its hidden states are (Q, B, C)
        classes = tuple(self.class_predictor(h.transpose(0, 1)) for h in out.intermediate_hidden_states)
        return QueryLogits(classes, tuple(out.masks_queries_logits))


def semantic_scores(class_logits: torch.Tensor, mask_logits: torch.Tensor, size) -> torch.Tensor:
    """(B, K, H, W) class scores at ``size`` from one layer's (B, Q, K + 1) and (B, Q, h, w)."""
    masks = F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False).sigmoid()
    return torch.einsum("bqk,bqhw->bkhw", class_logits.softmax(-1)[..., :-1], masks)


def scores_to_probs(scores: torch.Tensor) -> torch.Tensor:
    """Per-pixel class probabilities from semantic scores: the scores are a sum over queries of
    (class prob x mask prob), >= 0 but not normalised; softmax would treat them as logits."""
    return scores / scores.sum(1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


def semantic_targets(labels: torch.Tensor, ignore_index: int) -> tuple[list, list]:
    """Per image: one binary mask per class present and its class. Ignored pixels lie in no
    mask, as in detectron2's and mmseg's semantic mappers for Mask2Former."""
    masks, classes = [], []
    for lab in labels:
        present = lab.unique()
        present = present[present != ignore_index]
        classes.append(present.long())
        masks.append((lab[None] == present[:, None, None]).float())
    return masks, classes


class SemanticCriterion(nn.Module):
    """transformers' ``Mask2FormerLoss`` (matching, point-sampled BCE + dice, class
    cross-entropy, auxiliary layers) fed from semantic label maps."""

    def __init__(self, config):
        super().__init__()
        try:
            import scipy.optimize  # noqa: F401  (transformers' Hungarian matcher solves with it)
        except ImportError:
            raise ImportError("decoder 'mask2former' trains with transformers' Mask2FormerLoss, whose "
                              "Hungarian matcher needs scipy: pip install scipy") from None
        from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss

        self.weight_dict = {"loss_cross_entropy": config.class_weight, "loss_mask": config.mask_weight,
                            "loss_dice": config.dice_weight}
        self.loss = Mask2FormerLoss(config, self.weight_dict)

    def semantic(self, out: QueryLogits, labels: torch.Tensor, ignore_index: int):
        """(weighted total over the output and every auxiliary layer, final layer's unweighted
        terms) for label maps (B, H, W)."""
        masks, classes = semantic_targets(labels, ignore_index)
        # float32: point sampling (grid_sample) needs one dtype, and the sums are small
        aux = [{"masks_queries_logits": m.float(), "class_queries_logits": c.float()}
               for c, m in zip(out.classes[:-1], out.masks[:-1])]
        terms = self.loss(out.masks[-1].float(), out.classes[-1].float(), masks, classes, aux)
        total = sum(self.weight_dict[k if k in self.weight_dict else k.rsplit("_", 1)[0]] * v
                    for k, v in terms.items())
        logs = {"loss_class": terms["loss_cross_entropy"].detach(), "loss_mask": terms["loss_mask"].detach(),
                "loss_dice": terms["loss_dice"].detach()}
        return total, logs


def build_criterion(config) -> SemanticCriterion:
    """The training loss of a ``Mask2FormerHead`` built with ``config``."""
    return SemanticCriterion(config)
