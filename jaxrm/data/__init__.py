"""Rows to packed token rows: sources and row checks, tokenizers, the POLAR / pairwise / CodePMP
templates, packing, the per-host Grain pipeline, `jaxrm data prepare` / `stats`, and the builders
of pre-training data (POLAR triples, CodePMP pairs, corpus prefixes, the toy datasets).

Never imports the model: its output is numpy arrays of token ids, segments and positions.
"""
