"""Generating pre-training data with models: the KV-cache sampler, resumable trajectory files
(`jaxrm generate`), POLAR policy pools (`jaxrm data polar-pool`) and CodePMP strong / weak
generation (`jaxrm data codepmp-generate`).
"""
