"""Evaluation of sentence encoders: STS (``sts``) and SentEval transfer tasks (``transfer``).

``eval_main(argv)`` is the ``hncse-dist eval`` command; the trainer uses ``sts.dev_spearman``.
Submodules are imported lazily so that importing this package stays cheap.
"""

from __future__ import annotations

from typing import Sequence


def eval_main(argv: Sequence[str] | None = None) -> int:
    """``hncse-dist eval ...``: parse ``argv``, evaluate, print a table; returns the exit code."""
    from .run import eval_main as _eval_main

    return _eval_main(argv)


__all__ = ["eval_main"]
