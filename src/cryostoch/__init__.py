"""cryostoch: ab initio cryo-EM reconstruction by stochastic optimisation (arXiv 1501.04656)."""

__version__ = "0.1.0"
