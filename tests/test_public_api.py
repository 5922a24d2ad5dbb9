"""The public surface: what users may import, and the layering rules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from support import parse_python

import outbox
import saga

ROOT = Path(__file__).parent.parent

SAGA_API = [
    "AvroCodec",
    "BrokerError",
    "BusinessFailure",
    "ChoreosagaError",
    "ConfigurationError",
    "DeadLetter",
    "DeadLetterSelection",
    "DecodeError",
    "DecodeLimits",
    "DurationArgument",
    "EmbeddedBroker",
    "EncodeError",
    "Envelope",
    "HandlerError",
    "InboxSettings",
    "IncompatibleSchemaError",
    "KafkaSettings",
    "MessageContext",
    "ObserverSettings",
    "OutboxTables",
    "RecordInfo",
    "RelaySettings",
    "RetryPolicy",
    "SagaContext",
    "SagaError",
    "SagaObserver",
    "SagaStatus",
    "SchemaError",
    "SchemaRegistry",
    "Service",
    "ServiceSettings",
    "ServiceStats",
    "Stamp",
    "StepOutcome",
    "StepRecord",
    "Suspension",
    "Trace",
    "configure_from_env",
    "create_engine",
    "ensure_topics",
    "instrument",
    "read_dead_letters",
    "replay",
    "saga_status",
    "trace_from_kafka",
    "trace_from_log",
    "trace_from_service",
]

OUTBOX_API = [
    "ChoreosagaError",
    "ConfigurationError",
    "ErrorKind",
    "Header",
    "InboxSettings",
    "InboxStore",
    "KafkaPublisher",
    "KafkaSettings",
    "MemoryPublisher",
    "MessageTooLargeError",
    "OutboxError",
    "OutboxMessage",
    "OutboxStats",
    "OutboxStore",
    "OutboxTables",
    "ParkedMessage",
    "PublishError",
    "PublishedRecord",
    "Publisher",
    "Relay",
    "RelaySettings",
    "RelayStats",
    "RetryPolicy",
    "SqlInboxStore",
    "SqlOutboxStore",
    "StoreError",
    "StoredMessage",
    "Transaction",
    "classify",
    "configure_sqlite",
    "create_engine",
    "ensure_topics",
    "is_transient_db_error",
]


def test_saga_exports_exactly_its_public_api() -> None:
    assert saga.__all__ == SAGA_API
    assert all(getattr(saga, name) is not None for name in SAGA_API)


def test_outbox_exports_exactly_its_public_api() -> None:
    assert outbox.__all__ == OUTBOX_API
    assert all(getattr(outbox, name) is not None for name in OUTBOX_API)


def test_every_error_shares_one_root() -> None:
    saga_errors = [getattr(saga, n) for n in SAGA_API if n.endswith("Error")]
    outbox_errors = [getattr(outbox, n) for n in OUTBOX_API if n.endswith("Error")]
    assert saga.ChoreosagaError is outbox.ChoreosagaError
    assert all(issubclass(e, saga.ChoreosagaError) for e in saga_errors + outbox_errors)
    assert all(issubclass(e, saga.SagaError) for e in saga_errors if e is not saga.ChoreosagaError)
    assert issubclass(saga.ConfigurationError, ValueError)


def test_outbox_knows_nothing_of_sagas() -> None:
    code = "import outbox, sys; print(sorted(m for m in sys.modules if m.split('.')[0] == 'saga'))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert result.stdout.strip() == "[]"
    for path in (ROOT / "outbox").glob("*.py"):
        imported = _imported_modules(path)
        assert not any(m.split(".")[0] == "saga" for m in imported), path


def test_reference_services_use_only_the_public_api() -> None:
    for path in (ROOT / "services").glob("*.py"):
        for module in _imported_modules(path):
            top = module.split(".")[0]
            assert top != "outbox", f"{path.name} imports {module}"
            assert module == "saga" or top != "saga", f"{path.name} imports {module}"


def _imported_modules(path: Path) -> set[str]:
    tree = parse_python(path)
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules
