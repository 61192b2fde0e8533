"""nestling: distil a big model's chain-of-thought into a small reasoner, export it, serve it.

The stages are ``nestling.distill``, ``nestling.export`` and ``nestling.serve`` (top-level folders in the
repository, installed under this one name so nothing generic lands in site-packages).
``from nestling.serve import Reasoner`` is the embedding API; ``nestling.cli`` is the command line.
"""

__version__ = "0.1.0"
