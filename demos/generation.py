"""Gradio demo: a Stable Diffusion pipeline with adapters. Plain generation with the
adapters you tick, each at its own scale, or CLoRA: several concept adapters composed in
one image, with the masks that decided which adapter drew where.

    python demos/generation.py --pipeline models/sd15 --adapter dog=output/dreambooth-dog \\
        --adapter cat=output/dreambooth-cat [--port 7860]

The pipeline is diffusers' `DiffusionPipeline.from_pretrained(folder)` (Stable Diffusion
1.x/2.x or SDXL; by default ``embedded-sd``, the packaged 64 px model of satellite scenes,
which needs no download: try "a satellite image of river"); adapters go in with
`visionpeft.pipelines.clora.load_pipeline_adapter`
(our adapter folders, DreamBooth outputs, diffusers / PEFT / kohya / LyCORIS files) and
CLoRA is `visionpeft.pipelines.clora.compose`.
"""
from __future__ import annotations

import argparse
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from demo_common import one_line
from visionpeft.backbones import embedded_sd

MAX_ADAPTERS = 4  # one (use, scale) slot each in the page
MAX_PIPELINES = 2  # pipelines kept loaded (an SDXL one is several GB)
REFINE_AT = (0, 10, 20)  # compose's default steps for the extra refinement rounds
# the default folder's (embedded-sd) evaluated sampling: guidance and diffusers' guidance_rescale
GUIDANCE, RESCALE = embedded_sd.SAMPLING["guidance_scale"], embedded_sd.SAMPLING["guidance_rescale"]
RESCALE_HELP = ("0 = plain guidance; about 0.7 for models trained to zero terminal SNR (v-prediction), "
                "such as the packaged embedded-sd")


def page_sampling(folder: str) -> tuple[float, float]:
    """The page's guidance and rescale sliders for a default folder: embedded-sd's evaluated
    settings for the packaged model (by name or path), diffusers' defaults otherwise."""
    chosen = embedded_sd.guidance_defaults(folder)
    return chosen["guidance_scale"], chosen["guidance_rescale"]
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # what vp.inject accepts as a name
ADAPTERS_HELP = "one adapter a line, NAME=PATH (an adapter folder, a DreamBooth output, a diffusers / PEFT / " \
                "kohya / LyCORIS file)"
CONCEPTS_HELP = "one concept a line, ADAPTER:PROMPT:WORDS, e.g. dog:a sks dog and a cat:sks dog " \
                "(WORDS: the concept's words in its prompt, comma-separated)"

_LOCK = threading.RLock()  # one pipeline is shared by every event: adapters, scales, active set


@dataclass
class _Loaded:
    pipe: object
    adapters: dict[str, str] = field(default_factory=dict)  # name -> PATH as its line gave it
    parts: dict[str, list[str]] = field(default_factory=dict)  # name -> components that hold it


_PIPELINES: OrderedDict[str, _Loaded] = OrderedDict()


def find_pipeline(folder) -> Path:
    """The pipeline folder, or FileNotFoundError in one line naming what is missing."""
    from visionpeft.backbones.embedded_sd import resolve

    text = str(resolve(str(folder).strip()))  # `embedded-sd`: the packaged model
    path = Path(text).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{text} does not exist (give a diffusers pipeline folder: Stable Diffusion "
                                "1.x/2.x or SDXL)")
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{text} holds no diffusers pipeline (no model_index.json; give a Stable Diffusion "
                                "1.x/2.x or SDXL folder written by save_pretrained)")
    return path


def _components(pipe) -> list:
    """The UNet and the text encoders: where adapters live."""
    return [m for m in (getattr(pipe, c, None) for c in ("unet", "text_encoder", "text_encoder_2")) if m is not None]


def _load(folder: str) -> _Loaded:
    """The pipeline in ``folder``, loaded once (the last MAX_PIPELINES folders stay loaded)."""
    path = find_pipeline(folder)
    key = str(path.resolve())
    with _LOCK:
        if key in _PIPELINES:
            _PIPELINES.move_to_end(key)
            return _PIPELINES[key]
        from diffusers import DiffusionPipeline

        try:
            pipe = DiffusionPipeline.from_pretrained(key)
        except Exception as err:  # a folder that does not load: say so in one line
            raise ValueError(f"cannot load the pipeline in {folder}: {type(err).__name__}: {one_line(err)}") from None
        unet = getattr(pipe, "unet", None)
        if unet is None or not hasattr(unet.config, "down_block_types") or getattr(pipe, "tokenizer", None) is None:
            raise ValueError(f"{folder} holds a {type(pipe).__name__}; this tab takes a Stable Diffusion 1.x/2.x or "
                             "SDXL pipeline (a UNet with text cross-attention and a CLIP tokenizer)")
        if torch.cuda.is_available():
            pipe.to("cuda")
        _PIPELINES[key] = _Loaded(pipe)
        while len(_PIPELINES) > MAX_PIPELINES:
            _PIPELINES.popitem(last=False)
        return _PIPELINES[key]


def pipeline(folder: str):
    """The demo's own pipeline object for ``folder`` (loading it if need be)."""
    return _load(folder).pipe


def parse_adapters(text: str) -> list[tuple[str, str]]:
    """[(name, path)] from lines NAME=PATH; blank lines and # comments are skipped."""
    out: dict[str, str] = {}
    for i, raw in enumerate((text or "").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, path = (s.strip() for s in line.partition("="))
        if not sep or not name or not path:
            raise ValueError(f"adapter line {i} {line!r}: write NAME=PATH, e.g. dog=output/dreambooth-dog")
        if not ADAPTER_NAME.match(name):
            raise ValueError(f"adapter line {i}: the name {name!r} must be letters, digits, '_' or '-'")
        if name in out:
            raise ValueError(f"adapter line {i}: the name {name!r} is taken by an earlier line")
        out[name] = path
    if len(out) > MAX_ADAPTERS:
        raise ValueError(f"{len(out)} adapters; this demo takes at most {MAX_ADAPTERS}")
    return list(out.items())


def parse_concepts(text: str, names: list[str]) -> list[dict]:
    """compose()'s concepts from lines ADAPTER:PROMPT:WORDS (the prompt may hold colons:
    the adapter ends at the first, the words start after the last)."""
    out = []
    for i, raw in enumerate((text or "").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        adapter, sep, rest = (s.strip() for s in line.partition(":"))
        prompt, sep2, words = (s.strip() for s in rest.rpartition(":"))
        words = [w.strip() for w in words.split(",") if w.strip()]
        if not sep or not sep2 or not adapter or not prompt or not words:
            raise ValueError(f"concept line {i} {line!r}: write ADAPTER:PROMPT:WORDS, e.g. "
                             "dog:a sks dog and a cat:sks dog")
        if adapter not in names:
            raise ValueError(f"concept line {i} names the adapter {adapter!r}, which is not among the adapters "
                             f"({', '.join(names) or 'none loaded'})")
        out.append({"adapter": adapter, "prompt": prompt, "words": words})
    if not out:
        raise ValueError("enter at least one concept: " + CONCEPTS_HELP)
    return out


def _sync(loaded: _Loaded, spec: list[tuple[str, str]]) -> None:
    """Make the pipeline hold exactly the adapters of ``spec``: an adapter whose line is
    unchanged stays as it is; one whose line went or changed is removed; new lines load."""
    import visionpeft as vp
    from visionpeft.pipelines.clora import load_pipeline_adapter

    want = dict(spec)
    for name, path in list(loaded.adapters.items()):
        if want.get(name) != path:
            for comp in _components(loaded.pipe):
                if name in vp.adapter_names(comp):
                    vp.remove(comp, name)
            del loaded.adapters[name], loaded.parts[name]
    for name, path in spec:
        if name not in loaded.adapters:  # a failure leaves that adapter out and the rest as they are
            try:
                loaded.parts[name] = load_pipeline_adapter(loaded.pipe, Path(path).expanduser(), name)
            except (FileNotFoundError, ValueError, KeyError, TypeError):
                raise
            except Exception as err:  # e.g. a file that is not safetensors: one line, not gradio's "Error"
                raise ValueError(f"cannot load the adapter {name!r} from {path}: {type(err).__name__}: "
                                 f"{one_line(err)}") from None
            loaded.adapters[name] = path


def _prepare(folder: str, adapters: str) -> tuple[_Loaded, list[str]]:
    """(the loaded pipeline with the adapters of the lines, their names); gr.Error in one
    line on a bad folder or line. Call with _LOCK held."""
    import gradio as gr

    folder = (folder or "").strip()
    if not folder:
        raise gr.Error("enter a pipeline folder: a diffusers Stable Diffusion 1.x/2.x or SDXL folder")
    try:
        spec = parse_adapters(adapters)
        loaded = _load(folder)
        _sync(loaded, spec)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as err:
        raise gr.Error(one_line(err)) from None
    return loaded, [name for name, _ in spec]


def _set_scales(pipe, scales: dict[str, float], active: list[str] | None = None) -> None:
    """Each adapter's scale (and, if given, the active set) on every component holding it."""
    import gradio as gr

    import visionpeft as vp

    for comp in _components(pipe):
        have = vp.adapter_names(comp)
        if not have:
            continue
        try:
            for name, scale in scales.items():
                if name in have:
                    vp.set_scale(comp, name, float(scale))
        except (ValueError, TypeError) as err:
            raise gr.Error(one_line(err)) from None
        if active is not None:
            vp.set_active(comp, [n for n in active if n in have])


def _settings(steps, seed) -> tuple[int, int]:
    import gradio as gr

    try:
        steps, seed = int(steps), int(seed)
    except (TypeError, ValueError):
        raise gr.Error(f"steps and seed must be whole numbers, got {steps!r} and {seed!r}") from None
    if not 1 <= steps <= 1000:
        raise gr.Error(f"steps={steps}: give 1 to 1000")
    if not 0 <= seed < 2 ** 63:
        raise gr.Error(f"seed={seed}: give 0 to 2**63 - 1")
    return steps, seed


def _rescale(value) -> float:
    import gradio as gr

    try:
        value = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"guidance rescale must be a number in [0, 1], got {value!r}") from None
    if not 0 <= value <= 1:
        raise gr.Error(f"guidance rescale={value:g}: give 0 (off) to 1")
    return value


def load_pipeline(folder: str, adapters: str) -> str:
    """Load the pipeline and the adapters of the lines (what generate and compose do first);
    a line on what is loaded."""
    with _LOCK:
        loaded, names = _prepare(folder, adapters)
        parts = "; ".join(f"{n} ({', '.join(loaded.parts[n])})" for n in names) or "none"
        return f"{type(loaded.pipe).__name__} from {folder.strip()}; adapters: {parts}"


def generate(folder: str, adapters: str, prompt: str, steps: int = 20, guidance: float = GUIDANCE, seed: int = 0,
             use_1: bool = True, use_2: bool = True, use_3: bool = True, use_4: bool = True,
             scale_1: float = 1.0, scale_2: float = 1.0, scale_3: float = 1.0, scale_4: float = 1.0,
             guidance_rescale: float = RESCALE):
    """(image, text): the pipeline's own sampling with the ticked adapters active (slot i
    is the i-th adapter line), each at its scale, and a line saying which were on."""
    import gradio as gr

    prompt = (prompt or "").strip()
    if not prompt:
        raise gr.Error("enter a prompt")
    steps, seed = _settings(steps, seed)
    rescale = _rescale(guidance_rescale)
    uses, scales = (use_1, use_2, use_3, use_4), (scale_1, scale_2, scale_3, scale_4)
    with _LOCK:
        loaded, names = _prepare(folder, adapters)
        active = [n for n, use in zip(names, uses) if use]
        _set_scales(loaded.pipe, dict(zip(names, scales)), active)
        try:
            image = loaded.pipe(prompt, num_inference_steps=steps, guidance_scale=float(guidance),
                                guidance_rescale=rescale, generator=torch.Generator().manual_seed(seed)).images[0]
        except ValueError as err:
            raise gr.Error(one_line(err)) from None
    on = ", ".join(f"{n} x{float(s):g}" for n, s, u in zip(names, scales, uses) if u)
    rescaled = f" (rescale {rescale:g})" if rescale else ""
    return image, f"adapters on: {on or 'none'}; {steps} steps, guidance {float(guidance):g}{rescaled}, seed {seed}"


def _losses_text(result) -> str:
    lines = [f"loss per step ({len(result.losses)}): " + ", ".join(f"{x:.4f}" for x in result.losses)]
    for step, rounds in sorted(result.refine_losses.items()):
        if rounds:
            lines.append(f"refinement at step {step} ({len(rounds)} rounds): " + ", ".join(f"{x:.4f}" for x in rounds))
    return "\n".join(lines)


def compose(folder: str, adapters: str, prompt: str, concepts: str, style: str = "", steps: int = 20,
            guidance: float = GUIDANCE, seed: int = 0, mask_alpha: float = 0.3, step_size: float = 20,
            update_until: int = 10, refine_rounds: int = 2,
            scale_1: float = 1.0, scale_2: float = 1.0, scale_3: float = 1.0, scale_4: float = 1.0,
            guidance_rescale: float = RESCALE):
    """(image, mask picture, losses) of CLoRA: ``concepts`` lines ADAPTER:PROMPT:WORDS,
    ``style`` an adapter on in every branch ("" for none); the adapters at their slots' scales."""
    import gradio as gr

    from visionpeft.pipelines.clora import compose as clora_compose
    from visionpeft.pipelines.clora import mask_picture

    prompt, style = (prompt or "").strip(), (style or "").strip()
    if not prompt:
        raise gr.Error("enter a base prompt that mentions every concept, e.g. a dog and a cat")
    steps, seed = _settings(steps, seed)
    rescale = _rescale(guidance_rescale)
    scales = (scale_1, scale_2, scale_3, scale_4)
    with _LOCK:
        loaded, names = _prepare(folder, adapters)
        try:
            parsed = parse_concepts(concepts, names)
            if style and style not in names:
                raise ValueError(f"the style adapter {style!r} is not among the adapters ({', '.join(names)})")
            _set_scales(loaded.pipe, dict(zip(names, scales)))
            result = clora_compose(loaded.pipe, prompt, concepts=parsed, style=style or None,
                                   num_inference_steps=steps, guidance_scale=float(guidance),
                                   guidance_rescale=rescale, step_size=float(step_size),
                                   update_until=int(update_until), refine_at=REFINE_AT,
                                   refine_rounds=int(refine_rounds), mask_alpha=float(mask_alpha), attn_res=None,
                                   batched=True, generator=torch.Generator().manual_seed(seed))
        except (ValueError, KeyError) as err:  # a bad line, unknown adapter, words not in a prompt
            raise gr.Error(one_line(err)) from None
    image = result.images[0]
    labels = ["base"] + [c["adapter"] for c in parsed]
    return image, mask_picture(result.masks, image.size, labels), _losses_text(result)


def _slots(adapters: str):
    """Updates of the (use, scale) slots and the style choices for the adapter lines (shown,
    labelled per line; hidden past the last); nothing changes while a line is half-typed."""
    import gradio as gr

    try:
        names = [n for n, _ in parse_adapters(adapters)]
    except ValueError:
        return [gr.update()] * (2 * MAX_ADAPTERS + 1)
    uses = [gr.update(visible=i < len(names), label=f"use {names[i]}" if i < len(names) else f"use adapter {i + 1}")
            for i in range(MAX_ADAPTERS)]
    scales = [gr.update(visible=i < len(names), label=f"{names[i]} scale" if i < len(names) else f"scale {i + 1}")
              for i in range(MAX_ADAPTERS)]
    return [*uses, *scales, gr.update(choices=[("none", "")] + [(n, n) for n in names])]


def build(default_pipeline: str = "embedded-sd", default_adapters: str = ""):
    import gradio as gr

    try:
        names = [n for n, _ in parse_adapters(default_adapters)]
    except ValueError:
        names = []
    guidance0, rescale0 = page_sampling(default_pipeline)
    with gr.Blocks(title="visionpeft generation") as demo:
        gr.Markdown("## Generation (Stable Diffusion with adapters)\nPlain: the pipeline's own sampling with "
                    "the adapters you tick. CLoRA: several concept adapters in one image.")
        with gr.Row():
            folder = gr.Textbox(label="pipeline folder", value=default_pipeline,
                                info="a diffusers Stable Diffusion 1.x/2.x or SDXL folder, or embedded-sd "
                                     "(the packaged 64 px model of satellite scenes)")
            adapters = gr.Textbox(label="adapters", value=default_adapters, lines=3, info=ADAPTERS_HELP,
                                  placeholder="dog=output/dreambooth-dog")
        with gr.Row():
            load_button = gr.Button("Load")
            loaded = gr.Textbox(label="loaded", interactive=False, scale=4)
        uses, scales = [], []
        for i in range(MAX_ADAPTERS):
            shown = i < len(names)
            with gr.Row():
                uses.append(gr.Checkbox(value=True, label=f"use {names[i]}" if shown else f"use adapter {i + 1}",
                                        visible=shown, scale=1))
                scales.append(gr.Slider(-1, 2, value=1.0, step=0.05, visible=shown, scale=4,
                                        label=f"{names[i]} scale" if shown else f"scale {i + 1}"))
        with gr.Tabs():
            with gr.Tab("Plain"):
                prompt = gr.Textbox(label="prompt", value="a dog and a cat")
                with gr.Row():
                    steps = gr.Slider(1, 100, value=20, step=1, label="steps")
                    guidance = gr.Slider(0, 20, value=guidance0, step=0.5, label="guidance")
                    rescale = gr.Slider(0, 1, value=rescale0, step=0.05, label="guidance rescale",
                                        info=RESCALE_HELP)
                    seed = gr.Number(value=0, precision=0, label="seed")
                run = gr.Button("Generate", variant="primary")
                with gr.Row():
                    image = gr.Image(label="generated image", format="png")
                    status = gr.Textbox(label="settings used", interactive=False)
            with gr.Tab("CLoRA"):
                c_prompt = gr.Textbox(label="base prompt", value="a dog and a cat")
                concepts = gr.Textbox(label="concepts", lines=3, info=CONCEPTS_HELP,
                                      placeholder="dog:a sks dog and a cat:sks dog\ncat:a dog and a sks cat:sks cat")
                with gr.Row():
                    style = gr.Dropdown(choices=[("none", "")] + [(n, n) for n in names], value="",
                                        allow_custom_value=True, label="style adapter (on in every branch)")
                    c_steps = gr.Slider(1, 100, value=20, step=1, label="compose steps")
                    c_seed = gr.Number(value=0, precision=0, label="compose seed")
                    mask_alpha = gr.Slider(0, 1, value=0.3, step=0.05, label="mask alpha")
                with gr.Accordion("more CLoRA settings", open=False):
                    with gr.Row():
                        c_guidance = gr.Slider(0, 20, value=guidance0, step=0.5, label="compose guidance")
                        c_rescale = gr.Slider(0, 1, value=rescale0, step=0.05, label="compose guidance rescale")
                        step_size = gr.Number(value=20, label="latent step size")
                        update_until = gr.Slider(0, 100, value=10, step=1, label="update the latent until step")
                        at = ", ".join(map(str, REFINE_AT))
                        refine_rounds = gr.Slider(0, 20, value=2, step=1, label=f"refinement rounds (at steps {at})")
                c_run = gr.Button("Compose", variant="primary")
                with gr.Row():
                    c_image = gr.Image(label="composed image", format="png")
                    masks = gr.Image(label="concept masks", format="png")  # lossless: flat colours
                losses = gr.Textbox(label="contrastive loss", interactive=False, lines=2)
        adapters.change(_slots, [adapters], [*uses, *scales, style], api_visibility="private")
        load_button.click(load_pipeline, [folder, adapters], [loaded], api_name="load_pipeline")
        run.click(generate, [folder, adapters, prompt, steps, guidance, seed, *uses, *scales, rescale], [image, status],
                  api_name="generate")
        c_run.click(compose, [folder, adapters, c_prompt, concepts, style, c_steps, c_guidance, c_seed, mask_alpha,
                              step_size, update_until, refine_rounds, *scales, c_rescale], [c_image, masks, losses],
                    api_name="compose")
    return demo


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", default="embedded-sd",
                   help="a diffusers Stable Diffusion 1.x/2.x or SDXL folder, or embedded-sd (the packaged model)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="an adapter (repeatable)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--host", default="127.0.0.1")
    args = p.parse_args(argv)
    try:
        if args.pipeline:
            find_pipeline(args.pipeline)
        parse_adapters("\n".join(args.adapter))
    except (FileNotFoundError, ValueError) as err:
        p.exit(2, f"{p.prog}: {err}\n")
    build(args.pipeline, "\n".join(args.adapter)).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
