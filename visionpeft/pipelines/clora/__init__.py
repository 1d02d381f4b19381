"""CLoRA multi-concept composition at sampling time (Meral et al., arXiv 2403.19776):

    from visionpeft.pipelines.clora import compose
    result = compose(pipe, "a dog and a cat",
                     concepts=[{"adapter": "dog", "prompt": "a sks dog and a cat", "words": ["sks dog"]},
                               {"adapter": "cat", "prompt": "a dog and a sks cat", "words": ["sks cat"]}])
    result.images[0].save("out.png")

``visionpeft compose`` is the command-line form; `load_pipeline_adapter` puts an adapter
(our folders, or diffusers / PEFT / kohya / LyCORIS files) into a pipeline's UNet and
text encoders under one name; `mask_picture` draws a result's masks.
"""
from .compose import ComposeResult, compose
from .loading import load_pipeline_adapter
from .pictures import mask_picture

__all__ = ["ComposeResult", "compose", "load_pipeline_adapter", "mask_picture"]
