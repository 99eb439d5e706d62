"""rule-sidecar: a hot-reload rule service for Kubernetes, and the library under it.

Data flows one way: sources produce files → `loader` validates and compiles them into an
immutable `Snapshot` → `RuleRegistry` publishes snapshots → `engine` evaluates them.
"""

from sidecar.editing import RegistryEditor
from sidecar.engine import Evaluation, evaluate, evaluate_many
from sidecar.errors import (
    ConflictError,
    InputError,
    LoadError,
    NotFoundError,
    Problem,
    RuleSidecarError,
)
from sidecar.loader import Loader, LoadResult
from sidecar.model import Rule, RuleSet
from sidecar.registry import ChangeEvent, EventType, RuleRegistry
from sidecar.snapshot import Snapshot

__version__ = "0.1.0"

__all__ = [
    "ChangeEvent",
    "ConflictError",
    "Evaluation",
    "EventType",
    "InputError",
    "LoadError",
    "LoadResult",
    "Loader",
    "NotFoundError",
    "Problem",
    "RegistryEditor",
    "Rule",
    "RuleRegistry",
    "RuleSet",
    "RuleSidecarError",
    "Snapshot",
    "__version__",
    "evaluate",
    "evaluate_many",
]
