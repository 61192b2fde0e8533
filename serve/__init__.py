"""nestling's torch-free floor: manifests, answer extraction, step checks, and the runtime.

    from nestling.serve import Reasoner
    print(Reasoner.load("runs/default/exports/tiny").ask("What is 7 + 5?").answer)

The runtime names resolve lazily, so ``import serve`` (which every stage does for serve.errors and friends)
loads neither an engine library nor fastapi.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nestling.serve.runtime import Answer, Latency, Reasoner, Step

__all__ = ["Answer", "Latency", "Reasoner", "Step"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from nestling.serve import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'serve' has no attribute {name!r}")
