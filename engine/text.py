"""Prompt text -> conditioning tensors for stage-1 (Gemma-2) and the refiner (Gemma-3), via transformers.

Spec: `refiner_vae.md` §1 (stage-1 prompt path) and §3 (refiner text path). Two encoders:

- `Stage1PromptEncoder`: instruction ("chi") prefix + prompt, right padding, the final hidden state after the
  model's final norm, then BOS + the last `max_length - 1` positions -> embeds `[1, 1, N, C]`, mask `[1, N]`.
- `RefinerPromptEncoder`: stripped prompt, left padding to `max_length`, all `num_layers + 1` hidden states stacked
  and normalised per layer (masked mean/range) -> the connectors' input `[1, L, C * (num_layers + 1)]` + mask
  `[1, L]`; the connectors (`engine/refiner/connectors.py`, passed in, not built here) turn it into `[1, L, C]`.

Both cache their output per prompt text in a small LRU (`PromptCache`): a prompt is encoded once per session and
a prompt change recomputes. Cached tensors are shared: treat them as read-only.

This module knows nothing of the DiTs that consume these tensors, of weights layouts beyond "a local directory
in the transformers layout", or of the connectors' internals. `build_tiny_text_stack` builds a seeded, offline
tokenizer + tiny Gemma-2 + tiny Gemma-3 for the `tiny` preset and the tests.
"""

from __future__ import annotations

import string
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import torch
from torch import nn

from engine.errors import InputError

# The prompt-enhancer instruction stage-1 was trained with (spec §1); the user prompt is appended directly after
# the trailing space of the last line.
CHI_PROMPT = "\n".join(
    [
        'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for '
        "image generation. Evaluate the level of detail in the user prompt:",
        "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
        "relationships to create vivid and concrete scenes.",
        "- If the prompt is already detailed, refine and enhance the existing details slightly without "
        "overcomplicating.",
        "Here are examples of how to transform or refine prompts:",
        "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
        "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
        "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing "
        "street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering "
        "glass skyscrapers.",
        "Please generate only the enhanced description for the prompt below and avoid including any additional "
        "commentary or evaluations:",
        "User Prompt: ",
    ]
)

STAGE1_MODEL_TYPES = ("gemma2",)
REFINER_MODEL_TYPES = ("gemma3", "gemma3_text")  # gemma3 = Gemma3ForConditionalGeneration (vision tower unused)


class PromptEmbeds(NamedTuple):
    embeds: torch.Tensor  # stage-1 [1, 1, N, C]; refiner [1, L, C] (or the connectors' input [1, L, C * layers])
    mask: torch.Tensor  # [1, N] / [1, L] int64, 1 = token


@dataclass(frozen=True)
class Stage1TextConfig:
    max_length: int = 300  # stage-1 `model_max_length`: BOS + the last max_length - 1 positions are kept
    chi_prompt: str = CHI_PROMPT  # "" disables both the prefix and the BOS + last-N selection


@dataclass(frozen=True)
class RefinerTextConfig:
    max_length: int = 1024  # left-padded token count the connectors see
    norm_scale: float = 8.0  # x_hat = scale * (x - mean) / (max - min + eps), per layer
    norm_eps: float = 1e-6


T = TypeVar("T")


class PromptCache:
    """Bounded LRU: key (prompt text) -> computed conditioning. Memory stays at `capacity` entries.

    `get(key, compute)` returns the stored value on a hit (the same object) and calls `compute()` once on a miss;
    the least recently used entry is dropped when full.
    """

    def __init__(self, capacity: int = 4):
        if capacity < 1:
            raise InputError(f"prompt cache capacity {capacity!r} is not accepted; use an integer >= 1")
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable, compute: Callable[[], T]) -> T:
        if key in self._entries:
            self.hits += 1
            self._entries.move_to_end(key)
            return self._entries[key]
        self.misses += 1
        value = compute()
        self._entries[key] = value
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)


# ---------------------------------------------------------------------------------------------------------------
# Loading from a local transformers-layout directory
# ---------------------------------------------------------------------------------------------------------------

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _require_dir(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise InputError(
            f"{what} directory {str(p)!r} does not exist; expected a local directory in the transformers layout "
            f"(as written by save_pretrained)"
        )
    return p


def load_tokenizer(tokenizer_dir: str | Path):
    """A tokenizer from a local directory (tokenizer.json / tokenizer_config.json / tokenizer.model)."""
    from transformers import AutoTokenizer

    p = _require_dir(tokenizer_dir, "tokenizer")
    if not any((p / f).is_file() for f in _TOKENIZER_FILES):
        raise InputError(f"tokenizer directory {str(p)!r} holds none of {list(_TOKENIZER_FILES)}")
    try:
        return AutoTokenizer.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load a tokenizer from {str(p)!r}: {e}") from e


def _tokenizer_dir_for(model_dir: Path) -> Path:
    """The model dir itself if it holds tokenizer files, else the diffusers sibling `../tokenizer`."""
    if any((model_dir / f).is_file() for f in _TOKENIZER_FILES):
        return model_dir
    sibling = model_dir.parent / "tokenizer"
    if sibling.is_dir():
        return sibling
    raise InputError(
        f"no tokenizer next to text encoder {str(model_dir)!r}: expected one of {list(_TOKENIZER_FILES)} in it "
        f"or a sibling directory {str(sibling)!r}; or pass tokenizer_dir"
    )


def load_text_model(
    model_dir: str | Path,
    accepted_types: tuple[str, ...],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """The decoder stack of a Gemma checkpoint (`Gemma2Model` / `Gemma3TextModel`), eval mode, on `device`.

    Checkpoints of the causal-LM classes load too (their `lm_head` is unused). A multimodal `gemma3` checkpoint
    (`Gemma3ForConditionalGeneration`) is loaded whole and its language model kept; text-only input runs the
    same embeddings and layers there.
    """
    import transformers

    p = _require_dir(model_dir, "text encoder")
    if not (p / "config.json").is_file():
        raise InputError(f"text encoder directory {str(p)!r} has no config.json")
    try:
        config = transformers.AutoConfig.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read the config in {str(p)!r}: {e}") from e
    if config.model_type not in accepted_types:
        raise InputError(f"text encoder in {str(p)!r} has model_type {config.model_type!r}; accepted: {accepted_types}")
    cls = {
        "gemma2": transformers.Gemma2Model,
        "gemma3_text": transformers.Gemma3TextModel,
        "gemma3": transformers.Gemma3ForConditionalGeneration,
    }[config.model_type]
    try:
        model = cls.from_pretrained(p, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load {cls.__name__} weights from {str(p)!r}: {e}") from e
    if config.model_type == "gemma3":
        model = model.model.language_model
    return model.to(device).eval()


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------------------------------------------------
# Stage-1: Gemma-2 prompt path (spec §1)
# ---------------------------------------------------------------------------------------------------------------


class Stage1PromptEncoder:
    """Prompt -> stage-1 text conditioning: embeds `[1, 1, N, C]`, mask `[1, N]`, N = `config.max_length`."""

    def __init__(self, tokenizer, model: nn.Module, config: Stage1TextConfig = Stage1TextConfig(), cache_capacity=4):
        if config.max_length < 2:
            raise InputError(f"stage-1 text max_length {config.max_length!r} is not accepted; use an integer >= 2")
        self.tokenizer = tokenizer
        self.model = model
        self.config = config
        self.cache = PromptCache(cache_capacity)
        # chi tokens including BOS; the selection starts at the last of them
        self.chi_len = len(tokenizer.encode(config.chi_prompt)) if config.chi_prompt else 0

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        tokenizer_dir: str | Path | None = None,
        *,
        config: Stage1TextConfig = Stage1TextConfig(),
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        cache_capacity: int = 4,
    ) -> Stage1PromptEncoder:
        model = load_text_model(model_dir, STAGE1_MODEL_TYPES, dtype=dtype, device=device)
        tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else _tokenizer_dir_for(Path(model_dir))
        return cls(load_tokenizer(tok_dir), model, config, cache_capacity)

    def tokenize(self, prompt: str, *, with_chi: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[int] | None]:
        """ids `[1, S]`, mask `[1, S]` right-padded to S, and the positions kept (None: keep all S = N).

        With the chi prefix S = chi_len + N - 2 and the kept positions are `[0] + [S-N+1, ..., S-1]`: BOS plus the
        last N - 1 positions, which start at the last chi token.
        """
        n = self.config.max_length
        use_chi = with_chi and bool(self.config.chi_prompt)
        text = self.config.chi_prompt + prompt if use_chi else prompt
        length = self.chi_len + n - 2 if use_chi else n
        tok = self.tokenizer(
            [text],
            max_length=length,
            padding="max_length",
            padding_side="right",  # stage-1 was trained right-padded; Gemma's saved tokenizer defaults to left
            truncation=True,
            return_tensors="pt",
        )
        select = [0] + list(range(length - n + 1, length)) if use_chi else None
        return tok.input_ids, tok.attention_mask, select

    @torch.no_grad()
    def _run(self, prompt: str, with_chi: bool) -> PromptEmbeds:
        ids, mask, select = self.tokenize(prompt, with_chi=with_chi)
        device = _device_of(self.model)
        ids, mask = ids.to(device), mask.to(device)
        # last_hidden_state = hidden_states[-1] = output of the final norm
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [1, S, C]
        if select is not None:
            index = torch.tensor(select, device=device)
            hidden, mask = hidden[:, index], mask[:, index]
        return PromptEmbeds(hidden[:, None], mask)  # [1, 1, N, C], [1, N]

    def compute(self, prompt: str) -> PromptEmbeds:
        """Uncached conditional embedding of `prompt` (chi prefix + selection)."""
        return self._run(prompt, with_chi=True)

    def encode(self, prompt: str) -> PromptEmbeds:
        """Cached `compute(prompt)`."""
        return self.cache.get(("cond", prompt), lambda: self.compute(prompt))

    def negative(self, text: str = "") -> PromptEmbeds:
        """Cached CFG negative: `text` tokenized to N without chi or selection ("" -> [BOS, pad x N-1])."""
        return self.cache.get(("neg", text), lambda: self._run(text, with_chi=False))


# ---------------------------------------------------------------------------------------------------------------
# Refiner: Gemma-3 path (spec §3), producing the connectors' input
# ---------------------------------------------------------------------------------------------------------------


def pack_hidden_states(
    hidden_states: torch.Tensor, mask: torch.Tensor, scale: float = 8.0, eps: float = 1e-6
) -> torch.Tensor:
    """Per-layer masked mean/range normalisation of stacked hidden states, flattened for `text_proj_in`.

    hidden_states `[B, L, C, K]` (K = layers + 1, stacked on the last axis), mask `[B, L]` (1 = token) ->
    `[B, L, C * K]` with index `c * K + k`; per batch element and layer, over valid tokens and all C channels:
    `scale * (x - mean) / (max - min + eps)` with `mean = sum / (n_valid * C + eps)`; padded positions are 0.
    Computed in fp32, returned in the input dtype.
    """
    b, l, c, k = hidden_states.shape
    x = hidden_states.float()
    valid = mask.bool()[:, :, None, None]  # [B, L, 1, 1]
    n_valid = mask.sum(dim=1).float() * c  # [B]
    mean = x.masked_fill(~valid, 0.0).sum(dim=(1, 2), keepdim=True) / (n_valid.view(b, 1, 1, 1) + eps)
    lo = x.masked_fill(~valid, float("inf")).amin(dim=(1, 2), keepdim=True)  # [B, 1, 1, K]
    hi = x.masked_fill(~valid, float("-inf")).amax(dim=(1, 2), keepdim=True)
    normed = scale * (x - mean) / (hi - lo + eps)
    normed = normed.masked_fill(~valid, 0.0)
    return normed.flatten(2).to(hidden_states.dtype)


# The connectors' contract (engine/refiner/connectors.py):
#   connectors(packed [B, L, C * K], mask [B, L]) -> (embeds [B, L, C], mask [B, L])
Connectors = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class RefinerPromptEncoder:
    """Prompt -> refiner text conditioning: the connectors' output `[1, L, C]` + mask `[1, L]`.

    Without `connectors` (not loaded yet, or tests up to the connectors) `encode` returns the connectors' input
    `[1, L, C * K]` + mask instead; the refiner always passes its `LTX2TextConnectors`.
    """

    def __init__(
        self,
        tokenizer,
        model: nn.Module,
        connectors: Connectors | None = None,
        config: RefinerTextConfig = RefinerTextConfig(),
        cache_capacity: int = 4,
    ):
        if config.max_length < 1:
            raise InputError(f"refiner text max_length {config.max_length!r} is not accepted; use an integer >= 1")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.model = model
        self.connectors = connectors
        self.config = config
        self.cache = PromptCache(cache_capacity)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        tokenizer_dir: str | Path | None = None,
        *,
        connectors: Connectors | None = None,
        config: RefinerTextConfig = RefinerTextConfig(),
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        cache_capacity: int = 4,
    ) -> RefinerPromptEncoder:
        model = load_text_model(model_dir, REFINER_MODEL_TYPES, dtype=dtype, device=device)
        tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else _tokenizer_dir_for(Path(model_dir))
        return cls(load_tokenizer(tok_dir), model, connectors, config, cache_capacity)

    def tokenize(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """ids `[1, L]`, mask `[1, L]` of the stripped prompt, BOS on, left-padded/truncated to L = max_length."""
        tok = self.tokenizer(
            [prompt.strip()],
            max_length=self.config.max_length,
            padding="max_length",
            padding_side="left",
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return tok.input_ids, tok.attention_mask

    @torch.no_grad()
    def hidden_stack(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Uncached raw hidden states `[1, L, C, K]` (K = layers + 1) + mask `[1, L]`."""
        ids, mask = self.tokenize(prompt)
        device = _device_of(self.model)
        ids, mask = ids.to(device), mask.to(device)
        out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        # hidden_states: [0] scaled token embeddings, [1..K-2] layer outputs, [K-1] final-norm output
        return torch.stack(out.hidden_states, dim=-1), mask

    @torch.no_grad()
    def connector_input(self, prompt: str) -> PromptEmbeds:
        """Uncached packed, normalised hidden states `[1, L, C * K]` + mask `[1, L]` (what the connectors read)."""
        stacked, mask = self.hidden_stack(prompt)
        cfg = self.config
        return PromptEmbeds(pack_hidden_states(stacked, mask, cfg.norm_scale, cfg.norm_eps), mask)

    @torch.no_grad()
    def compute(self, prompt: str) -> PromptEmbeds:
        """Uncached: the connectors' output for `prompt` (their input when no connectors are attached).

        The masked per-layer normalisation runs once: inside the connectors when they are attached (they
        normalise their input themselves, as diffusers' `LTX2TextConnectors` does), here otherwise."""
        if self.connectors is None:
            return self.connector_input(prompt)
        stacked, mask = self.hidden_stack(prompt)
        embeds, mask = self.connectors(stacked, mask)
        return PromptEmbeds(embeds, mask)

    def encode(self, prompt: str) -> PromptEmbeds:
        """Cached `compute(prompt)`."""
        return self.cache.get(prompt, lambda: self.compute(prompt))


# ---------------------------------------------------------------------------------------------------------------
# Tiny offline stack for the `tiny` preset and the tests
# ---------------------------------------------------------------------------------------------------------------

TINY_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")  # ids 0..3, as in Gemma's vocabulary


def build_tiny_tokenizer(extra_text: str = CHI_PROMPT):
    """A small deterministic WordPiece tokenizer built offline (no training, no files).

    Vocabulary: the 4 Gemma-style special tokens, every printable ASCII character alone and as a `##` suffix
    piece, and every word of `extra_text`; any ASCII word tokenizes (unknown words fall back to characters), so
    different prompts give different ids. Adds BOS, pads with `<pad>`, default padding side left (as Gemma's).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.BertPreTokenizer()
    chars = [ch for ch in string.printable if not ch.isspace()]
    words = sorted({w for w, _ in pre.pre_tokenize_str(extra_text)})
    vocab: dict[str, int] = {}
    for token in [*TINY_SPECIAL_TOKENS, *chars, *("##" + ch for ch in chars), *words]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents()])
    tok.pre_tokenizer = pre
    bos = TINY_SPECIAL_TOKENS.index("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)]
    )
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def _tiny_gemma_config(vocab_size: int, hidden_size: int, num_layers: int, heads: int, head_dim: int) -> dict:
    """Config fields the tiny Gemma-2 and Gemma-3 share (special-token ids as in `TINY_SPECIAL_TOKENS`)."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=1,
        head_dim=head_dim,
        max_position_embeddings=2048,
        initializer_range=0.2,  # larger than release init so hidden states differ visibly between prompts
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )


def tiny_gemma2(vocab_size: int, *, hidden_size=64, num_layers=2, heads=2, head_dim=32, seed=0) -> nn.Module:
    """Seeded random `Gemma2Model` (fp32, CPU)."""
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(**_tiny_gemma_config(vocab_size, hidden_size, num_layers, heads, head_dim),
                          sliding_window=64)
    return _seeded(seed, lambda: Gemma2Model(config))


def tiny_gemma3(vocab_size: int, *, hidden_size=64, num_layers=2, heads=2, head_dim=32, seed=0) -> nn.Module:
    """Seeded random `Gemma3TextModel` (fp32, CPU); it yields `num_layers + 1` hidden states."""
    from transformers import Gemma3TextConfig, Gemma3TextModel

    config = Gemma3TextConfig(**_tiny_gemma_config(vocab_size, hidden_size, num_layers, heads, head_dim),
                              sliding_window=16)
    return _seeded(seed, lambda: Gemma3TextModel(config))


@dataclass
class TextStack:
    stage1: Stage1PromptEncoder
    refiner: RefinerPromptEncoder | None = None  # None when running without the refiner


def build_tiny_text_stack(
    seed: int = 0,
    *,
    stage1_dim: int = 64,  # = stage-1 caption_channels
    stage1_max_length: int = 16,  # = stage-1 model_max_length
    refiner_dim: int = 64,  # = connectors caption_channels
    refiner_layers: int = 2,  # connectors text_proj_in_factor = refiner_layers + 1
    refiner_max_length: int = 32,
    connectors: Connectors | None = None,
    cache_capacity: int = 4,
) -> TextStack:
    """Tokenizer + tiny Gemma-2 + tiny Gemma-3, seeded and offline; encodes a prompt in milliseconds on CPU."""
    tokenizer = build_tiny_tokenizer()
    vocab = len(tokenizer)
    stage1 = Stage1PromptEncoder(
        tokenizer,
        tiny_gemma2(vocab, hidden_size=stage1_dim, head_dim=stage1_dim // 2, seed=seed),
        Stage1TextConfig(max_length=stage1_max_length),
        cache_capacity,
    )
    refiner = RefinerPromptEncoder(
        build_tiny_tokenizer(),  # its own object: the refiner may set pad_token on it
        tiny_gemma3(
            vocab, hidden_size=refiner_dim, num_layers=refiner_layers, head_dim=refiner_dim // 2, seed=seed + 1
        ),
        connectors,
        RefinerTextConfig(max_length=refiner_max_length),
        cache_capacity,
    )
    return TextStack(stage1, refiner)
