"""Training and evaluation of the bundled vggt-tiny (the command: spark3r.commands.train_tiny)."""
