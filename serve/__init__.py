"""nestling's torch-free runtime: the embeddable Reasoner, its engines (ONNX, GGUF) and the server.

    from nestling.serve import Reasoner
    print(Reasoner.load("runs/default/exports/tiny").ask("What is 7 + 5?").answer)

The runtime names resolve lazily, so ``import nestling.serve`` loads neither an engine library nor fastapi.
What every stage shares (manifests, errors, configs, specs, prompting, answer and step checks) is in
``nestling.core``, below this package.
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
    raise AttributeError(f"module 'nestling.serve' has no attribute {name!r}")
