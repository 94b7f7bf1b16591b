"""Memory of training runs: the options (``memory=default|low|gpu24``), the optimizers they
choose (including the fused backward pass), and the plan of a run's peak memory by part."""

from idgen.memory.settings import MemorySettings

__all__ = ["MemorySettings"]
