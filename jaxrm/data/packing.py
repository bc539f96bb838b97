"""Packing templated examples into fixed rows of `seq_len` tokens.

A row holds whole examples one after another: at most `pairs_per_row` of them, each a pair or a
ranked list of at most `max_candidates` responses. Each sequence gets its own segment id (1, 2,
...; 0 is padding) and positions from 0, so attention never crosses sequences. With a shared
prefix, the tokens common to all candidates of an example (in a POLAR triple
`P+SEP+R+<|reward|>+P+SEP`, in a CodePMP pair the prompt) are packed once as a segment of their
own; each candidate's tokens then carry `prefix_ids` = that segment, attend to it and to
themselves, and continue its positions. The model then computes exactly what it would on the full
sequences, with fewer tokens.

Row fields (numpy, one row):
    tokens, segment_ids, positions, prefix_ids         [seq_len] int32
    lm_weights                                          [seq_len] float32: 1 where the next token
                                                        is a CodePMP LM target
    reward_index                                        [pairs_per_row, max_candidates] int32:
                                                        [s, k] is the index of the reward (last)
                                                        token of the k-th best response of the
                                                        row's s-th example; -1 for unused
                                                        slots and responses it lacks. For
                                                        objective prm [pairs_per_row, max_steps]:
                                                        [s, j] is where step j is judged
    margin                                              [pairs_per_row] float32
    target                                              [pairs_per_row] float32: the score of
                                                        a regression example; [pairs_per_row,
                                                        attributes] for a multi-attribute head
                                                        (NaN where not rated)
    step_labels                                         [pairs_per_row, max_steps] float32: the
                                                        label of each step (objective prm)
    bad_rows                                            []  rows skipped before this one
"""

import dataclasses
import math

import numpy as np

from jaxrm.data.templates import Example


@dataclasses.dataclass
class Layout:
    """An example cut for packing: the shared prefix (empty when not shared) and, per
    candidate, the tokens after it."""

    prefix: np.ndarray
    candidates: list[np.ndarray]
    example: Example

    @property
    def length(self) -> int:
        return len(self.prefix) + sum(len(c) for c in self.candidates)


def layout(example: Example, shared_prefix: bool) -> Layout:
    sequences = example.sequences
    shared = common_prefix_length(sequences) if shared_prefix and len(sequences) > 1 else 0
    return Layout(sequences[0][:shared], [s[shared:] for s in sequences], example)


def common_prefix_length(sequences: list[np.ndarray]) -> int:
    """Tokens all sequences start with, leaving each at least its last (reward) token."""
    limit = min(len(s) for s in sequences) - 1
    first = sequences[0][:limit]
    same = np.ones(limit, bool)
    for other in sequences[1:]:
        same &= first == other[:limit]
    return int(limit if same.all() else np.argmin(same))


class Row:
    def __init__(
        self,
        seq_len: int,
        pairs_per_row: int,
        max_candidates: int,
        objective: str,
        attributes: int = 0,
    ):
        self.seq_len = seq_len
        self.fields = {
            "tokens": np.zeros(seq_len, np.int32),
            "segment_ids": np.zeros(seq_len, np.int32),
            "positions": np.zeros(seq_len, np.int32),
            "prefix_ids": np.zeros(seq_len, np.int32),
            "reward_index": np.full((pairs_per_row, max_candidates), -1, np.int32),
            "margin": np.zeros(pairs_per_row, np.float32),
        }
        if objective == "codepmp":
            self.fields["lm_weights"] = np.zeros(seq_len, np.float32)
        if objective == "regression" and attributes:
            self.fields["target"] = np.full((pairs_per_row, attributes), np.nan, np.float32)
        elif objective == "regression":
            self.fields["target"] = np.zeros(pairs_per_row, np.float32)
        if objective == "prm":
            self.fields["step_labels"] = np.zeros((pairs_per_row, max_candidates), np.float32)
        self.used = 0
        self.examples = 0
        self.segments = 0

    def fits(self, unit: Layout) -> bool:
        free_slots = len(self.fields["reward_index"]) - self.examples
        return self.used + unit.length <= self.seq_len and free_slots >= 1

    def add(self, unit: Layout) -> None:
        f = self.fields
        start = self.used
        prefix_segment = self._place(unit.prefix, 0, 0) if len(unit.prefix) else 0
        for rank, tokens in enumerate(unit.candidates):
            self._place(tokens, len(unit.prefix), prefix_segment)
            f["reward_index"][self.examples, rank] = self.used - 1  # its last (reward) token
        reads = unit.example.reads
        if reads is not None:  # a process-reward example, judged at each step's reward token
            f["reward_index"][self.examples, : len(reads)] = start + reads
            f["step_labels"][self.examples, : len(reads)] = unit.example.labels
        f["margin"][self.examples] = unit.example.margin
        if "target" in f:
            f["target"][self.examples] = unit.example.target
        mask = unit.example.lm_mask
        if mask is not None and "lm_weights" in f:
            # Sequence 0 (the best one) sits right after the prefix, so its token j is at
            # start + j in both layouts; it is predicted from position start + j - 1.
            f["lm_weights"][start : start + len(mask) - 1] = mask[1:]
        self.examples += 1

    def _place(self, tokens: np.ndarray, first_position: int, prefix_segment: int) -> int:
        """Appends `tokens` as a new segment; returns its segment id."""
        f, begin, end = self.fields, self.used, self.used + len(tokens)
        self.segments += 1
        f["tokens"][begin:end] = tokens
        f["segment_ids"][begin:end] = self.segments
        f["positions"][begin:end] = np.arange(first_position, first_position + len(tokens))
        f["prefix_ids"][begin:end] = prefix_segment
        self.used = end
        return self.segments


def pack(
    examples: list[Example],
    seq_len: int,
    pairs_per_row: int,
    max_candidates: int,
    shared_prefix: bool,
    objective: str,
    attributes: int = 0,
) -> list[dict[str, np.ndarray]]:
    """First-fit decreasing: longest examples first, each into the first row with room
    (`attributes`: the targets per regression example, 0 for one score)."""
    units = [layout(e, shared_prefix) for e in examples]
    for unit in units:
        if unit.length > seq_len:
            raise ValueError(f"an example of {unit.length} tokens cannot fit a row of {seq_len}")
    rows: list[Row] = []
    for unit in sorted(units, key=lambda u: -u.length):
        row = next((r for r in rows if r.fits(unit)), None)
        if row is None:
            row = Row(seq_len, pairs_per_row, max_candidates, objective, attributes)
            rows.append(row)
        row.add(unit)
    return [r.fields for r in rows]


def empty_row(
    seq_len: int, pairs_per_row: int, max_candidates: int, objective: str, attributes: int = 0
) -> dict[str, np.ndarray]:
    return Row(seq_len, pairs_per_row, max_candidates, objective, attributes).fields


def round_up(n: int, minimum: int) -> int:
    """`n` rounded up to a quarter-octave step (4 steps per power of two), at least `minimum`."""
    if n <= minimum:
        return minimum
    step = max(1, 2 ** (math.ceil(math.log2(n)) - 3))
    return math.ceil(n / step) * step
