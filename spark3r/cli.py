"""Only for spark3r.models.train_tiny until its command moves to the command floor: the shared command helpers live in
spark3r.commands.arguments."""
from spark3r.commands.arguments import ArgumentParser, add_runtime_args, command, resolve_device, resolve_dtype

__all__ = ["ArgumentParser", "add_runtime_args", "command", "resolve_device", "resolve_dtype"]
