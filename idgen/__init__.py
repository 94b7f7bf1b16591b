"""idgen: in-domain generation on Stable Diffusion 1.5 from a folder of unlabeled images."""

from pathlib import Path

__version__ = "0.1.0"

# The Hydra config tree lives beside the package (repository layout, editable install).
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
