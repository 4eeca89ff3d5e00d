"""Text paths (engine/text.py): tokenisation rules, hidden-state selection/normalisation, caching, loading.

Everything runs on tiny seeded Gemma models and a tokenizer built in-process (no hub, no network). The
reference checks call diffusers' SANA-WM prompt code (test-only dependency) on the same tiny models.
"""

import pytest
import torch

from engine.errors import InputError
from engine.text import (
    CHI_PROMPT,
    PromptCache,
    RefinerPromptEncoder,
    RefinerTextConfig,
    Stage1PromptEncoder,
    Stage1TextConfig,
    build_tiny_text_stack,
    build_tiny_tokenizer,
    load_text_model,
    pack_hidden_states,
    tiny_gemma2,
    tiny_gemma3,
)

N = 16  # stage-1 max_length in these tests
L = 24  # refiner max_length in these tests
SHORT = "a red cat sleeping on a warm street"  # words of the chi prompt: one token each
LONG = " ".join(f"word{i} tree" for i in range(40))  # far more than N and L tokens


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def gemma2(tokenizer):
    return tiny_gemma2(len(tokenizer), hidden_size=32, head_dim=16, seed=1)


@pytest.fixture(scope="module")
def gemma3(tokenizer):
    return tiny_gemma3(len(tokenizer), hidden_size=32, num_layers=3, head_dim=16, seed=2)


@pytest.fixture
def stage1(tokenizer, gemma2):
    return Stage1PromptEncoder(tokenizer, gemma2, Stage1TextConfig(max_length=N), cache_capacity=2)


@pytest.fixture
def refiner(gemma3):
    return RefinerPromptEncoder(build_tiny_tokenizer(), gemma3, config=RefinerTextConfig(max_length=L))


def count_forwards(model):
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def prompt_ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


# ---------------------------------------------------------------------------------------------------------------
# Stage-1 (Gemma-2) path
# ---------------------------------------------------------------------------------------------------------------


def test_chi_prompt_is_the_reference_instruction():
    from diffusers.pipelines.sana_wm.pipeline_sana_wm import DEFAULT_CHI_PROMPT

    assert CHI_PROMPT == "\n".join(DEFAULT_CHI_PROMPT)
    assert CHI_PROMPT.endswith("User Prompt: ")


def test_tiny_tokenizer_concatenates_chi_and_prompt(tokenizer):
    # the selection rule below relies on tokens(chi + prompt) = tokens(chi) + tokens(prompt)
    chi = tokenizer.encode(CHI_PROMPT)
    assert chi[0] == tokenizer.bos_token_id and tokenizer.bos_token_id not in chi[1:]
    assert tokenizer.encode(CHI_PROMPT + SHORT) == chi + prompt_ids(tokenizer, SHORT)


def test_stage1_short_prompt_is_bos_last_chi_token_prompt_then_padding(stage1, tokenizer):
    chi = tokenizer.encode(CHI_PROMPT)
    p = prompt_ids(tokenizer, SHORT)
    assert 2 + len(p) < N
    ids, mask, select = stage1.tokenize(SHORT)
    assert ids.shape == mask.shape == (1, len(chi) + N - 2)
    assert len(select) == N and select[0] == 0
    expected = [tokenizer.bos_token_id, chi[-1], *p] + [tokenizer.pad_token_id] * (N - 2 - len(p))
    assert ids[0, select].tolist() == expected
    assert mask[0, select].tolist() == [1] * (2 + len(p)) + [0] * (N - 2 - len(p))


def test_stage1_long_prompt_keeps_bos_and_the_last_positions_of_the_truncated_text(stage1, tokenizer):
    chi = tokenizer.encode(CHI_PROMPT)
    p = prompt_ids(tokenizer, LONG)
    assert len(p) > N
    ids, mask, select = stage1.tokenize(LONG)
    assert ids[0].tolist() == chi + p[: N - 2]  # truncated on the right to chi_len + N - 2, no padding
    assert ids[0, select].tolist() == [tokenizer.bos_token_id, chi[-1], *p[: N - 2]]
    assert mask[0, select].tolist() == [1] * N


@pytest.mark.parametrize("prompt", [SHORT, LONG])
def test_stage1_embeds_are_the_selected_final_hidden_state(stage1, gemma2, tokenizer, prompt):
    out = stage1.compute(prompt)
    assert out.embeds.shape == (1, 1, N, 32) and out.mask.shape == (1, N)
    # hand computation: right-padded chi + prompt, all hidden states, pick the last one, index [0, S-N+1 .. S-1]
    s = len(tokenizer.encode(CHI_PROMPT)) + N - 2
    tok = tokenizer(
        [CHI_PROMPT + prompt],
        max_length=s,
        padding="max_length",
        padding_side="right",
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        hs = gemma2(input_ids=tok.input_ids, attention_mask=tok.attention_mask, output_hidden_states=True).hidden_states
    assert len(hs) == gemma2.config.num_hidden_layers + 1
    keep = [0] + list(range(s - N + 1, s))
    torch.testing.assert_close(out.embeds, hs[-1][:, keep][:, None], rtol=0, atol=0)
    assert torch.equal(out.mask, tok.attention_mask[:, keep])
    assert not torch.allclose(hs[-1][:, keep], hs[-2][:, keep])  # the choice of hidden state matters


def test_stage1_negative_is_bos_then_padding_without_chi(stage1, gemma2, tokenizer):
    neg = stage1.negative()
    assert neg.embeds.shape == (1, 1, N, 32)
    assert neg.mask.tolist() == [[1] + [0] * (N - 1)]
    ids = torch.tensor([[tokenizer.bos_token_id] + [tokenizer.pad_token_id] * (N - 1)])
    with torch.no_grad():
        ref = gemma2(input_ids=ids, attention_mask=neg.mask).last_hidden_state
    torch.testing.assert_close(neg.embeds, ref[:, None], rtol=0, atol=0)


@pytest.mark.parametrize("prompt", [SHORT, LONG])
def test_stage1_matches_the_diffusers_sana_wm_pipeline(stage1, gemma2, tokenizer, prompt):
    from types import SimpleNamespace

    from diffusers.pipelines.sana_wm.pipeline_sana_wm import DEFAULT_CHI_PROMPT, SanaWMPipeline

    fake = SimpleNamespace(tokenizer=tokenizer, text_encoder=gemma2, _execution_device=torch.device("cpu"))
    with torch.no_grad():
        cond, cond_mask, neg, neg_mask = SanaWMPipeline.encode_prompt(
            fake, prompt, "", max_sequence_length=N, chi_prompt=DEFAULT_CHI_PROMPT
        )
    ours = stage1.compute(prompt)
    torch.testing.assert_close(ours.embeds, cond, rtol=0, atol=0)
    assert torch.equal(ours.mask, cond_mask)
    torch.testing.assert_close(stage1.negative().embeds, neg, rtol=0, atol=0)
    assert torch.equal(stage1.negative().mask, neg_mask)


# ---------------------------------------------------------------------------------------------------------------
# Refiner (Gemma-3) path
# ---------------------------------------------------------------------------------------------------------------


def test_refiner_tokens_are_left_padded_stripped_and_truncated(refiner):
    tok = refiner.tokenizer
    ids, mask = refiner.tokenize("  " + SHORT + " \n")
    p = prompt_ids(tok, SHORT)
    assert ids.shape == mask.shape == (1, L)
    pad = L - 1 - len(p)
    assert ids[0].tolist() == [tok.pad_token_id] * pad + [tok.bos_token_id, *p]
    assert mask[0].tolist() == [0] * pad + [1] * (1 + len(p))
    ids, mask = refiner.tokenize(LONG)
    assert ids[0].tolist() == [tok.bos_token_id, *prompt_ids(tok, LONG)[: L - 1]]
    assert mask[0].tolist() == [1] * L


def test_refiner_pads_with_eos_when_the_tokenizer_has_no_pad_token(gemma3):
    tok = build_tiny_tokenizer()
    tok.pad_token = None
    enc = RefinerPromptEncoder(tok, gemma3, config=RefinerTextConfig(max_length=L))
    ids, mask = enc.tokenize("a cat")
    assert ids[0, 0].item() == tok.eos_token_id and mask[0, 0].item() == 0


def hand_pack(hidden_states, mask, scale=8.0, eps=1e-6):
    """Per-layer masked mean/range normalisation written as loops over batch and layer."""
    b, l, c, k = hidden_states.shape
    out = torch.zeros(b, l, c, k, dtype=torch.float64)
    for i in range(b):
        valid = mask[i].bool()
        for j in range(k):
            x = hidden_states[i, :, :, j].double()
            xs = x[valid]
            mu = xs.sum() / (xs.numel() + eps)
            y = scale * (x - mu) / (xs.max() - xs.min() + eps)
            y[~valid] = 0
            out[i, :, :, j] = y
    flat = torch.zeros(b, l, c * k, dtype=torch.float64)
    for ci in range(c):
        for j in range(k):
            flat[:, :, ci * k + j] = out[:, :, ci, j]
    return flat.float()


@pytest.mark.parametrize("prompt", [SHORT, LONG])
def test_refiner_connector_input_is_all_hidden_states_normalised(refiner, gemma3, prompt):
    packed = refiner.connector_input(prompt)
    k = gemma3.config.num_hidden_layers + 1
    assert packed.embeds.shape == (1, L, 32 * k) and packed.mask.shape == (1, L)
    ids, mask = refiner.tokenize(prompt)
    assert torch.equal(packed.mask, mask)
    with torch.no_grad():
        out = gemma3(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert len(out.hidden_states) == k
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)  # index K-1 = final-norm output
    embed = gemma3.embed_tokens(ids)  # index 0 = scaled token embeddings
    torch.testing.assert_close(out.hidden_states[0], embed)
    expected = hand_pack(torch.stack(out.hidden_states, dim=-1), mask)
    torch.testing.assert_close(packed.embeds, expected, rtol=1e-5, atol=1e-5)
    assert (packed.embeds[0, mask[0] == 0] == 0).all()


def test_pack_hidden_states_on_random_batches_with_both_paddings():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 7, 5, 4, generator=g) * 3 + 1
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0, 0]])
    torch.testing.assert_close(pack_hidden_states(x, mask), hand_pack(x, mask), rtol=1e-5, atol=1e-5)
    # idempotent up to rounding: the connectors may apply it again
    once = pack_hidden_states(x, mask)
    twice = pack_hidden_states(once.unflatten(2, (5, 4)), mask)
    torch.testing.assert_close(twice, once, rtol=1e-5, atol=1e-5)


def test_refiner_matches_the_diffusers_refiner_text_path(gemma3):
    from types import SimpleNamespace

    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors
    from diffusers.pipelines.sana_wm.refiner import SanaWMLTX2Refiner

    k = gemma3.config.num_hidden_layers + 1
    torch.manual_seed(4)
    connectors = LTX2TextConnectors(
        caption_channels=32,
        text_proj_in_factor=k,
        video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=16,
        video_connector_num_layers=1,
        video_connector_num_learnable_registers=8,
        audio_connector_num_attention_heads=2,
        audio_connector_attention_head_dim=16,
        audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=8,
        rope_type="split",
    ).eval()
    tok = build_tiny_tokenizer()
    fake = SimpleNamespace(tokenizer=tok, text_encoder=gemma3, connectors=connectors, text_max_sequence_length=L)

    def our_connectors(packed, mask):  # integration point: engine/refiner/connectors.py has this signature
        video, _audio, out_mask = connectors(packed, mask)
        return video, out_mask

    ours = RefinerPromptEncoder(tok, gemma3, our_connectors, RefinerTextConfig(max_length=L))
    for prompt in (SHORT, LONG):
        with torch.no_grad():
            ref, ref_mask = SanaWMLTX2Refiner._encode_prompt(
                fake, prompt, device=torch.device("cpu"), dtype=torch.float32
            )
        got = ours.encode(prompt)
        assert got.embeds.shape == (1, L, 32)
        torch.testing.assert_close(got.embeds, ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(got.mask, ref_mask)


def test_refiner_feeds_the_engine_connectors(refiner, gemma3):
    """Integration point with engine/refiner/connectors.py: our packed output is its input (its own
    normalisation of already-normalised input is idempotent), and the result is what the refiner consumes."""
    connectors_mod = pytest.importorskip("engine.refiner.connectors")
    from engine.refiner.config import ConnectorsConfig

    k = gemma3.config.num_hidden_layers + 1
    torch.manual_seed(5)
    connectors = connectors_mod.TextConnectors(
        ConnectorsConfig(
            caption_channels=32,
            text_proj_in_factor=k,
            video_connector_num_attention_heads=2,
            video_connector_attention_head_dim=16,
            video_connector_num_layers=1,
            video_connector_num_learnable_registers=8,
            rope_type="split",
        )
    ).eval()
    refiner.connectors = connectors
    for prompt in (SHORT, LONG):
        got = refiner.encode(prompt)
        assert got.embeds.shape == (1, L, 32) and got.mask.tolist() == [[1] * L]
        ids, mask = refiner.tokenize(prompt)
        with torch.no_grad():
            hs = gemma3(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            raw, _ = connectors(torch.stack(hs, dim=-1), mask)  # un-normalised stack: the connectors normalise
        torch.testing.assert_close(got.embeds, raw, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Caching
# ---------------------------------------------------------------------------------------------------------------


def test_stage1_cache_hit_skips_the_model_and_prompt_change_recomputes(stage1, gemma2):
    calls, handle = count_forwards(gemma2)
    try:
        first = stage1.encode(SHORT)
        assert len(calls) == 1
        again = stage1.encode(SHORT)
        assert len(calls) == 1 and again is first
        other = stage1.encode("a snowy mountain village")
        assert len(calls) == 2 and not torch.equal(other.embeds, first.embeds)
        stage1.negative()
        stage1.negative()
        assert len(calls) == 3
        # capacity 2: SHORT was least recently used and is gone; asking again recomputes the same values
        assert len(stage1.cache) == 2
        back = stage1.encode(SHORT)
        assert len(calls) == 4 and back is not first
        torch.testing.assert_close(back.embeds, first.embeds, rtol=0, atol=0)
    finally:
        handle.remove()


def test_refiner_cache_runs_model_and_connectors_once_per_prompt(refiner, gemma3):
    calls, handle = count_forwards(gemma3)
    connector_calls = []

    def connectors(stacked, mask):  # attached connectors get the raw [1, L, C, K] stack (they normalise it)
        connector_calls.append(1)
        return stacked[..., -1] * 2, torch.ones_like(mask)

    refiner.connectors = connectors
    try:
        a = refiner.encode(SHORT)
        b = refiner.encode(SHORT)
        assert b is a and len(calls) == 1 and len(connector_calls) == 1
        torch.testing.assert_close(a.embeds, refiner.hidden_stack(SHORT)[0][..., -1] * 2)
        assert a.mask.tolist() == [[1] * L]
        c = refiner.encode("a quiet forest")
        assert len(calls) == 3 and len(connector_calls) == 2 and not torch.equal(c.embeds, a.embeds)
    finally:
        handle.remove()


def test_prompt_cache_is_a_bounded_lru():
    cache = PromptCache(capacity=2)
    made = []
    make = lambda k: lambda: made.append(k) or k.upper()
    assert cache.get("a", make("a")) == "A"
    cache.get("b", make("b"))
    cache.get("a", make("a"))  # a becomes most recent
    cache.get("c", make("c"))  # evicts b
    assert "a" in cache and "c" in cache and "b" not in cache and len(cache) == 2
    assert made == ["a", "b", "c"] and cache.hits == 1 and cache.misses == 3
    with pytest.raises(InputError, match="capacity"):
        PromptCache(0)


# ---------------------------------------------------------------------------------------------------------------
# Loading from local directories
# ---------------------------------------------------------------------------------------------------------------


def test_stage1_round_trip_through_a_diffusers_style_directory(tmp_path, stage1, tokenizer):
    from transformers import Gemma2ForCausalLM

    # a causal-LM checkpoint (as released) loads into the decoder stack; its lm_head is unused
    lm = Gemma2ForCausalLM(stage1.model.config)
    lm.model.load_state_dict(stage1.model.state_dict())
    lm.save_pretrained(tmp_path / "text_encoder")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    loaded = Stage1PromptEncoder.from_pretrained(tmp_path / "text_encoder", config=Stage1TextConfig(max_length=N))
    assert loaded.tokenizer.padding_side == "left"  # the saved default; stage-1 pins right per call
    assert loaded.tokenizer.encode(CHI_PROMPT + SHORT) == tokenizer.encode(CHI_PROMPT + SHORT)
    for prompt in (SHORT, LONG):
        torch.testing.assert_close(loaded.compute(prompt).embeds, stage1.compute(prompt).embeds, rtol=0, atol=0)


def test_refiner_round_trip_from_a_single_directory(tmp_path, refiner):
    refiner.model.save_pretrained(tmp_path / "gemma3")
    refiner.tokenizer.save_pretrained(tmp_path / "gemma3")
    loaded = RefinerPromptEncoder.from_pretrained(tmp_path / "gemma3", config=RefinerTextConfig(max_length=L))
    torch.testing.assert_close(loaded.encode(SHORT).embeds, refiner.encode(SHORT).embeds, rtol=0, atol=0)


def test_refiner_loads_the_language_model_of_a_multimodal_gemma3_checkpoint(tmp_path, gemma3, tokenizer):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    config = Gemma3Config(text_config=gemma3.config.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4)
    full = Gemma3ForConditionalGeneration(config).eval()
    full.model.language_model.load_state_dict(gemma3.state_dict())
    full.save_pretrained(tmp_path / "gemma3_12b")
    tokenizer.save_pretrained(tmp_path / "gemma3_12b")
    loaded = RefinerPromptEncoder.from_pretrained(tmp_path / "gemma3_12b", config=RefinerTextConfig(max_length=L))
    reference = RefinerPromptEncoder(build_tiny_tokenizer(), gemma3, config=RefinerTextConfig(max_length=L))
    torch.testing.assert_close(loaded.encode(SHORT).embeds, reference.encode(SHORT).embeds, rtol=1e-6, atol=1e-6)
    # and the whole multimodal model called on text only gives the same hidden states
    ids, mask = reference.tokenize(SHORT)
    with torch.no_grad():
        hs = full(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    packed = pack_hidden_states(torch.stack(hs, dim=-1), mask)
    torch.testing.assert_close(loaded.connector_input(SHORT).embeds, packed, rtol=1e-6, atol=1e-6)


def test_missing_or_wrong_directories_raise_input_error(tmp_path, stage1, tokenizer):
    missing = tmp_path / "nope"
    with pytest.raises(InputError, match="nope"):
        Stage1PromptEncoder.from_pretrained(missing)
    with pytest.raises(InputError, match="nope"):
        RefinerPromptEncoder.from_pretrained(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="config.json"):
        load_text_model(tmp_path / "empty", ("gemma2",))
    stage1.model.save_pretrained(tmp_path / "g2")
    with pytest.raises(InputError, match="gemma2"):  # Gemma-2 weights offered to the refiner
        RefinerPromptEncoder.from_pretrained(tmp_path / "g2")
    with pytest.raises(InputError, match="tokenizer"):  # weights but no tokenizer anywhere near them
        Stage1PromptEncoder.from_pretrained(tmp_path / "g2")


# ---------------------------------------------------------------------------------------------------------------
# Tiny preset stack
# ---------------------------------------------------------------------------------------------------------------


def test_tiny_text_stack_is_seeded_and_prompt_sensitive():
    a = build_tiny_text_stack(seed=5, stage1_dim=32, refiner_dim=32, refiner_layers=2)
    b = build_tiny_text_stack(seed=5, stage1_dim=32, refiner_dim=32, refiner_layers=2)
    c = build_tiny_text_stack(seed=6, stage1_dim=32, refiner_dim=32, refiner_layers=2)
    s1 = a.stage1.encode(SHORT)
    assert s1.embeds.shape == (1, 1, 16, 32) and s1.mask.shape == (1, 16)
    r = a.refiner.encode(SHORT)
    assert r.embeds.shape == (1, 32, 32 * 3) and r.mask.shape == (1, 32)
    torch.testing.assert_close(b.stage1.encode(SHORT).embeds, s1.embeds, rtol=0, atol=0)
    torch.testing.assert_close(b.refiner.encode(SHORT).embeds, r.embeds, rtol=0, atol=0)
    assert not torch.allclose(c.stage1.encode(SHORT).embeds, s1.embeds)
    assert not torch.allclose(c.refiner.encode(SHORT).embeds, r.embeds)
    assert not torch.allclose(a.stage1.encode("a blue boat").embeds, s1.embeds)
    assert not torch.allclose(a.refiner.encode("a blue boat").embeds, r.embeds)
    # the stack must not disturb the caller's global RNG stream
    torch.manual_seed(0)
    x = torch.rand(1)
    torch.manual_seed(0)
    build_tiny_text_stack(seed=1, stage1_dim=32, refiner_dim=32)
    assert torch.equal(torch.rand(1), x)
