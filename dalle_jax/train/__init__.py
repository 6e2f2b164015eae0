"""The training core shared by every stage: mesh and logical sharding, the jitted step,
optimizer, orbax checkpoints with exact resume, metrics. (Next milestone.)"""
