"""`rule-sidecar` with the per-rule counting switched off, so that `bench.insight` can
measure in one run what counting costs. Not a setting of the sidecar: it always counts.

    python -m bench._uncounted serve --port 8000 ...
"""

from __future__ import annotations

import sys

from sidecar.cli import main
from sidecar.engine import Evaluation
from sidecar.model import RuleSet
from sidecar.tallies import DecisionTallies


def _not_counted(self: DecisionTallies, ruleset: RuleSet, evaluation: Evaluation) -> None:
    """What `DecisionTallies.count` does here: nothing."""


DecisionTallies.count = _not_counted  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())
