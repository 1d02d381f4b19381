"""CLIP few-shot classification (``task: fewshot_clip``): CLIP-LoRA's recipe with any
registered adapter on both towers of an open_clip model, zero-shot CLIP as the baseline
(``adapter: null``), and the evaluate / predict paths of ``visionpeft evaluate-fewshot``
and ``visionpeft predict-fewshot``."""
from visionpeft.train import register_task

from .model import CLIPClassifier, build_clip, eval_transform, image_settings, prompts, train_transform
from .task import (CLIP_LORA, CONFIG_NAME, FewShotCLIPConfig, FewShotCLIPTask, _load_task, evaluate,
                   find_checkpoint, load_classifier, predict_topk)

register_task("fewshot_clip", _load_task, shared_keys=("seed",))

__all__ = ["CLIPClassifier", "build_clip", "eval_transform", "image_settings", "prompts", "train_transform",
           "CLIP_LORA", "CONFIG_NAME", "FewShotCLIPConfig", "FewShotCLIPTask", "evaluate", "find_checkpoint",
           "load_classifier", "predict_topk"]
