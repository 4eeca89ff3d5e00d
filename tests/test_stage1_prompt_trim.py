"""`stage1-prompt-trim` (engine.stage1.model.trim_text): the stage-1 prompt's K/V and bias without the padding after
its last token. Lengths; the same chunks as the whole prompt through a live loop with a prompt change to a longer
prompt, eager, under the emulated CUDA graphs (captured again for the new length) and with the compiled block (no
recompile for the new length); CPU. Its speed is measured on a GPU by `sana-wm bench --fast all,stage1-prompt-trim`."""

import shutil

import pytest
import torch
from torch._dynamo.utils import counters

from engine.bench import build_bench_world, first_image, scripted_controls
from engine.errors import InputError
from engine.fast import PROMPT_TRIM, apply_fast_paths, stage1_graph
from engine.rollout import Rollout
from engine.stage1.model import trim_text
from engine.text import PromptEmbeds
from engine.world import WorldPipeline
from tests.test_graph_capture_cpu import CpuRunner, fake_cuda
from tests.test_stage1_streaming import small_model

needs_cc = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None,
                              reason="inductor's CPU backend needs a C++ compiler")
TOKENS = {"a street": 3, "a forest path in the rain": 9}  # prompt -> its tokens (of 16 positions)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


class Encoder:
    """Seeded embeddings `[1, 1, L, Cc]` with `TOKENS[prompt]` tokens, then padding (as the stage-1 text stack's)."""

    def __init__(self, length: int, channels: int) -> None:
        self.length, self.channels = length, channels

    def encode(self, prompt: str) -> PromptEmbeds:
        g = torch.Generator().manual_seed(len(prompt))
        mask = torch.zeros(1, self.length, dtype=torch.int64)
        mask[:, : TOKENS[prompt]] = 1
        return PromptEmbeds(torch.randn(1, 1, self.length, self.channels, generator=g), mask)


def test_trim_keeps_every_token_to_a_multiple():
    """The kept positions, and a cross-attention over them against one over the whole prompt (equal: padding beside a
    token weighs 0; a row with no token at all keeps every position, over which its attention spreads evenly)."""
    model = small_model()
    L = 16
    g = torch.Generator().manual_seed(1)
    y = torch.randn(2, L, model.config.caption_channels, generator=g)
    x = torch.randn(2, 5, model.config.hidden_size, generator=g)
    attn = model.blocks[0].cross_attn
    for tokens, multiple, keep in [((3, 1), 4, 4), ((3, 6), 4, 8), ((16, 2), 4, 16), ((5, 5), 64, 16), ((0, 0), 4, 16),
                                   ((0, 3), 4, 16), ((9, 2), 1, 9)]:
        mask = torch.zeros(2, L)
        for b, n in enumerate(tokens):
            mask[b, :n] = 1
        text = model.encode_text(y, mask)
        got = trim_text(text, multiple)
        assert got.bias.shape[-1] == keep and got.dynamic_length, (tokens, multiple)
        assert torch.equal(got.bias, text.bias[..., :keep])
        for (k, v), (k0, v0) in zip(got.kv, text.kv, strict=True):
            assert k.shape[2] == v.shape[2] == keep and k.is_contiguous()
            assert torch.equal(k, k0[:, :, :keep]) and torch.equal(v, v0[:, :, :keep])
        whole, trimmed = attn(x, text.kv[0], text.bias), attn(x, got.kv[0], got.bias)
        assert rel(trimmed, whole) <= 1e-6, (tokens, multiple)
    with pytest.raises(InputError, match="multiple 0; accepted: >= 1"):
        trim_text(text, 0)


def rollout(world, trim: int | None, chunks: int = 6, graphs: bool = False, compiled: bool = False):
    """A preview live loop whose prompt changes after chunk 3 (3 tokens, then 9); returns the pipeline, the chunks'
    latents, the prompt positions held and the dynamo graphs made, after each chunk."""
    pipe = WorldPipeline(world)
    if graphs:
        pipe.stream = stage1_graph.GraphedStage1Stream.from_stream(pipe.stream)
    elif compiled:
        apply_fast_paths(pipe, ["stage1-compile"])
    pipe.stream.prompt_trim = trim
    pipe.start(first_image(world.preset, 0), "a street", "preview")
    ro = Rollout(pipe, scripted_controls(chunks), intrinsics_px=world.preset.default_intrinsics, seed=3,
                 quality="preview")
    out, lengths, made = [], [], []
    for chunk in ro.chunks(chunks):
        out.append(chunk.latents)
        lengths.append(pipe.stream.text.bias.shape[-1])
        made.append(counters["stats"]["unique_graphs"])
        if chunk.index == 3:
            pipe.set_prompt("a forest path in the rain")
    return pipe, out, lengths, made


def tiny_world():
    world = build_bench_world("tiny", device="cpu", dtype=torch.float32, seed=2, with_refiner=False)
    world.text.stage1 = Encoder(world.preset.text.stage1_max_length, world.preset.stage1.caption_channels)
    return world


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=needs_cc)], ids=["eager", "compiled"])
def test_trimmed_prompt_gives_the_chunks_of_the_whole_one(compiled):
    """Compiled: the block compiled for the first prompt's length takes the second's without a recompile."""
    world = tiny_world()
    _, plain, full_lengths, _ = rollout(world, None)
    _, trimmed, lengths, made = rollout(world, 4, compiled=compiled)
    assert full_lengths == [16] * 6 and lengths == [4] * 4 + [12] * 2  # 3 tokens, then 9
    for a, b in zip(trimmed, plain, strict=True):
        assert rel(a, b) <= (1e-5 if compiled else 1e-6)
    if compiled:  # chunks 0-2 meet every cache state (and compile for it); 4-5 have the new prompt length
        assert made[5] == made[3], made


def test_a_prompt_of_another_length_is_captured_again(monkeypatch):
    """The emulated CUDA graphs (tests/test_graph_capture_cpu.py: captures counted, replays compute nothing): the new
    length gets new static prompt buffers, still marked dynamic, and the steady passes are captured again for them."""
    fake_cuda(monkeypatch, [])
    captured = []  # the prompt positions each capture saw

    class Runner(CpuRunner):
        def _capture(self, *args, **kwargs):
            captured.append(self.text.bias.shape[-1])
            return super()._capture(*args, **kwargs)

    monkeypatch.setattr(stage1_graph, "Stage1GraphRunner", Runner)
    pipe, _, lengths, _ = rollout(tiny_world(), 4, graphs=True)
    runner = pipe.stream.runner
    assert lengths == [4] * 4 + [12] * 2
    assert runner.text.dynamic_length and runner.text.bias.shape[-1] == 12
    assert pipe.stream.text.bias is runner.text.bias  # the prompt held once: the static copy
    assert 4 in captured and 12 in captured and runner.replays > 0, captured


def test_the_fast_path_sets_the_trim():
    world = tiny_world()
    pipe = WorldPipeline(world)
    assert "stage1-prompt-trim" in apply_fast_paths(pipe, ["stage1-prompt-trim"])
    assert pipe.stream.prompt_trim == PROMPT_TRIM
    pipe.start(first_image(world.preset, 0), "a street", "preview")
    assert pipe.stream.text.dynamic_length and pipe.stream.text.bias.shape[-1] == 16  # 16 positions < 64: all kept
