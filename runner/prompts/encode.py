"""Weighted, chunked CLIP prompt embeddings, as the web UIs compute them.

A prompt is cut into chunks of 75 tokens (a chunk that would split a phrase backs up to the last comma within
its last 20 tokens; BREAK starts a new chunk), each chunk is encoded on its own as BOS + 75 tokens + EOS/padding
(77, what CLIP was trained on) and the chunks are concatenated along the sequence, so no word is dropped.
Per-token weights then scale the embeddings:

- `a1111`: multiply each token's embedding by its weight, then restore the chunk's original mean (A1111's
  "Original" emphasis);
- `comfy`: move each weighted token away from the empty prompt's embedding at that position, by its weight
  (ComfyUI's and compel's interpolation);
- `none`: the prompt is encoded as written (its brackets are text), chunked all the same.

The padding follows diffusers' tokenizers (BOS, tokens, EOS, then the tokenizer's pad token), so a plain prompt
of one chunk is exactly what diffusers' own encode_prompt gives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from runner.prompts.syntax import CHUNK, Segment, parse_weights

COMMA_BACKTRACK = 20  # a chunk ends after the last comma of its last 20 tokens rather than inside a phrase
MODES = ("a1111", "comfy", "none")


@dataclass
class Chunks:
    """A prompt as chunks of 77 token ids with a weight per token (1.0 for BOS, EOS and padding)."""

    ids: list[list[int]]
    weights: list[list[float]]


def segments_for(text: str, mode: str) -> list[Segment]:
    return [Segment(text, 1.0)] if mode == "none" else parse_weights(text)


def chunk(tokenizer: Any, segments: Sequence[Segment]) -> Chunks:
    """A1111's chunking of a parsed prompt for one CLIP tokenizer."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    out = Chunks([], [])
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal ids, weights, last_comma
        fill = CHUNK - len(ids)
        out.ids.append([bos, *ids, eos] + [pad] * fill)
        out.weights.append([1.0, *weights, 1.0] + [1.0] * fill)
        ids, weights, last_comma = [], [], -1

    for segment in segments:
        if segment.is_break:
            close()
            continue
        for token in tokenizer(segment.text, add_special_tokens=False).input_ids:
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == CHUNK and last_comma != -1 and len(ids) - last_comma <= COMMA_BACKTRACK:
                moved_ids, moved_weights = ids[last_comma + 1 :], weights[last_comma + 1 :]
                ids, weights = ids[: last_comma + 1], weights[: last_comma + 1]
                close()
                ids, weights = moved_ids, moved_weights
            if len(ids) == CHUNK:
                close()
            ids.append(token)
            weights.append(segment.weight)
    if ids or not out.ids:
        close()
    return out


def weighted(z: torch.Tensor, weights: torch.Tensor, mode: str, empty: torch.Tensor | None) -> torch.Tensor:
    """One chunk's embeddings [1, 77, d] with its token weights [77] applied in `mode`."""
    if mode == "none" or bool((weights == 1).all()):
        return z
    w = weights.to(z.device, torch.float32).view(1, -1, 1)
    if mode == "comfy":
        base = empty.float()
        return ((z.float() - base) * w + base).to(z.dtype)
    original = z.float().mean()
    scaled = z.float() * w
    return (scaled * (original / scaled.mean())).to(z.dtype)


def clip_hidden(encoder: Any, ids: list[int], layer: int | None, final_norm: bool, device: torch.device) -> tuple[torch.Tensor, Any]:
    """(hidden states [1, 77, d] of one chunk, the encoder's output): the last layer, or `layer` counted from the end."""
    output = encoder(torch.tensor([ids], device=device), output_hidden_states=True)
    if layer is None:
        return output.last_hidden_state if final_norm else output.hidden_states[-1], output
    hidden = output.hidden_states[layer]
    return (encoder.final_layer_norm(hidden) if final_norm else hidden), output


@dataclass(frozen=True)
class Stack:
    """One CLIP text encoder of a pipeline and how its hidden states are taken (diffusers' encode_prompt)."""

    tokenizer: Any
    encoder: Any
    layer: int | None  # hidden_states index (None: the last layer, normed)
    final_norm: bool  # SD 1.x/2.x norm the chosen layer; SDXL takes the penultimate layer as it is
    pooled: bool = False  # SDXL's second encoder also gives the pooled embedding


def encode(stacks: Sequence[Stack], text: str, mode: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(embeddings [1, 77 * chunks, sum of widths], pooled embedding of the first chunk or None, chunks)."""
    segments = segments_for(text, mode)
    per_stack, pooled = [], None
    chunk_counts = []
    for stack in stacks:
        chunks = chunk(stack.tokenizer, segments)
        chunk_counts.append(len(chunks.ids))
        empty = None
        if mode == "comfy":
            blank = chunk(stack.tokenizer, [Segment("", 1.0)]).ids[0]
            empty, _ = clip_hidden(stack.encoder, blank, stack.layer, stack.final_norm, device)
        parts = []
        for index, (ids, weights) in enumerate(zip(chunks.ids, chunks.weights)):
            z, output = clip_hidden(stack.encoder, ids, stack.layer, stack.final_norm, device)
            parts.append(weighted(z, torch.tensor(weights), mode, empty))
            if stack.pooled and index == 0:
                pooled = output.text_embeds if hasattr(output, "text_embeds") else output[0]
        per_stack.append(torch.cat(parts, dim=1))
    if len(set(chunk_counts)) != 1:  # the tokenizers agree on the words; differing counts would misalign the encoders
        raise ValueError(f"the text encoders cut the prompt into different numbers of chunks ({chunk_counts})")
    return torch.cat(per_stack, dim=-1), pooled, chunk_counts[0]


def empty_chunk(stacks: Sequence[Stack], device: torch.device) -> torch.Tensor:
    """The embeddings of one chunk of the empty prompt: what the shorter of positive and negative is padded with."""
    embeddings, _, _ = encode(stacks, "", "none", device)
    return embeddings


def pad_to(embeddings: torch.Tensor, chunks: int, empty: torch.Tensor) -> torch.Tensor:
    """Embeddings of fewer chunks padded with empty chunks (A1111 pads the shorter of prompt and negative this way)."""
    have = embeddings.shape[1] // empty.shape[1]
    return embeddings if have >= chunks else torch.cat([embeddings, empty.repeat(1, chunks - have, 1)], dim=1)


def t5_weighted(
    tokenizer: Any, encoder: Any, text: str, mode: str, max_length: int, device: torch.device, masked: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(T5 embeddings [1, max_length, d], attention mask [1, max_length]) of a weighted prompt: each run of text
    tokenized on its own (as ComfyUI does), EOS, padding to max_length (as diffusers pads T5 prompts), the weights
    applied in `mode`. `masked`: the encoder reads the tokenizer's mask (Chroma), and the mask returned keeps the
    first padding token too, as Chroma's pipeline does. T5 reads no chunks: BREAK only separates runs; words past
    max_length are dropped (the plan says which)."""
    ids: list[int] = []
    weights: list[float] = []
    for segment in segments_for(text, mode):
        if segment.is_break:
            continue
        piece = tokenizer(segment.text, add_special_tokens=False).input_ids
        ids += piece
        weights += [segment.weight] * len(piece)
    ids, weights = ids[: max_length - 1], weights[: max_length - 1]

    def run(tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        row = [*tokens, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * (max_length - 1 - len(tokens))
        seen = torch.tensor([[1] * (len(tokens) + 1) + [0] * (max_length - 1 - len(tokens))], device=device)
        z = encoder(torch.tensor([row], device=device), output_hidden_states=False, attention_mask=seen if masked else None)[0]
        keep = (torch.arange(max_length, device=device) <= len(tokens) + 1).unsqueeze(0) if masked else seen.bool()
        return z, keep

    z, mask = run(ids)
    empty = run([])[0] if mode == "comfy" else None
    return weighted(z, torch.tensor([*weights] + [1.0] * (max_length - len(weights))), mode, empty), mask


def clip_first_chunk(stack: Stack, text: str, mode: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted hidden states [1, 77, d], pooled embedding) of a prompt's first CLIP chunk: SD3 and Flux read 77."""
    chunks = chunk(stack.tokenizer, segments_for(text, mode))
    z, output = clip_hidden(stack.encoder, chunks.ids[0], stack.layer, stack.final_norm, device)
    empty = None
    if mode == "comfy":
        empty, _ = clip_hidden(stack.encoder, chunk(stack.tokenizer, [Segment("", 1.0)]).ids[0], stack.layer, stack.final_norm, device)
    pooled = output.text_embeds if hasattr(output, "text_embeds") else output.pooler_output
    return weighted(z, torch.tensor(chunks.weights[0]), mode, empty), pooled
