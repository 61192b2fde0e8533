"""nestling: distil a big model's chain-of-thought into a small reasoner, export it, serve it.

The stages live in ``nestling.distill``, ``nestling.export`` and ``nestling.serve`` (the repository keeps them as
top-level folders; packaging maps them under this one name so nothing generic lands in site-packages).
``from nestling.serve import Reasoner`` is the embedding API; ``nestling.cli`` is the command line.
"""

__version__ = "0.1.0"
