"""CLoRA composition (visionpeft.pipelines.clora) on tiny SD and SDXL pipelines written
offline: the loss against pytorch-metric-learning's NT-Xent, masks and fusion against
loops, batched against sequential, the reductions to plain CFG, and the pipeline left
as it was."""
import copy

import numpy as np
import pytest
import torch
from pytorch_metric_learning.losses import NTXentLoss

import visionpeft as vp
from visionpeft.backbones.tiny import save_tiny_sd_pipeline
from visionpeft.pipelines.clora.clora_math import concept_masks, contrastive_map_loss, fuse, minmax_normalise, nt_xent
from visionpeft.pipelines.clora import compose
from visionpeft.pipelines.clora.attention import MapStore, capture, choose_grid
from visionpeft.pipelines.clora.compose import BranchPredictor, _concepts, _encode, _plan
from visionpeft.pipelines.clora.tokens import concept_tokens, find_word

ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
PROMPT = "a dog and a cat"
CONCEPTS = [{"adapter": "dog", "prompt": "a sks dog and a cat", "words": ["sks dog"]},
            {"adapter": "cat", "prompt": "a dog and a sks cat", "words": ["sks cat"]}]
FAST = dict(num_inference_steps=4, update_until=3, refine_at=(0,), refine_rounds=2)


# --- the math ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nt_xent_equals_pytorch_metric_learning(seed):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(11, 7, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 0, 2, 3, 1, 0])  # 3 appears once: an anchor with no positive
    ours = nt_xent(emb, labels, 0.5)
    theirs = NTXentLoss(temperature=0.5)(emb, labels)
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-10)
    (g1,) = torch.autograd.grad(ours, emb)
    (g2,) = torch.autograd.grad(NTXentLoss(temperature=0.5)(emb, labels), emb)
    torch.testing.assert_close(g1, g2, atol=1e-12, rtol=1e-10)
    # no positive pair at all, or no negative: 0, as there
    assert nt_xent(emb[:3], torch.tensor([0, 1, 2]), 0.5) == 0
    assert float(nt_xent(emb[:3], torch.tensor([4, 4, 4]), 0.5).detach()) == pytest.approx(0.0, abs=1e-12)


def test_map_loss_is_nt_xent_of_the_normalised_token_maps():
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(3, 4, 4, 9, generator=g, dtype=torch.float64)
    groups = [[[2], [2, 3], [6]], [[5], [7], [1, 4]]]
    rows, labels = [], []
    for c, per_branch in enumerate(groups):  # the loop of the authors' loss_fn, written out
        for b, toks in enumerate(per_branch):
            for t in toks:
                v = maps[b][:, :, t].flatten()
                rows.append((v - v.min()) / (v.max() - v.min()))
                labels.append(c)
    want = NTXentLoss(temperature=0.5)(torch.stack(rows), torch.tensor(labels))
    torch.testing.assert_close(contrastive_map_loss(maps, groups, 0.5, eps=0.0), want)
    # a constant map: the authors' form gives NaN, ours a finite loss
    maps[0, :, :, 2] = 0.25
    assert torch.isfinite(contrastive_map_loss(maps, groups)).all()
    assert torch.equal(minmax_normalise(torch.full((1, 5), 2.0)), torch.zeros(1, 5))


def test_masks_threshold_each_token_and_the_base_fills_the_rest():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 4, 4, 6, generator=g)
    mask_tokens = [[], [1, 2], [4]]
    alpha = 0.6
    got = concept_masks(maps, mask_tokens, alpha, (8, 8))
    want = torch.zeros(3, 4, 4)
    for b, toks in enumerate(mask_tokens):
        for i in range(4):
            for j in range(4):
                want[b, i, j] = float(any(maps[b, i, j, t] > alpha * maps[b, :, :, t].max() for t in toks))
    for i in range(4):
        for j in range(4):
            if want[1:, i, j].sum() == 0:
                want[0, i, j] = 1
    torch.testing.assert_close(got, want.repeat_interleave(2, 1).repeat_interleave(2, 2))
    assert (got.sum(0) >= 1).all()  # every latent position is covered
    covered_by_concept = got[1:].sum(0) > 0
    assert torch.equal(got[0] > 0, ~covered_by_concept)  # the base exactly where no concept is
    # disjoint synthetic maps: the masks partition the latent
    maps = torch.zeros(3, 4, 4, 3)
    maps[1, :2, :, 1] = 1.0
    maps[2, 2:, :2, 2] = 1.0
    parts = concept_masks(maps, [[], [1], [2]], 0.3, (4, 4))
    assert torch.equal(parts.sum(0), torch.ones(4, 4))


def test_fusion_is_the_mask_weighted_mean():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(3, 4, 5, 5, generator=g)
    masks = (torch.rand(3, 5, 5, generator=g) > 0.5).float()
    masks[0][masks.sum(0) == 0] = 1
    got = fuse(noise, masks)
    for i in range(5):
        for j in range(5):
            w = masks[:, i, j]
            want = sum(w[b] * noise[b, :, i, j] for b in range(3)) / w.sum()
            torch.testing.assert_close(got[:, i, j], want)


# --- tiny pipelines -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("clora")
    return {"sd": save_tiny_sd_pipeline(root / "sd"), "xl": save_tiny_sd_pipeline(root / "xl", xl=True)}


def _pipe(folders, kind="sd", method="lora", text=False, seed=0, zero=False):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folders[kind])
    pipe.set_progress_bar_config(disable=True)
    for name in ("dog", "cat"):
        cfg = _config(method)
        vp.inject(pipe.unet, cfg, name=name)
        if text:
            for enc in _encoders(pipe):
                vp.inject(enc, vp.LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]), name=name)
    if not zero:
        g = torch.Generator().manual_seed(seed)
        for model in (pipe.unet, *_encoders(pipe)):
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if ".adapters." in n:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return pipe


def _encoders(pipe):
    return [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]


def _config(method):
    return {"lora": lambda: vp.LoRAConfig(r=4, target_modules=ATTN),
            "krona": lambda: vp.KronAConfig(a1=4, a2=4, target_modules=ATTN),
            "wara": lambda: vp.WaRAConfig(r=2, target_modules=ATTN),
            "block_lora": lambda: vp.BlockLoRAConfig(r=4, n_blocks=2, target_modules=ATTN),
            "loha": lambda: vp.LoHaConfig(r=2, target_modules=ATTN)}[method]()


def _branch_pass(pipe, batched, grid=None, style=None):
    """Noise predictions, maps and the latent's gradient of one CLoRA pass."""
    concepts = _concepts(CONCEPTS, vp.adapter_names(pipe.unet))
    branches, groups = _plan(pipe.tokenizer, PROMPT, concepts, style)
    embeds = _encode(pipe, branches, None, torch.device("cpu"), (32, 32))
    pipe.scheduler.set_timesteps(10)
    t = pipe.scheduler.timesteps[2]
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    store = MapStore(grid or choose_grid(pipe.unet, (16, 16), None))
    pred = BranchPredictor(pipe, branches, embeds, store, batched)
    with capture(pipe.unet, store):
        eps_u, eps_c, maps = pred(latents, t)
        loss = contrastive_map_loss(maps, groups)
        (grad,) = torch.autograd.grad(loss, latents)
    return eps_u, eps_c, maps, grad, pred.calls


@pytest.mark.parametrize("kind,method,style", [("sd", "lora", False), ("sd", "krona", False), ("sd", "wara", False),
                                               ("sd", "block_lora", False), ("sd", "loha", False),
                                               ("sd", "lora", True), ("xl", "lora", False), ("xl", "krona", True)])
def test_batched_equals_sequential(folders, kind, method, style):
    pipe = _pipe(folders, kind, method, text=True)
    if style:  # on in every branch: one unrouted slot under the batched pass
        vp.inject(pipe.unet, vp.LoRAConfig(r=2, target_modules=["to_k", "to_v", "to_out.0"]), name="style")
        with torch.no_grad():
            for n, p in pipe.unet.named_parameters():
                if ".adapters.style." in n:
                    p.normal_(0, 0.15)
    grid = (16, 16)  # three cross-attention layers (down, and two up) at this grid
    a = _branch_pass(pipe, True, grid, "style" if style else None)
    b = _branch_pass(pipe, False, grid, "style" if style else None)
    scale = b[3].abs().max()  # the latent's gradient is small: compared relative to its size
    for x, y, what in zip((*a[:3], a[3] / scale), (*b[:3], b[3] / scale),
                          ["uncond noise", "cond noise", "maps", "latent gradient"]):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5, msg=what)
    assert a[4] == 1 and b[4] == 3  # one UNet pass for all branches, against one per branch
    assert (a[1][1] - a[1][0]).abs().max() > 1e-3  # the branches differ: the check has teeth
    assert scale > 1e-9 and (a[3] - b[3]).abs().max() < 1e-5 * scale
    if style:  # branch 0 runs the style adapter: its noise is not the base model's
        with vp.disabled(pipe.unet):
            plain = _branch_pass(pipe, True, grid, "style")
        assert (a[0][0] - plain[0][0]).abs().max() > 1e-4


def test_each_branch_gets_its_own_adapters_and_text_encoding(folders):
    """Branch k's rows: exactly adapter k on the UNet and on the text encoder; branch 0
    none, whatever set_active says."""
    pipe = _pipe(folders, "sd", text=True)
    vp.set_active(pipe.unet, ["cat"])
    vp.set_active(pipe.text_encoder, ["cat"])
    eps_u, eps_c, maps, _, _ = _branch_pass(pipe, True)
    pipe.scheduler.set_timesteps(10)
    t = pipe.scheduler.timesteps[2]
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    for b, (prompt, names) in enumerate([(PROMPT, []), (CONCEPTS[0]["prompt"], ["dog"]),
                                         (CONCEPTS[1]["prompt"], ["cat"])]):
        for model in (pipe.unet, pipe.text_encoder):
            vp.set_active(model, names)
        with torch.no_grad():
            cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True)
            x = pipe.scheduler.scale_model_input(torch.cat([latents] * 2), t)
            out = pipe.unet(x, t, encoder_hidden_states=torch.cat([uncond, cond])).sample
        torch.testing.assert_close(eps_u[b], out[0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(eps_c[b], out[1], atol=2e-5, rtol=1e-4)


def _probe(pipe):
    """The UNet's noise for a fixed latent and the text encoder's embedding of a prompt,
    with whatever adapters are active at their scales."""
    ids = pipe.tokenizer(PROMPT, return_tensors="pt").input_ids
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(9))
    return pipe.unet(x, 10, encoder_hidden_states=pipe.text_encoder(ids)[0].expand(2, -1, -1)).sample


def _counting(unet):
    calls = []
    unet.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("kind", ["sd", "xl"])
def test_one_concept_with_full_masks_is_plain_cfg_with_its_adapter(folders, kind):
    """mask_alpha 0 puts the concept's mask everywhere (attention probabilities are > 0)
    and, without latent updates, the image is the pipeline's own with that adapter on."""
    pipe = _pipe(folders, kind)
    concept = dict(CONCEPTS[0])
    res = compose(pipe, PROMPT, [concept], num_inference_steps=4, step_size=0, mask_alpha=0.0,
                  generator=torch.Generator().manual_seed(1), output_type="np")
    assert torch.equal(res.masks[1], torch.ones_like(res.masks[1])) and res.masks[0].sum() == 0
    vp.set_active(pipe.unet, ["dog"])
    want = pipe(concept["prompt"], num_inference_steps=4, guidance_scale=7.5,
                generator=torch.Generator().manual_seed(1), output_type="np").images
    np.testing.assert_allclose(res.images, want, atol=1e-4)
    vp.set_active(pipe.unet, [])
    base = pipe(concept["prompt"], num_inference_steps=4, generator=torch.Generator().manual_seed(1),
                output_type="np").images
    assert np.abs(base - want).max() > 1e-3  # the adapter changes the image: the check has teeth


def test_zero_adapters_give_the_base_pipelines_image(folders):
    pipe = _pipe(folders, "sd", zero=True)
    concepts = [{"adapter": "dog", "prompt": PROMPT, "words": ["dog"]},
                {"adapter": "cat", "prompt": PROMPT, "words": ["cat"]}]
    res = compose(pipe, PROMPT, concepts, num_inference_steps=4, update_until=0,
                  generator=torch.Generator().manual_seed(2), output_type="np")
    with vp.disabled(pipe.unet):
        want = pipe(PROMPT, num_inference_steps=4, generator=torch.Generator().manual_seed(2),
                    output_type="np").images
    np.testing.assert_allclose(res.images, want, atol=1e-4)


def test_refinement_lowers_the_loss_and_runs_count_unet_passes(folders):
    pipe = _pipe(folders, "sd")
    calls = _counting(pipe.unet)
    res = compose(pipe, PROMPT, CONCEPTS, num_inference_steps=3, update_until=2, refine_at=(0,),
                  refine_rounds=6, step_size=200, generator=torch.Generator().manual_seed(0), output_type="latent")
    rounds = [res.losses[0], *res.refine_losses[0]]
    assert rounds[-1] < rounds[0] - 1e-3, rounds
    assert len(calls) == res.unet_calls == 3 + 6  # one pass a step, plus each refinement round
    calls.clear()
    seq = compose(pipe, PROMPT, CONCEPTS, num_inference_steps=3, update_until=2, refine_at=(0,),
                  refine_rounds=6, step_size=200, batched=False, generator=torch.Generator().manual_seed(0),
                  output_type="latent")
    assert len(calls) == seq.unet_calls == 3 * (3 + 6)
    torch.testing.assert_close(seq.images, res.images, atol=1e-4, rtol=1e-4)


def test_seeded_runs_repeat_exactly_and_leave_the_pipeline_as_it_was(folders):
    pipe = _pipe(folders, "sd", text=True)
    vp.set_active(pipe.unet, ["cat"])
    vp.set_scale(pipe.unet, "dog", 0.8)
    processors = dict(pipe.unet.attn_processors)
    vp.set_active(pipe.text_encoder, ["dog"])
    with torch.no_grad():
        probe_before = _probe(pipe)
    state = copy.deepcopy(pipe.unet.state_dict())
    flags = {n: p.requires_grad for n, p in pipe.unet.named_parameters()}
    a = compose(pipe, PROMPT, CONCEPTS, **FAST, generator=torch.Generator().manual_seed(7), output_type="np")
    b = compose(pipe, PROMPT, CONCEPTS, **FAST, generator=torch.Generator().manual_seed(7), output_type="np")
    assert np.array_equal(a.images, b.images) and a.losses == b.losses
    assert torch.equal(a.masks, b.masks)
    assert dict(pipe.unet.attn_processors) == processors
    assert vp.active_adapters(pipe.unet) == ("cat",) and vp.active_adapters(pipe.text_encoder) == ("dog",)
    with torch.no_grad():  # the same active set and scales: the same outputs as before
        torch.testing.assert_close(_probe(pipe), probe_before, atol=0, rtol=0)
    after = pipe.unet.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert {n: p.requires_grad for n, p in pipe.unet.named_parameters()} == flags
    assert all(p.grad is None for p in pipe.unet.parameters())


def test_a_style_adapter_is_on_in_every_branch(folders):
    pipe = _pipe(folders, "sd")
    vp.inject(pipe.unet, vp.LoRAConfig(r=2, target_modules=["to_k", "to_v"]), name="style")
    res = compose(pipe, PROMPT, CONCEPTS, style="style", **FAST, generator=torch.Generator().manual_seed(0),
                  output_type="latent")
    assert [b["adapters"] for b in res.branches] == [["style"], ["dog", "style"], ["cat", "style"]]


def test_words_are_found_by_the_tokenizer(folders):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(folders["sd"] / "tokenizer")
    ids = tok("a sks dog and a cat").input_ids
    hit = find_word(tok, "a sks dog and a cat", "sks dog")
    assert tok.decode([ids[i] for i in hit]).replace(" ", "") == "sksdog"  # every token of a split word
    assert hit == list(range(hit[0], hit[0] + len(hit)))
    assert concept_tokens(tok, "a dog and a cat", ["sks dog"]) == find_word(tok, "a dog and a cat", "dog")
    assert find_word(tok, "a hotdog", "dog") == []  # whole words only
    assert len(find_word(tok, "a dog and a dog", "dog")) == 6  # every occurrence, each 3 byte tokens


def test_bad_concepts_are_refused_in_one_line(folders):
    pipe = _pipe(folders, "sd")
    processors = dict(pipe.unet.attn_processors)
    with pytest.raises(ValueError, match=r"no adapter named 'bird' in the UNet; it has \['dog', 'cat'\]"):
        compose(pipe, PROMPT, [{"adapter": "bird", "prompt": PROMPT, "words": ["dog"]}])
    with pytest.raises(ValueError, match=r"the word 'sks bird' is not in its prompt 'a sks dog and a cat', "
                                         r"whose tokens are 1:a 2:s 3:k 4:s 5:d 6:o 7:g 8:a"):
        compose(pipe, PROMPT, [{"adapter": "dog", "prompt": "a sks dog and a cat", "words": ["sks bird"]}])
    with pytest.raises(ValueError, match="every branch's prompt must mention every concept"):
        compose(pipe, "a cat", [CONCEPTS[0]])
    with pytest.raises(ValueError, match="names no words"):
        compose(pipe, PROMPT, [{"adapter": "dog", "prompt": PROMPT}])
    with pytest.raises(ValueError, match=r"attn_res=5: this UNet's cross-attention grids at this size are \[8, 16\]"):
        compose(pipe, PROMPT, CONCEPTS, attn_res=5)
    assert dict(pipe.unet.attn_processors) == processors


def test_the_default_grid_is_a_quarter_of_the_latent_or_the_middle_one(folders):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folders["sd"] / "unet")
    assert choose_grid(unet, (16, 16), None) == (8, 8)  # no 4x4 layers here: the middle of 8 and 16
    assert choose_grid(unet, (32, 32), None) == (16, 16)  # grids 32 and 16: the middle one
    three = UNet2DConditionModel(sample_size=16, block_out_channels=(8, 8, 8), norm_num_groups=4, layers_per_block=1,
                                 down_block_types=("CrossAttnDownBlock2D",) * 3, cross_attention_dim=8,
                                 up_block_types=("CrossAttnUpBlock2D",) * 3, attention_head_dim=4)
    assert choose_grid(three, (16, 16), None) == (4, 4)  # CLoRA's own rule: a quarter of the latent
    assert choose_grid(three, (20, 20), None) == (5, 5)
    assert choose_grid(unet, (16, 12), 12) == (16, 12)  # attn_res is the width; (H, W) kept apart
    assert choose_grid(unet, (15, 12), 6) == (8, 6)  # odd sizes halve as the stride-2 convs do


@pytest.mark.parametrize("grid,layers", [((8, 8), 1), ((16, 16), 3)])
def test_maps_are_the_mean_over_layers_heads_and_both_guidance_rows(folders, grid, layers):
    """Reference: diffusers' own classic AttnProcessor in every layer, its probabilities
    recorded where cross-attention runs on the 8x8 grid, averaged by hand per branch."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    pipe = _pipe(folders, "sd")
    _, _, maps, _, _ = _branch_pass(pipe, True, grid)
    branches, _ = _plan(pipe.tokenizer, PROMPT, _concepts(CONCEPTS, ["dog", "cat"]), None)
    embeds = _encode(pipe, branches, None, torch.device("cpu"), (32, 32))
    pipe.scheduler.set_timesteps(10)
    t = pipe.scheduler.timesteps[2]
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    seen = []
    original = Attention.get_attention_scores

    def recording(self, query, key, mask=None):
        probs = original(self, query, key, mask)
        if self.is_cross_attention and probs.shape[1] == grid[0] * grid[1]:
            seen.append(probs.unflatten(0, (2, self.heads)))  # (rows, heads, queries, tokens)
        return probs

    pipe.unet.set_attn_processor(AttnProcessor())
    want = []
    try:
        Attention.get_attention_scores = recording
        for b, br in enumerate(branches):
            seen.clear()
            hidden = torch.cat([embeds["uncond"][b:b + 1], embeds["cond"][b:b + 1]])
            with torch.no_grad(), vp.routing(pipe.unet, [br.adapters] * 2):
                pipe.unet(pipe.scheduler.scale_model_input(torch.cat([latents] * 2), t), t,
                          encoder_hidden_states=hidden)
            # the tiny UNet: one cross-attention layer at 8x8 (its mid block), three at 16x16
            assert len(seen) == layers
            want.append(torch.stack(seen).mean((0, 1, 2)).reshape(*grid, -1))
    finally:
        Attention.get_attention_scores = original
    torch.testing.assert_close(maps.detach(), torch.stack(want), atol=1e-6, rtol=1e-5)


def test_options_rerun_negative_prompt_and_a_non_square_image(folders):
    pipe = _pipe(folders, "sd", text=True)
    calls = _counting(pipe.unet)
    res = compose(pipe, PROMPT, CONCEPTS, num_inference_steps=3, update_until=2, refine_at=(), height=32, width=24,
                  rerun_after_update=True, negative_prompt="a bird", generator=torch.Generator().manual_seed(0),
                  output_type="latent")
    assert res.images.shape == (1, 4, 16, 12) and res.masks.shape == (3, 16, 12)
    assert res.attention_maps.shape[1:3] == (8, 6)  # (height, width) of the grid, not width-first
    assert len(calls) == res.unet_calls == 3 + 2  # a second pass on each updated latent
    plain = compose(pipe, PROMPT, CONCEPTS, num_inference_steps=3, update_until=2, refine_at=(), height=32, width=24,
                    negative_prompt="a bird", generator=torch.Generator().manual_seed(0), output_type="latent")
    other = compose(pipe, PROMPT, CONCEPTS, num_inference_steps=3, update_until=2, refine_at=(), height=32, width=24,
                    generator=torch.Generator().manual_seed(0), output_type="latent")
    assert (plain.images - res.images).abs().max() > 1e-5  # the rerun's noise steps the latent
    assert (plain.images - other.images).abs().max() > 1e-5  # the negative prompt reaches the uncond rows
    one = compose(pipe, PROMPT, CONCEPTS[:1], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="latent")
    assert one.losses == [0.0, 0.0] and one.unet_calls == 2  # one concept: nothing to contrast, no update


def test_a_half_precision_sdxl_vae_decodes_in_float32_and_stays_half(folders):
    """As diffusers' SDXL pipeline: a float16 VAE with force_upcast decodes in float32 and is
    put back in float16 (SDXL's VAE overflows in float16)."""
    from visionpeft.pipelines.clora.compose import _decode

    pipe = _pipe(folders, "xl")
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = _decode(pipe, latents, "np")  # float32 throughout
        pipe.vae.to(torch.float16)
        assert pipe.vae.config.force_upcast
        seen = []
        decode = pipe.vae.decode
        pipe.vae.decode = lambda z, **kw: (seen.append((z.dtype, pipe.vae.dtype)), decode(z, **kw))[1]
        got = _decode(pipe, latents.half(), "np")
    assert seen == [(torch.float32, torch.float32)]  # decoded in float32
    assert pipe.vae.dtype == torch.float16
    np.testing.assert_allclose(got, want, atol=2e-3)  # only the latents' rounding to float16 differs


def _plain_reference(pipe, concept, **kw):
    vp.set_active(pipe.unet, [concept["adapter"]])
    return pipe(concept["prompt"], num_inference_steps=4, generator=torch.Generator().manual_seed(1),
                output_type="np", **kw).images


def _one_concept(pipe, **kw):
    return compose(pipe, PROMPT, CONCEPTS[:1], num_inference_steps=4, step_size=0, mask_alpha=0.0,
                   generator=torch.Generator().manual_seed(1), output_type="np", **kw).images


def test_guidance_rescale_and_text_encoder_switch_match_the_pipeline(folders):
    """One concept, its mask everywhere, no update: compose is the pipeline's own sampling,
    so each option can be checked against diffusers'."""
    pipe = _pipe(folders, "sd", text=True)
    vp.set_active(pipe.text_encoder, ["dog"])  # what the branch uses by default
    got = _one_concept(pipe, guidance_rescale=0.7)
    want = _plain_reference(pipe, CONCEPTS[0], guidance_rescale=0.7)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(want - _plain_reference(pipe, CONCEPTS[0])).max() > 1e-3  # the rescale matters here
    np.testing.assert_allclose(_one_concept(pipe), _plain_reference(pipe, CONCEPTS[0]), atol=1e-4)
    vp.set_active(pipe.text_encoder, [])  # text_encoder_adapters=False: prompts encoded without
    off = _plain_reference(pipe, CONCEPTS[0])
    np.testing.assert_allclose(_one_concept(pipe, text_encoder_adapters=False), off, atol=1e-4)
    vp.set_active(pipe.text_encoder, ["dog"])
    assert np.abs(off - _plain_reference(pipe, CONCEPTS[0])).max() > 1e-3


def test_a_guidance_embedding_unet_is_sampled_as_its_pipeline_does(folders, tmp_path):
    """UNets with time_cond_proj_dim (LCM-style) take the guidance as an embedding and no
    classifier-free guidance on top, as StableDiffusionPipeline runs them."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(folders["sd"])
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel.from_config({**pipe.unet.config, "time_cond_proj_dim": 16})
    vp.inject(pipe.unet, _config("lora"), name="dog")
    with torch.no_grad():
        for n, p in pipe.unet.named_parameters():
            if ".adapters." in n:
                p.normal_(0, 0.15)
    np.testing.assert_allclose(_one_concept(pipe), _plain_reference(pipe, CONCEPTS[0]), atol=1e-4)


def test_only_the_captured_grid_computes_attention_explicitly(folders):
    """During compose, self-attention keeps its own processor and cross-attention hands
    every layer off the grid to it; only the grid's layers record probabilities."""
    from visionpeft.pipelines.clora.attention import CaptureProcessor

    pipe = _pipe(folders, "sd")
    original = dict(pipe.unet.attn_processors)
    seen, explicit = {}, []
    record = CaptureProcessor.__call__

    def spy(self, attn, hidden_states, encoder_hidden_states=None, *a, **kw):
        before = self.store.count
        out = record(self, attn, hidden_states, encoder_hidden_states, *a, **kw)
        explicit.append((hidden_states.shape[1] if hidden_states.ndim == 3 else None, self.store.count > before))
        return out

    pipe.unet.register_forward_pre_hook(lambda m, a: seen.update(m.attn_processors))
    CaptureProcessor.__call__ = spy
    try:
        compose(pipe, PROMPT, CONCEPTS, num_inference_steps=1, update_until=0,
                generator=torch.Generator().manual_seed(0), output_type="latent")
    finally:
        CaptureProcessor.__call__ = record
    for name, proc in seen.items():
        if "attn1" in name:
            assert proc is original[name]  # self-attention: the layer's own processor, untouched
        else:
            assert isinstance(proc, CaptureProcessor) and proc.inner is original[name]
    assert {q for q, rec in explicit if rec} == {64} and {q for q, rec in explicit if not rec} == {256}
