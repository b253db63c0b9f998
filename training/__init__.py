"""Training: the package that produces the checkpoints the workers serve (ARCHITECTURE.md).

`ddpm train` reads a data set (`data`), runs the loop (`trainer`) with EMA, warm-up,
clipping, bf16 and DDP, and writes a servable checkpoint directory plus the state that
`--resume` continues from exactly. `ddpm eval` scores a checkpoint (`evaluate`).
"""
