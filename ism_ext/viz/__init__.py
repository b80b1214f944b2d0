"""Pictures (PNG): attention masks of dialogues, and chat latency per round.

matplotlib is imported lazily inside the functions, so importing this package costs nothing and works
headless.
"""

from .latency import save_ttft_plot
from .masks import save_figure, save_mask_picture, save_scheme_comparison

__all__ = ["save_figure", "save_mask_picture", "save_scheme_comparison", "save_ttft_plot"]
