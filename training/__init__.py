"""Training: data sets, loop, EMA, checkpoints the workers serve; built in a later issue."""
