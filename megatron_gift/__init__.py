"""GIFT post-training (Gibbs Initialization with Finite Temperature) on Megatron-Core.

Importing the package changes nothing in torch or Megatron-Core; the CPU compatibility layer
is applied only by an explicit :func:`megatron_gift.platform.cpu.enable_cpu_megatron` call.
"""

__version__ = "0.1.0"
