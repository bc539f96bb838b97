"""Using a trained reward model: length-bucketed scoring (`jaxrm score`), preference accuracy and
Best-of-N (`jaxrm eval`, `jaxrm best-of-n`), the HTTP reward server (`jaxrm serve`) and its
client. `client` imports the standard library only, so RL workers need no JAX to call a server.
"""
