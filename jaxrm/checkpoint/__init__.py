"""A model on disk: the jaxrm checkpoint format (Orbax items: params, config, tokenizer) and
finding the model behind a CHECKPOINT argument (a checkpoint, a run directory or a HF directory).
"""
