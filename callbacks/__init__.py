"""Lightning callbacks of svcca-torch (installed as ``svcca_torch.callbacks``)."""
from .svcca_callback import SVCCACallback

__all__ = ["SVCCACallback"]
