"""focus_ref: a readable reference implementation of FOCUS (arXiv 2506.16806)."""

from focus_ref.config import FocusConfig

__version__ = "0.1.0"
__all__ = ["FocusConfig", "FocusModel", "__version__"]


def __getattr__(name):  # FocusModel pulls in torch/transformers/diffusers: import on first use
    if name == "FocusModel":
        from focus_ref.model import FocusModel

        return FocusModel
    raise AttributeError(name)
