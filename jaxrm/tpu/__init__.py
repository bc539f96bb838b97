"""TPU without a TPU: ahead-of-time compiles of the train step for a named slice topology, with
per-chip memory and a roofline step-time estimate (`jaxrm compile-check`).
"""
