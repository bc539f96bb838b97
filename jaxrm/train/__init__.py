"""Training: the jitted step (`trainer`), the run loop with resume and preemption (`loop`), losses,
optimizers, training checkpoints, metrics and plots, FLOPs / MFU, joining the processes of a
multi-host run, host-memory settings for XLA:CPU, and scaling-law fits over finished runs.
"""
