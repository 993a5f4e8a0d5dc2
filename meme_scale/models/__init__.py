"""Models: MEME and the baselines it is compared with, behind one interface (``loss(batch)``)."""

from .meme import MEME, MultimodalVAE, count_parameters
from .networks import NETWORKS, ModalitySpec, auto_network, build_networks

MODELS = {"meme": MEME}

__all__ = ["MEME", "MODELS", "NETWORKS", "ModalitySpec", "MultimodalVAE", "auto_network", "build_networks",
           "count_parameters"]
