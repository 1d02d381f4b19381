"""CLoRA: several concept adapters in one image, composed at sampling time (Meral et al.,
arXiv 2403.19776; ICCV 2025 as "Contrastive Test-Time Composition of Multiple LoRA
Models"). Written from the paper and the authors' code.

Branches: 0 is the plain prompt with no concept adapter; branch k is concept k's prompt
with adapter k; a style adapter, if given, is on in every branch. Each step every branch
predicts noise with classifier-free guidance, and the cross-attention maps at one grid
give a contrastive loss that moves the latent so that each concept's tokens attend to
the same place in every branch and to different places than the other concepts'; masks
from the maps then decide which branch's noise each latent position takes.

All 2 (N + 1) rows (unconditional then conditional, one per branch) run in ONE UNet
pass: `vp.routing` gives each row its branch's adapters. The authors' code runs N + 1
passes a step and switches adapters before each; ``batched=False`` does that, for
comparison (the two agree to float rounding).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

import visionpeft as vp

from .attention import MapStore, capture, choose_grid
from .clora_math import concept_masks, contrastive_map_loss, fuse
from .tokens import concept_tokens, describe, find_word


@dataclass
class ComposeResult:
    """What `compose` returns. ``masks``: (branches, h, w) 0/1 masks of the last step at
    latent size (branch 0 the base); ``attention_maps``: (branches, H, W, tokens) of the
    last step; ``losses``: the contrastive loss of each denoising step's pass (computed at
    every step, used for updates only while step < update_until); ``refine_losses``:
    {step: the loss of each extra refinement round}; ``unet_calls``: UNet forward passes."""

    images: list
    masks: torch.Tensor
    attention_maps: torch.Tensor
    losses: list[float]
    refine_losses: dict[int, list[float]]
    branches: list[dict]
    unet_calls: int
    settings: dict = field(default_factory=dict)


@dataclass
class Branch:
    prompt: str
    adapters: tuple[str, ...]  # UNet adapters of its rows (concept, style)
    mask_tokens: list[int]  # its concept's tokens in its prompt (none for the base)


def _concepts(concepts, names: list[str]) -> list[dict]:
    if not concepts:
        raise ValueError("compose needs at least one concept: [{'adapter': NAME, 'prompt': ..., 'words': [...]}]")
    out = []
    for i, c in enumerate(concepts):
        if not isinstance(c, dict) or set(c) - {"adapter", "prompt", "words"} or not {"adapter", "prompt"} <= set(c):
            raise ValueError(f"concept {i} is {c!r}; give a dict with keys 'adapter', 'prompt' and 'words'")
        words = c.get("words") or []
        words = [words] if isinstance(words, str) else list(words)
        if not words:
            raise ValueError(f"concept {i} ({c['adapter']!r}) names no words: say which words of its prompt "
                             "are the concept, e.g. words: ['sks dog']")
        if c["adapter"] not in names:
            raise ValueError(f"concept {i}: no adapter named {c['adapter']!r} in the UNet; it has {names}")
        out.append({"adapter": c["adapter"], "prompt": c["prompt"], "words": words})
    return out


def _plan(tokenizer, prompt: str, concepts: list[dict], style: str | None):
    """Branches and, for the loss, token_groups[concept][branch] = that concept's tokens in
    that branch's prompt. A concept's own prompt must hold each of its words; in the
    other prompts a word may also appear by its trailing words ("dog" for "sks dog")."""
    extra = (style,) if style else ()
    branches = [Branch(prompt, extra, [])]
    for c in concepts:
        own = []
        for w in c["words"]:
            hit = find_word(tokenizer, c["prompt"], w)
            if not hit:
                raise ValueError(f"concept {c['adapter']!r}: the word {w!r} is not in its prompt "
                                 f"{c['prompt']!r}, whose tokens are {describe(tokenizer, c['prompt'])}")
            own += hit
        branches.append(Branch(c["prompt"], (c["adapter"], *extra), sorted(set(own))))
    groups = []
    for k, c in enumerate(concepts):
        per_branch = []
        for b, br in enumerate(branches):
            tokens = br.mask_tokens if b == k + 1 else concept_tokens(tokenizer, br.prompt, c["words"])
            if not tokens:
                raise ValueError(f"concept {c['adapter']!r}: none of its words {c['words']} (nor their last words) "
                                 f"is in branch {b}'s prompt {br.prompt!r}, whose tokens are "
                                 f"{describe(tokenizer, br.prompt)}; every branch's prompt must mention every concept")
            per_branch.append(tokens)
        groups.append(per_branch)
    return branches, groups


def _encoders(pipe) -> list:
    return [m for m in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None))
            if m is not None]


def _encode(pipe, branches, negative_prompt, device, size, text_adapters: bool = True):
    """Per branch (uncond, cond) prompt embeddings, with that branch's adapters on the text
    encoders that hold them (none with ``text_adapters=False``); SDXL's pooled embeddings
    and time ids as added conditions."""
    xl = getattr(pipe, "text_encoder_2", None) is not None
    conds, unconds, pooled, npooled = [], [], [], []
    for br in branches:
        with contextlib.ExitStack() as stack:
            for enc in _encoders(pipe):
                names = vp.adapter_names(enc)
                if names:  # exactly this branch's adapters on this encoder, whatever is active
                    mine = tuple(n for n in br.adapters if n in names) if text_adapters else ()
                    stack.enter_context(vp.routing(enc, [mine]))
            with torch.no_grad():
                out = pipe.encode_prompt(prompt=br.prompt, device=device, num_images_per_prompt=1,
                                         do_classifier_free_guidance=True, negative_prompt=negative_prompt)
        conds.append(out[0])
        unconds.append(out[1])
        if xl:
            pooled.append(out[2])
            npooled.append(out[3])
    embeds = {"uncond": torch.cat(unconds), "cond": torch.cat(conds)}
    if xl:
        proj = int(pooled[0].shape[-1])
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=conds[0].dtype, text_encoder_projection_dim=proj)
        embeds["pooled_uncond"], embeds["pooled_cond"] = torch.cat(npooled), torch.cat(pooled)
        embeds["time_ids"] = time_ids.to(device)
    return embeds


class BranchPredictor:
    """One denoising pass of every branch: noise predictions (uncond, cond) per branch and
    the captured maps per branch (mean over its two rows). Batched: one UNet call for all
    2 (N + 1) rows, each routed to its branch's adapters. Sequential: one call per branch.
    The step `compose` runs, public so that scripts/bench_clora.py times exactly it; run it
    inside `capture(pipe.unet, store)`."""

    def __init__(self, pipe, branches, embeds, store: MapStore, batched: bool, timestep_cond=None):
        self.pipe, self.unet, self.store, self.batched = pipe, pipe.unet, store, batched
        self.timestep_cond = timestep_cond  # a guidance embedding, for UNets with time_cond_proj_dim
        self.sets = [br.adapters for br in branches]
        self.embeds = embeds
        self.calls = 0

    def _rows(self, which: list[int]):
        """Embeddings and added conditions of the rows [uncond of `which`, cond of `which`]."""
        e = self.embeds
        idx = torch.tensor(which, device=e["cond"].device)
        hidden = torch.cat([e["uncond"].index_select(0, idx), e["cond"].index_select(0, idx)])
        added = None
        if "time_ids" in e:
            text = torch.cat([e["pooled_uncond"].index_select(0, idx), e["pooled_cond"].index_select(0, idx)])
            added = {"text_embeds": text, "time_ids": e["time_ids"].expand(len(text), -1)}
        return hidden, added

    def _call(self, latents, t, which: list[int]):
        hidden, added = self._rows(which)
        x = self.pipe.scheduler.scale_model_input(torch.cat([latents] * (2 * len(which))), t)
        rows = [self.sets[b] for b in which] * 2
        self.store.reset()
        with vp.routing(self.unet, rows):
            cond = None if self.timestep_cond is None else self.timestep_cond.expand(len(x), -1)
            out = self.unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs=added, timestep_cond=cond,
                            return_dict=False)[0]
        self.calls += 1
        maps = self.store.row_maps()
        n = len(which)
        return out[:n], out[n:], (maps[:n] + maps[n:]) / 2

    def __call__(self, latents, t):
        if self.batched:
            return self._call(latents, t, list(range(len(self.sets))))
        parts = [self._call(latents, t, [b]) for b in range(len(self.sets))]
        return tuple(torch.cat(p) for p in zip(*parts))


def _check_pipeline(pipe, style):
    unet = getattr(pipe, "unet", None)
    if unet is None or not hasattr(unet.config, "down_block_types") or getattr(pipe, "tokenizer", None) is None:
        raise ValueError(f"compose takes a Stable Diffusion 1.x/2.x or SDXL pipeline (a UNet with text "
                         f"cross-attention and a CLIP tokenizer); got {type(pipe).__name__}")
    names = vp.adapter_names(unet)
    if style is not None and style not in names:
        raise ValueError(f"no style adapter named {style!r} in the UNet; it has {names}")
    return names


def compose(pipe, prompt: str, concepts, style: str | None = None, num_inference_steps: int = 50,
            guidance_scale: float = 7.5, step_size: float = 20, update_until: int = 25,
            refine_at=(0, 10, 20), refine_rounds: int = 20, mask_alpha: float = 0.3,
            attn_res: int | None = None, batched: bool = True, generator=None, *,
            negative_prompt: str | None = None, height: int | None = None, width: int | None = None,
            temperature: float = 0.5, rerun_after_update: bool = False, guidance_rescale: float = 0.0,
            text_encoder_adapters: bool = True, output_type: str = "pil") -> ComposeResult:
    """Generate one image that holds every concept, each drawn by its own adapter.

    ``pipe``: a diffusers Stable Diffusion 1.x/2.x or SDXL pipeline whose UNet (and, if
    they were trained, text encoders) hold the adapters by name (`vp.inject`,
    `vp.load_adapter` with our folders or diffusers / PEFT / kohya / LyCORIS files).
    ``prompt``: the base prompt, mentioning every concept ("a dog and a cat").
    ``concepts``: [{"adapter": NAME, "prompt": "a sks dog and a cat", "words": ["sks dog"]}, ...];
    the words are found in the prompts by the pipeline's tokenizer (several tokens each if
    they split). ``style``: an adapter on in every branch, the base one included; its
    strength is its scale (`vp.set_scale`).
    The latent takes ``step_size`` gradient steps of the contrastive loss while the step
    index < ``update_until``, with ``refine_rounds`` extra rounds at the steps in
    ``refine_at`` (with one concept there is nothing to contrast: the loss is 0, and no
    update runs). ``mask_alpha``: a concept's mask is where its token maps exceed alpha
    times their max. ``attn_res``: width of the captured attention grid in tokens (None:
    16 at 512 px on SD 1.5; the middle cross-attention resolution on UNets without it).
    ``batched=False`` runs one UNet pass per branch, as the authors' code does.
    ``rerun_after_update``: run the UNet again on the updated latent for the step's noise
    (off, as in the authors' code: the step uses the pass that produced the maps).
    ``guidance_rescale``: as diffusers' (arXiv 2305.08891, 3.4), on the fused noise.
    ``text_encoder_adapters=False`` encodes every branch's prompt without adapters (the
    authors' ``use_text_encoder_lora=False``). ``output_type``: "pil", "np", "pt" or "latent".
    The pipeline is left as it was: adapters, their active set and scales, and the
    attention processors."""
    names = _check_pipeline(pipe, style)
    concepts = _concepts(concepts, names)
    if not 0 <= mask_alpha <= 1:
        raise ValueError(f"mask_alpha={mask_alpha}: give a fraction of each map's max, 0 to 1 (0.3-0.4 usual)")
    if num_inference_steps < 1 or refine_rounds < 0:
        raise ValueError("num_inference_steps must be >= 1 and refine_rounds >= 0")
    unet, device = pipe.unet, pipe._execution_device
    height = height or unet.config.sample_size * pipe.vae_scale_factor
    width = width or unet.config.sample_size * pipe.vae_scale_factor
    branches, groups = _plan(pipe.tokenizer, prompt, concepts, style)
    embeds = _encode(pipe, branches, negative_prompt, device, (height, width), text_encoder_adapters)
    pipe.scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = pipe.scheduler.timesteps
    latents = pipe.prepare_latents(1, unet.config.in_channels, height, width, embeds["cond"].dtype, device, generator)
    step_kwargs = {}
    if "generator" in inspect.signature(pipe.scheduler.step).parameters:
        step_kwargs["generator"] = generator
    timestep_cond = None
    if getattr(unet.config, "time_cond_proj_dim", None) is not None:  # guidance-distilled UNets (LCM)
        w = torch.tensor([guidance_scale - 1.0])
        timestep_cond = pipe.get_guidance_scale_embedding(w, embedding_dim=unet.config.time_cond_proj_dim)
        timestep_cond = timestep_cond.to(device=device, dtype=latents.dtype)
    grid = choose_grid(unet, tuple(latents.shape[-2:]), attn_res)
    store = MapStore(grid)
    predict = BranchPredictor(pipe, branches, embeds, store, batched, timestep_cond)
    mask_tokens = [br.mask_tokens for br in branches]
    refine_at = set(refine_at or ())
    losses, refine_losses = [], {}

    def loss_of(maps):
        return contrastive_map_loss(maps, groups, temperature)

    def update(lat, t):
        lat = lat.detach().requires_grad_(True)
        eps_u, eps_c, maps = predict(lat, t)
        loss = loss_of(maps)
        (grad,) = torch.autograd.grad(loss, lat)
        return (lat - step_size * grad).detach(), eps_u.detach(), eps_c.detach(), maps.detach(), float(loss.detach())

    with capture(unet, store), pipe.progress_bar(total=len(timesteps)) as bar:
        for i, t in enumerate(timesteps):
            # one concept has no other to contrast with: its loss is 0 and so is the gradient
            if step_size and i < update_until and len(groups) > 1:
                with torch.enable_grad():
                    latents, eps_u, eps_c, maps, loss = update(latents, t)
                    losses.append(loss)
                    if i in refine_at:
                        rounds = []
                        for _ in range(refine_rounds):
                            latents, eps_u, eps_c, maps, loss = update(latents, t)
                            rounds.append(loss)
                        refine_losses[i] = rounds
                if rerun_after_update:
                    with torch.no_grad():
                        eps_u, eps_c, maps = predict(latents, t)
            else:
                with torch.no_grad():
                    eps_u, eps_c, maps = predict(latents, t)
                    losses.append(float(loss_of(maps)))
            with torch.no_grad():
                masks = concept_masks(maps, mask_tokens, mask_alpha, tuple(latents.shape[-2:]))
                uncond, cond = fuse(eps_u, masks), fuse(eps_c, masks)
                # a guidance-distilled UNet has the guidance in its embedding: no CFG on top,
                # as the diffusers pipelines do
                noise = (cond if timestep_cond is not None else uncond + guidance_scale * (cond - uncond))[None]
                if guidance_rescale > 0:
                    noise = rescale_noise_cfg(noise, cond[None], guidance_rescale=guidance_rescale)
                noise = noise.to(latents.dtype)
                latents = pipe.scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
            bar.update()
    with torch.no_grad():
        images = _decode(pipe, latents, output_type)
    settings = dict(prompt=prompt, concepts=concepts, style=style, num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale, step_size=step_size, update_until=update_until,
                    refine_at=sorted(refine_at), refine_rounds=refine_rounds, mask_alpha=mask_alpha,
                    attn_grid=list(grid), batched=batched, negative_prompt=negative_prompt, height=height,
                    width=width, temperature=temperature, rerun_after_update=rerun_after_update,
                    guidance_rescale=guidance_rescale, text_encoder_adapters=text_encoder_adapters)
    described = [{"prompt": br.prompt, "adapters": list(br.adapters), "mask_tokens": br.mask_tokens}
                 for br in branches]
    for k, g in enumerate(groups):
        for b, tokens in enumerate(g):
            described[b].setdefault("concept_tokens", {})[concepts[k]["adapter"]] = tokens
    return ComposeResult(images, masks.cpu(), maps.cpu(), losses, refine_losses, described, predict.calls, settings)


def _decode(pipe, latents, output_type):
    """The pipelines' own decoding: the latent mean and std where the VAE config has them,
    and on SDXL a float16 VAE that asks for it (``force_upcast``: SDXL's VAE overflows in
    float16) decoded in float32 and put back in float16 afterwards, as diffusers does."""
    if output_type == "latent":
        return latents
    vae = pipe.vae
    cfg = vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, -1, 1, 1)
        z = latents * torch.tensor(std).view(shape).to(latents) / cfg.scaling_factor \
            + torch.tensor(mean).view(shape).to(latents)
    else:
        z = latents / cfg.scaling_factor
    shift = getattr(cfg, "shift_factor", None)
    if shift:
        z = z + shift
    # only where the pipeline itself upcasts: StableDiffusionPipeline decodes in float16 as it is
    xl = getattr(pipe, "text_encoder_2", None) is not None
    upcast = xl and vae.dtype == torch.float16 and getattr(cfg, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        image = vae.decode(z.to(vae.dtype), return_dict=False)[0]
    finally:
        if upcast:
            vae.to(torch.float16)
    return pipe.image_processor.postprocess(image, output_type=output_type)
