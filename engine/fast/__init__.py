"""Fast paths of the live loop, each switchable by name and kept beside its plain path.

`apply_fast_paths(pipe, names)` swaps parts of an `engine.world.WorldPipeline` in place and returns what it did.
tests/test_fast_paths_gpu.py compares each with the plain path.

- `stage1-graph`: CUDA-graph replay of the streaming stage-1 forwards (engine/fast/stage1_graph.py);
- `stage1-compile`: the stage-1 blocks through one `torch.compile`d block call (engine/fast/stage1_compile.py;
  with `stage1-graph`, in the graphs' steady state);
- `stage1-tf32-scans`: TF32 matmuls inside the GDN / camera scans (engine/fast/scans.py; not bit-equal);
- `refiner-graph`: CUDA-graph replay of the AR refiner's block forwards (engine/fast/refiner_graph.py);
- `refiner-compile`: the refiner blocks' halves `torch.compile`d, in the graphs' steady state
  (engine/fast/refiner_compile.py; needs `refiner-graph`);
- `refiner-rope`: the refiner's RoPE as one fused Triton kernel (engine/fast/refiner_rope.py, kernels/rope.py);
- `stage1-triton-scans`: the GDN / camera scans as Triton kernels (kernels/gdn_triton.py, engine/fast/scans.py); a
  GDN block's four scans (main and camera, forward and backward) in one launch: 0.475 -> 0.381 ms a block on the H100;
- `stage1-block-phases`: the Triton scans (as `stage1-triton-scans`, which it supersedes), with a one-segment GDN
  block's scans in three launches that also combine them (`gdn_block_phases_triton`): the frame matrices once for
  both directions, the six recurrences side by side, one readout per token tile from the summed forward and
  backward states, written in the model's dtype; bf16 products as two bf16 dots (not bit-equal to the one launch:
  TF32-level rounding; a live loop 8.8e-3 from it in bf16, tests/test_fast_paths_gpu.py). H200, graph replay: a
  block 0.45 (one launch + torch combine) -> 0.20 ms; H100, same card: a preview chunk 286 -> 268 ms, stage-1
  238 -> 216 ms (tests/benchmarks/results/h100_2026-11-27_s6_*);
- `stage1-ffn`: the FFN's depthwise 3x3 conv + bias + GLU as one Triton kernel between two token-major GEMMs
  (engine/fast/stage1_ffn.py, kernels/dwconv_glu.py; fp32 inside the kernel, so not bit-equal to the bf16 plain
  path, and closer to fp32: 8.1e-3 vs 9.4e-3 for a release FFN, tests/benchmarks/ffn_probe.py). H100: a compiled
  release FFN 0.71 -> 0.64 ms; the stage-1 of a chunk 249 -> 235 ms (same card,
  tests/benchmarks/results/h100_2026-11-27_s4_*). Since session 9 the kernel's SiLU is one tanh.approx for 16-bit
  outputs (error below their rounding; the kernel 0.130 -> 0.095 ms, a compiled release FFN 0.603 -> 0.574 ms;
  s9_call2 `ffn_sweep`);
- `stage1-rope`: the stage-1 RoPE (adjacent pairs, complex table) as one Triton pass, a custom op the compiled block
  calls whole (engine/fast/stage1_rope.py, kernels/rope.py; process-wide). Correct on the H100 (its GPU tests, and
  the compiled live loop at 6.1e-5 in fp32) but slower: a preview chunk 333 vs 293 ms, stage-1 276 vs 239 ms (same
  card, one call; the cause, ~60 us more per call, is not profiled yet). Not in `all`;
- `stage1-real-rope`: inside the compiled block call only, the stage-1 RoPE in real arithmetic
  (`kernels.rope.rope_pairs_real`, the same fp32 products), which inductor fuses into its neighbouring kernels instead
  of running the complex multiply and its copies as separate kernels (engine/fast/stage1_rope.py; process-wide).
  H100, same card: a release forward 1161 -> 876 launches, 38.71 -> 38.31 ms of GPU time
  (tests/benchmarks/results/h100_2026-11-27_s8_call2_*);
- `stage1-fused-proj`: a self-attention layer's input linears (qkv, camera q/k/v, output gate; GDN: beta and decay
  gates) as one GEMM over their concatenated weights (zero rows to a multiple of 64: cuBLASLt's bias epilogue), the
  parameters views of it (engine/fast/stage1_gemms.py; world-wide; rounding-level differences);
- `stage1-tconv`: the FFN temporal conv weights stored tap-major, so its taps are three contiguous copies instead of
  a per-channel interleave (engine/fast/stage1_gemms.py; world-wide). With `stage1-fused-proj`, H100, same card: a
  release stage-1 forward 40.7 -> 39.2 ms of GPU time (GEMMs 18.6 -> 17.7, the tap pass 46 -> 18 us a block), a
  preview chunk's stage-1 218.1 -> 211.3 ms (tests/benchmarks/results/h100_2026-11-27_s7_*);
- `stage1-lean-pass`: the cache-write pass (whose output nobody reads) computes in its last block only what the caches
  keep: the attention caches in full, then the last frame's tokens as far as the FFN tail (no temporal conv, no
  final layer) (`Stage1Block._ffn_tail_only`, `Stage1Transformer.run(caches_only=True)`; rounding-level differences
  from GEMMs over fewer rows). CPU tests: tests/test_stage1_lean_pass.py; GPU: the compiled live loop 6.0e-5 from
  the eager one in fp32 (`test_graphs_equal_eager`). H100, same card: a preview chunk's stage-1 203.9 -> 201.7 ms,
  its cache pass 43.2 -> 42.4 (tests/benchmarks/results/h100_2026-11-27_s9_call2_*);
- `stage1-prompt-trim`: the prompt's cross-attention K/V and bias without the padding after its last token, kept to
  a multiple of 64 positions (`engine.stage1.model.trim_text`; padding weighs exactly 0, so the same output), their
  count dynamic for torch.compile; a prompt of another length captures the graphs again. CPU tests:
  tests/test_stage1_prompt_trim.py; GPU: inside `all`'s compiled graphs across a prompt change, no difference from
  the whole prompt in fp32 or bf16 on the H100
  (`test_prompt_trim_inside_the_compiled_graphs_equals_the_whole_prompt`). H100, same card, `all,lean-memory` with
  and without it (session 12): a full chunk's stage-1 203.9 -> 201.5 ms, a preview chunk's 200.0 -> 198.8
  (tests/benchmarks/results/h100_2026-11-27_s12_*);
- `refiner-gelu`: the refiner FFN up-projection with bias and GELU (tanh) in cuBLASLt's GEMM epilogue instead of a
  separate pass (engine/fast/refiner_gelu.py; one bf16 rounding fewer, so not bit-equal; world-wide module swap,
  like `refiner-fp8`, which takes precedence where both apply). H100: the release up-projection 0.511 -> 0.478 ms
  (error vs fp64 1.7e-3, the plain path's 2.6e-3); a refiner block 645 -> 632 ms (same card);
- `refiner-fp8`: e4m3 weights and per-token e4m3 activations in the refiner blocks' GEMMs (engine/fast/refiner_fp8.py;
  self-attention's q/k/v as one GEMM over one quantised input, the FFN's GELU inside the down projection's
  quantiser; changes the numerics: opt-in by name, never part of `all`);
- `refiner-fp8-attn`: the refiner's self- and cross-attention with e4m3 Q, K, P and V on fp8 tensor cores, fp32
  softmax (kernels/fp8_attention.py, a Triton kernel with TMA loads; the torch reference off CUDA): the K/V window
  keeps an e4m3 copy of its sink + history, rebuilt once a block (beside the decode under `chunk-async`), the block's
  own K/V are quantised per forward and an unmasked prompt's K/V once per prompt (`RefinerKVWindow`
  `use_fp8_attention`, `engine.refiner.ar.quantize_text`; 3.8 GB more at the release size). H100: a release
  self-attention 0.99 -> 0.75 ms, a cross-attention 0.145 -> 0.105; with `refiner-fp8` a refiner block 533 -> 452-456
  ms, full 1.91x -> 2.08-2.10x (tests/benchmarks/results/h100_2026-11-27_s10_*). Changes the numerics (5.4e-2
  relative per attention output on Gaussian data; a block's output 2.9e-2 with random weights): opt-in by name,
  never part of `all`; the bench reports its cost (`fp8_quality`, `fp8_attention_quality`);
- `vae-fast`: the VAE decoder channels-last, with fused RMS norm + SiLU (+ bias, residual, padding) and folded
  padding, cudnn autotuning (engine/fast/vae_fast.py, kernels/vae_norm.py);
- `vae-pad`: one-pass reflect padding in the VAE decoder's convs (engine/fast/vae_pad.py, kernels/frames.py);
- `frames`: decoded pixels -> uint8 frames in one Triton pass, copied to page-locked host memory (engine/fast/frames.py,
  kernels/frames.py);
- `chunk-async`: a chunk without host synchronisation but the wait for its outputs (`WorldPipeline._run_chunk_async`):
  the denoising, refiner and decode are enqueued back to back, the cache-write pass on its own stream from the end of
  the decode, beside the frames' conversion and copy, and the next chunk's host work (keys, camera, noise, the frame
  context, launches) overlaps that pass; the plain path synchronises after each stage, so the GPU idles while the host
  launches the next (not timed apart from the rest). Same kernels, same order, same values (bit-equal on an H100).
  Stage times become CUDA event spans. `cache-overlap` takes precedence where both are on;
- `cache-overlap`: the stage-1 cache-write pass of a chunk on a second (low-priority) CUDA stream, beside that
  chunk's refiner and decode on a high-priority one (`WorldPipeline.cache_stream`, `main_stream`); the chunk still
  ends when the pass has (the next chunk reads it). Opt-in: on the H100, before the priorities, it gained ~3 ms
  per preview chunk and lost ~40 ms per full chunk (the pass slowed the refiner more than it saved); the variant
  with priorities is not measured yet;
- `lean-memory`: not a speed path but a memory one (engine/fast/lean_memory.py): the weights no chunk reads (the
  prompt-time cross-attention K/V projections and caption embedders, the VAE encoder, the text connectors; 5.1 GB
  at the release size) live in page-locked host memory and are copied in per layer when a prompt is set or an image
  encoded; the VAE decodes one latent frame per call (a third of the decoder's activations held at once); the
  refiner's K/V window has no slots for the block being refined (2.1 GB): two-segment attention, equal up to
  rounding. H100, full bf16: peak 49.7 -> 40.3 GB allocated (41.9 GB reserved); a prompt change copies ~3.7 GB in.
  Opt-in; `all,lean-memory` is the release configuration: session 9's H100 met every bf16 target of issue 7 with it
  in one run (peak 40.7 GB, full 1.69x, decode 56.9 ms; tests/benchmarks/results/h100_2026-11-27_s9_bench_*).

`all` names the ones in `ALL`.
"""

from __future__ import annotations

from engine.errors import InputError

FAST_PATHS = ("stage1-graph", "stage1-compile", "stage1-tf32-scans", "stage1-triton-scans", "stage1-block-phases",
              "stage1-ffn", "stage1-rope", "stage1-real-rope", "stage1-fused-proj", "stage1-tconv", "stage1-lean-pass",
              "stage1-prompt-trim", "refiner-graph", "refiner-compile", "refiner-rope", "refiner-gelu", "refiner-fp8",
              "refiner-fp8-attn", "vae-pad", "vae-fast", "frames", "chunk-async", "cache-overlap", "lean-memory")
# `all`: the paths that keep the bf16 model's numerics (within bf16 rounding) and passed their GPU tests (fp8 is
# opt-in by name; the Triton scans supersede the TF32 ones, and the phased block the one-launch block; vae-fast
# supersedes vae-pad)
ALL = ("stage1-graph", "stage1-compile", "stage1-triton-scans", "stage1-block-phases", "stage1-ffn",
       "stage1-real-rope", "stage1-fused-proj", "stage1-tconv", "stage1-lean-pass", "stage1-prompt-trim",
       "refiner-graph", "refiner-compile", "refiner-rope", "refiner-gelu", "vae-fast", "frames", "chunk-async")
CUDA_ONLY = ("stage1-graph", "stage1-triton-scans", "stage1-block-phases", "stage1-ffn", "stage1-rope",
             "refiner-graph", "refiner-compile",
             "refiner-rope", "refiner-fp8", "frames", "chunk-async", "cache-overlap")


PROMPT_TRIM = 64  # `stage1-prompt-trim`: prompt positions kept in multiples of this (H100, session 9: bit-equal at 64)


def expand(names) -> list[str]:
    """The fast-path names of `names` (a list or tuple; `all` stands for `ALL`), each once, in `FAST_PATHS`'s
    order (e.g. the graphs before the compile); an unknown name is an InputError."""
    if isinstance(names, str):
        raise InputError(f"fast paths must be a list of names, not the string {names!r} (split it on ',')")
    names = [n for n in names if n != "all"] + (list(ALL) if "all" in names else [])
    for name in names:
        if name not in FAST_PATHS:
            raise InputError(f"unknown fast path {name!r}; accepted: {list(FAST_PATHS)} or 'all' (= {', '.join(ALL)})")
    return sorted(set(names), key=FAST_PATHS.index)


def check_fast_paths(names, device_type: str) -> list[str]:
    """`expand(names)`, refusing a CUDA-only path for a `device_type` other than "cuda"."""
    names = expand(names)
    for name in names:
        if name in CUDA_ONLY and device_type != "cuda":
            raise InputError(f"fast path {name!r} needs a CUDA device (--device cuda)")
    return names


def apply_fast_paths(pipe, names) -> dict[str, str]:
    """Switch on the named fast paths of `pipe` (a `WorldPipeline`); returns {name: what was swapped}."""
    names = check_fast_paths(names, pipe.world.device.type)  # before anything is switched on
    done = {}
    for name in names:
        if name == "stage1-graph":
            from engine.fast.stage1_graph import GraphedStage1Stream

            if not isinstance(pipe.stream, GraphedStage1Stream):  # applied twice: keep the runner (and its compile)
                pipe.stream = GraphedStage1Stream.from_stream(pipe.stream)
                done[name] = "WorldPipeline.stream -> GraphedStage1Stream"
        elif name == "stage1-compile":
            from engine.fast.stage1_compile import use_compiled_blocks

            done[name] = use_compiled_blocks(pipe)
        elif name == "stage1-tf32-scans":
            from engine.fast.scans import tf32_scan_ops

            pipe.world.stage1.scan_ops = tf32_scan_ops()
            done[name] = "Stage1Transformer.scan_ops -> TF32 scans"
        elif name == "stage1-triton-scans":
            from engine.fast.scans import triton_scan_ops

            pipe.world.stage1.scan_ops = triton_scan_ops()
            done[name] = "Stage1Transformer.scan_ops -> Triton scans (kernels/gdn_triton.py)"
        elif name == "stage1-block-phases":
            from engine.fast.scans import triton_scan_ops

            pipe.world.stage1.scan_ops = triton_scan_ops(block="phases")
            done[name] = ("Stage1Transformer.scan_ops -> Triton scans, a GDN block's combined in three launches "
                          "(kernels/gdn_triton.py gdn_block_phases_triton)")
        elif name == "stage1-ffn":
            from engine.fast.stage1_ffn import fused_ffn_op, set_ffn_ops

            done[name] = set_ffn_ops(pipe, fused_ffn_op())
        elif name == "stage1-rope":
            from engine.fast.stage1_rope import use_triton_rope

            use_triton_rope()
            done[name] = "engine.stage1.{geometry,attention}.apply_rope -> kernels.rope.rope_pairs_triton (process)"
        elif name == "stage1-real-rope":
            from engine.fast.stage1_rope import use_real_rope

            use_real_rope()
            done[name] = ("engine.stage1.{geometry,attention}.apply_rope -> real arithmetic inside torch.compile "
                          "(kernels.rope.rope_pairs_real; process)")
        elif name == "stage1-fused-proj":
            from engine.fast.stage1_gemms import use_fused_in_projections

            done[name] = use_fused_in_projections(pipe)
        elif name == "stage1-tconv":
            from engine.fast.stage1_gemms import use_tap_major_tconv

            done[name] = use_tap_major_tconv(pipe)
        elif name == "stage1-lean-pass":
            pipe.stream.lean_pass = True
            done[name] = ("Stage1Stream.lean_pass -> the cache-write pass's last block computes only what its caches "
                          "keep; no final layer")
        elif name == "stage1-prompt-trim":
            pipe.stream.prompt_trim = PROMPT_TRIM
            done[name] = (f"Stage1Stream.prompt_trim -> the prompt's K/V cut to a multiple of {PROMPT_TRIM} positions "
                          "past its last token (from the next prompt)")
        elif name == "refiner-graph":
            from engine.fast.refiner_graph import GraphedRefinerModel

            if pipe.refiner is not None and not isinstance(pipe.refiner.model, GraphedRefinerModel):
                pipe.refiner.model = GraphedRefinerModel(pipe.refiner.model)
                done[name] = "ARRefiner.model -> GraphedRefinerModel"
        elif name == "refiner-compile":
            from engine.fast.refiner_compile import use_compiled_refiner_blocks

            if (what := use_compiled_refiner_blocks(pipe)) is not None:
                done[name] = what
        elif name == "refiner-rope":
            from engine.fast.refiner_rope import use_triton_rope

            use_triton_rope()
            done[name] = "engine.refiner.{model,ar}.apply_rope -> kernels.rope.rope_split (process-wide)"
        elif name == "refiner-gelu":
            from engine.fast.refiner_gelu import use_fused_gelu

            if pipe.refiner is not None:
                model = getattr(pipe.refiner.model, "model", pipe.refiner.model)  # under a GraphedRefinerModel
                done[name] = f"{use_fused_gelu(model)} refiner FFN up-projections -> FusedGELUProj (world-wide, once)"
                graphs = pipe.refiner.model
                if getattr(graphs, "graphs", None):  # captured with the plain GELU: capture again (first sight first)
                    graphs.drop_graphs()
        elif name == "lean-memory":
            from engine.fast.lean_memory import use_lean_memory

            done[name] = use_lean_memory(pipe)
        elif name == "frames":
            from engine.fast.frames import use_fast_frames

            use_fast_frames()
            done[name] = "engine.world.pixels_to_frames -> one-pass Triton conversion (process-wide)"
        elif name == "refiner-fp8":
            from engine.fast.refiner_fp8 import use_fp8_linears

            if pipe.refiner is not None:
                model = getattr(pipe.refiner.model, "model", pipe.refiner.model)  # under a GraphedRefinerModel
                done[name] = f"{use_fp8_linears(model)} refiner block linears -> Fp8Linear (world-wide, once)"
        elif name == "refiner-fp8-attn":
            if pipe.refiner is not None:  # from the next start on (the window is made there)
                pipe.refiner.fp8_attention = True
                done[name] = ("ARRefiner.fp8_attention -> K/V window with an e4m3 copy of sink + history (once a "
                              "block), self-attention in fp8 (kernels/fp8_attention.py)")
        elif name == "vae-fast":
            from engine.fast.vae_fast import use_all

            done[name] = "; ".join(f"{k}: {v}" for k, v in use_all(pipe.world.vae).items())
        elif name == "chunk-async":
            import torch

            if pipe.pass_stream is None:
                pipe.pass_stream = torch.cuda.Stream(pipe.world.device)
            done[name] = ("WorldPipeline.run_chunk -> no host sync but the frames' copy; the cache-write pass on its "
                          "own stream from the end of the decode; stage times from CUDA events")
        elif name == "cache-overlap":
            import torch

            if pipe.cache_stream is None:
                # a lower number is a higher priority; 0 is the default (and lowest) one
                pipe.cache_stream = torch.cuda.Stream(pipe.world.device, priority=0)
                pipe.main_stream = torch.cuda.Stream(pipe.world.device, priority=-1)
            done[name] = ("WorldPipeline.cache_stream -> a low-priority CUDA stream for the stage-1 cache-write pass, "
                          "beside the chunk's work on a high-priority one")
        elif name == "vae-pad":
            from engine.fast.vae_pad import use_fast_reflect_pad

            done[name] = f"{use_fast_reflect_pad(pipe.world.vae)} decoder convs -> reflect_pad_hw1"
    return done


COMPILED = ("stage1-compile", "refiner-compile")


def warm_compiled(world, qualities=("preview", "full"), chunks: int = 6, names=None) -> list[str]:
    """Compile the `torch.compile` fast paths among `names` (default `world.fast`) ahead of the first session: a
    throwaway session of `chunks` chunks per quality (random first image, scripted keys) runs each steady-state kind
    once. The compiled code is process-wide, so later sessions only capture their CUDA graphs. Returns the qualities
    warmed."""
    names = tuple(expand(world.fast if names is None else names))
    if not any(name in COMPILED for name in names):
        return []
    from engine.bench import first_image, scripted_controls
    from engine.rollout import Rollout
    from engine.world import WorldPipeline

    done = []
    for quality in qualities:
        if quality == "full" and world.refiner is None:
            continue
        pipe = WorldPipeline(world)  # switches on world.fast
        if names != tuple(expand(world.fast)):
            apply_fast_paths(pipe, names)
        pipe.start(first_image(world.preset, 0), "warm-up", quality)
        ro = Rollout(pipe, scripted_controls(chunks), intrinsics_px=world.preset.default_intrinsics, quality=quality)
        for _ in ro.chunks(chunks):
            pass
        ro.finish_chunk()  # the last chunk's deferred cache pass too: its kind must not compile in a live session
        done.append(quality)
    return done
