"""Pack scoring work into dense [rows, tokens] batches with an attention mask per segment.

A segment is a shared context followed by branches (the answer choices of one question, or
nothing for a perplexity window). Each branch attends to the context and to itself only, and
its positions continue from the end of the context, so one pass scores all the choices of a
question with the context computed once; several segments share a row, so no compute goes to
padding. The log-probabilities equal those of running context+branch alone (the same tokens
and positions see the same keys), which tests check against plain transformers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Segment:
    context: list[int]
    branches: list[list[int]] = field(default_factory=list)
    score_context_from: int | None = None  # score context tokens at positions >= this (perplexity)

    def __len__(self) -> int:
        return len(self.context) + sum(len(b) for b in self.branches)


@dataclass
class Batch:
    input_ids: torch.Tensor      # [rows, T]
    position_ids: torch.Tensor   # [rows, T]
    mask: torch.Tensor           # [rows, 1, T, T] bool, True = may attend
    # One entry per scored token: the hidden state at (row, col) predicts `target`,
    # and its log-probability is added to (segment, branch); branch -1 is the context.
    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor
    segment: torch.Tensor
    branch: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


def pack(segments: list[Segment], *, row_tokens: int, batch_tokens: int, pad_id: int = 0) -> list[Batch]:
    """Batches covering every segment: rows of up to `row_tokens` tokens (a longer segment gets
    a row of its own), as many rows per batch as fit in `batch_tokens` (at least one)."""
    for i, s in enumerate(segments):
        if not s.context:
            raise ValueError(f"segment {i} has an empty context: nothing to predict the first token from")
        if any(len(b) == 0 for b in s.branches):
            raise ValueError(f"segment {i} has an empty choice")
    # First-fit decreasing: long segments first, each into the first row with room.
    order = sorted(range(len(segments)), key=lambda i: -len(segments[i]))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(segments[i])
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max(row_tokens - n, 0))
    lengths = [sum(len(segments[i]) for i in row) for row in rows]
    batches, start = [], 0
    while start < len(rows):
        # Rows holding one over-long segment come first; every other row is at most row_tokens.
        per_batch = max(1, batch_tokens // max(lengths[start], row_tokens))
        batches.append(_build(segments, rows[start:start + per_batch], pad_id))
        start += per_batch
    return batches


def _build(segments: list[Segment], rows: list[list[int]], pad_id: int) -> Batch:
    lengths = [sum(len(segments[i]) for i in row) for row in rows]
    T = max(lengths)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), T), dtype=torch.long)
    # seg_of: which segment a token belongs to (padding gets a unique negative id so it sees
    # only itself); br_of: 0 for context, k+1 for branch k.
    seg_of = -1 - torch.arange(T).repeat(len(rows), 1)
    br_of = torch.zeros((len(rows), T), dtype=torch.long)
    score: list[tuple[int, int, int, int, int]] = []
    for r, row in enumerate(rows):
        col = 0
        for s_index in row:
            s = segments[s_index]
            c = len(s.context)
            ids[r, col:col + c] = torch.tensor(s.context)
            pos[r, col:col + c] = torch.arange(c)
            seg_of[r, col:col + c] = s_index
            if s.score_context_from is not None:
                for t in range(max(1, s.score_context_from), c):
                    score.append((r, col + t - 1, s.context[t], s_index, -1))
            last_context_col = col + c - 1
            col += c
            for k, branch in enumerate(s.branches):
                n = len(branch)
                ids[r, col:col + n] = torch.tensor(branch)
                pos[r, col:col + n] = torch.arange(c, c + n)
                seg_of[r, col:col + n] = s_index
                br_of[r, col:col + n] = k + 1
                for t, token in enumerate(branch):
                    score.append((r, last_context_col if t == 0 else col + t - 1, token, s_index, k))
                col += n
    q_seg, k_seg = seg_of[:, :, None], seg_of[:, None, :]
    q_br, k_br = br_of[:, :, None], br_of[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = (q_seg == k_seg) & causal & ((k_br == 0) | (k_br == q_br))
    cols = torch.tensor(score, dtype=torch.long).reshape(-1, 5)
    return Batch(ids, pos, mask[:, None], cols[:, 0], cols[:, 1], cols[:, 2], cols[:, 3], cols[:, 4])
