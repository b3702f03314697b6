"""megatron-swift: train Hugging Face-family LLMs on megatron-core, from one command."""
import warnings

__version__ = "0.1.0"

# Transformer Engine and Apex are optional extras; megatron-core warns at import
# time whenever they are absent. The backend layer reports what it chose instead.
for _pattern in (r"Apex is not installed.*", r"Transformer Engine and Apex are not installed.*",
                 r"Transformer Engine is not installed.*", r"full scope is deprecated.*"):
    warnings.filterwarnings("ignore", message=_pattern)

# Importing megatron-core later in this process skips what no run needs up front (import_cost.py).
from megatron_swift import import_cost as _import_cost  # noqa: E402

_import_cost.install()
