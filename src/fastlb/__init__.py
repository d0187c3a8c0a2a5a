"""fastlb: a Layer-4 (TCP and UDP) load balancer with a Cython data plane and a Python control plane."""

from fastlb._version import __version__

__all__ = ["__version__"]
