"""Packing templated examples into fixed rows of `seq_len` tokens.

A row holds whole examples one after another. Each sequence gets its own segment id (1, 2, ...;
0 is padding) and positions from 0, so attention never crosses sequences. With a shared prefix,
the tokens common to all candidates of an example (in a POLAR triple `P+SEP+R+<|reward|>+P+SEP`,
in a CodePMP pair the prompt) are packed once as a segment of their own; each candidate's tokens
then carry `prefix_ids` = that segment, attend to it and to themselves, and continue its positions.
The model then computes exactly what it would on the full sequences, with fewer tokens.

Row fields (numpy, one row):
    tokens, segment_ids, positions, prefix_ids         [seq_len] int32
    lm_weights                                          [seq_len] float32: 1 where the next token
                                                        is a CodePMP LM target
    chosen_index, rejected_index                        [pairs_per_row] int32, -1 unused
    margin                                              [pairs_per_row] float32
    bad_rows                                            []  rows skipped before this one
"""

import dataclasses

import numpy as np

from jaxrm.templates import Example


@dataclasses.dataclass
class Layout:
    """An example cut into packable pieces: (tokens, first position, attends to prefix?)."""

    pieces: list[tuple[np.ndarray, int, bool]]
    example: Example

    @property
    def length(self) -> int:
        return sum(len(tokens) for tokens, _, _ in self.pieces)


def layout(example: Example, shared_prefix: bool) -> Layout:
    sequences = example.sequences
    shared = common_prefix_length(sequences) if shared_prefix and len(sequences) > 1 else 0
    if shared == 0:
        return Layout([(s, 0, False) for s in sequences], example)
    pieces = [(sequences[0][:shared], 0, False)]
    pieces += [(s[shared:], shared, True) for s in sequences]
    return Layout(pieces, example)


def common_prefix_length(sequences: list[np.ndarray]) -> int:
    """Tokens all sequences start with, leaving each at least its last (reward) token."""
    limit = min(len(s) for s in sequences) - 1
    first = sequences[0][:limit]
    same = np.ones(limit, bool)
    for other in sequences[1:]:
        same &= first == other[:limit]
    return int(limit if same.all() else np.argmin(same))


class Row:
    def __init__(self, seq_len: int, pairs_per_row: int, with_lm: bool):
        self.seq_len = seq_len
        self.fields = {
            "tokens": np.zeros(seq_len, np.int32),
            "segment_ids": np.zeros(seq_len, np.int32),
            "positions": np.zeros(seq_len, np.int32),
            "prefix_ids": np.zeros(seq_len, np.int32),
            "chosen_index": np.full(pairs_per_row, -1, np.int32),
            "rejected_index": np.full(pairs_per_row, -1, np.int32),
            "margin": np.zeros(pairs_per_row, np.float32),
        }
        if with_lm:
            self.fields["lm_weights"] = np.zeros(seq_len, np.float32)
        self.used = 0
        self.pairs = 0
        self.segments = 0

    def fits(self, unit: Layout) -> bool:
        free_slots = len(self.fields["chosen_index"]) - self.pairs
        return self.used + unit.length <= self.seq_len and free_slots >= 1

    def add(self, unit: Layout) -> None:
        f = self.fields
        start = self.used
        prefix_segment = 0
        ends = []
        for tokens, first_position, attends_prefix in unit.pieces:
            end = self.used + len(tokens)
            self.segments += 1
            f["tokens"][self.used : end] = tokens
            f["segment_ids"][self.used : end] = self.segments
            f["positions"][self.used : end] = np.arange(
                first_position, first_position + len(tokens)
            )
            if attends_prefix:
                f["prefix_ids"][self.used : end] = prefix_segment
                ends.append(end - 1)
            elif len(unit.pieces) > len(unit.example.sequences):
                prefix_segment = self.segments  # the shared prefix, packed first
            else:
                ends.append(end - 1)
            self.used = end
        f["chosen_index"][self.pairs] = ends[0]
        f["rejected_index"][self.pairs] = ends[1]
        f["margin"][self.pairs] = unit.example.margin
        mask = unit.example.lm_mask
        if mask is not None and "lm_weights" in f:
            # Sequence 0 (the chosen one) sits right after the prefix, so its token j is at
            # start + j in both layouts; it is predicted from position start + j - 1.
            f["lm_weights"][start : start + len(mask) - 1] = mask[1:]
        self.pairs += 1


def pack(
    examples: list[Example], seq_len: int, pairs_per_row: int, shared_prefix: bool, with_lm: bool
) -> list[dict[str, np.ndarray]]:
    """First-fit decreasing: longest examples first, each into the first row with room."""
    units = [layout(e, shared_prefix) for e in examples]
    for unit in units:
        if unit.length > seq_len:
            raise ValueError(f"an example of {unit.length} tokens cannot fit a row of {seq_len}")
    rows: list[Row] = []
    for unit in sorted(units, key=lambda u: -u.length):
        row = next((r for r in rows if r.fits(unit)), None)
        if row is None:
            row = Row(seq_len, pairs_per_row, with_lm)
            rows.append(row)
        row.add(unit)
    return [r.fields for r in rows]


def empty_row(seq_len: int, pairs_per_row: int, with_lm: bool) -> dict[str, np.ndarray]:
    return Row(seq_len, pairs_per_row, with_lm).fields
