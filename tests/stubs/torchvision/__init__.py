"""Import-time stand-in for torchvision (the CPU torch wheel here has no matching torchvision)."""
from . import transforms  # noqa: F401
