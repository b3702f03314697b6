"""What a person watches: the console progress line, metrics.jsonl, TensorBoard and WandB."""
from megatron_swift.observe.sinks import Sinks  # noqa: F401
