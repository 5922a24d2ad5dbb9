"""``saga graph``: the choreography as observed in the saga log.

Nobody declares the choreography; it is read off the messages. A message of
type ``T`` emitted by service ``A`` whose id is the causation id of a message
emitted by ``B`` means that ``B`` consumes ``T`` from ``A``: an edge
``A --T--> B``, with the number of such messages and the median time from one
to the other. Messages that caused nothing observed (the end of a saga, or
consumers that emit nothing) end at their topic.

Output: Mermaid (a flowchart), Graphviz DOT, or an AsyncAPI 3.0 document of
the observed channels, messages (with their Avro schemas when the registry
knows them) and send/receive operations per service.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox.database import read_connection
from saga.envelope import CONTENT_TYPE
from saga.errors import SchemaError
from saga.observe.log import SagaLog
from saga.schemas import SchemaRegistry

__all__ = ["GRAPH_FORMATS", "Edge", "Graph", "observed_graph", "render_graph"]

GRAPH_FORMATS = ("mermaid", "dot", "asyncapi")
"""Output formats of ``saga graph``."""

AVRO_FORMAT = "application/vnd.apache.avro+json;version=1.9.0"


@dataclass(frozen=True, kw_only=True)
class Edge:
    """Messages of one type from one service, consumed by another (or by nobody seen)."""

    producer: str
    """Service that emits the messages."""
    event_type: str
    """Their type."""
    topic: str
    """Topic they travel on."""
    consumer: str | None
    """Service whose messages they caused; ``None`` when they caused none observed."""
    count: int
    """Messages."""
    median_ms: float | None
    """Median time from such a message to the first message it caused."""


@dataclass(frozen=True, kw_only=True)
class Graph:
    """The observed choreography."""

    edges: tuple[Edge, ...]
    """Every edge, sorted."""

    @property
    def services(self) -> list[str]:
        """Every service seen, in order of first appearance as a producer."""
        seen = [e.producer for e in self.edges] + [e.consumer for e in self.edges if e.consumer]
        return list(dict.fromkeys(seen))

    @property
    def topics(self) -> list[str]:
        """Every topic seen."""
        return sorted({e.topic for e in self.edges})


async def observed_graph(
    engine: AsyncEngine, *, log: SagaLog | None = None, saga_name: str | None = None
) -> Graph:
    """The choreography of the sagas in the saga log (optionally of one saga name)."""
    log = log or SagaLog(dialect=engine.dialect.name)
    m = log.messages.alias("m")
    n = log.messages.alias("n")
    query = select(
        m.c.message_id,
        m.c.service,
        m.c.event_type,
        m.c.topic,
        m.c.time_ms,
        n.c.service.label("consumer"),
        n.c.time_ms.label("caused_ms"),
    ).select_from(
        # A message written in the same transaction (same hop) was not consumed from it.
        m.outerjoin(n, (n.c.causation_id == m.c.message_id) & (n.c.hop > m.c.hop))
    )
    if saga_name is not None:
        query = query.where(m.c.saga_name == saga_name)
    async with read_connection(engine) as conn:
        rows = (await conn.execute(query)).all()
    # (message, consumer) -> latency to the first message it caused there
    first: dict[tuple[str, str | None], tuple[tuple[str, str, str], float | None]] = {}
    for row in rows:
        key = (row.message_id, row.consumer)
        latency = None if row.caused_ms is None else float(row.caused_ms - row.time_ms)
        edge = (row.service, row.event_type, row.topic)
        known = first.get(key)
        if known is None or (latency is not None and (known[1] is None or latency < known[1])):
            first[key] = (edge, latency)
    grouped: dict[tuple[str, str, str, str | None], list[float | None]] = defaultdict(list)
    for (_, consumer), (edge, latency) in first.items():
        grouped[(*edge, consumer)].append(latency)
    edges = []
    for (producer, event_type, topic, consumer), latencies in grouped.items():
        measured = [x for x in latencies if x is not None]
        edges.append(
            Edge(
                producer=producer,
                event_type=event_type,
                topic=topic,
                consumer=consumer,
                count=len(latencies),
                median_ms=statistics.median(measured) if measured else None,
            )
        )
    edges.sort(key=lambda e: (e.topic, e.producer, e.event_type, e.consumer or ""))
    return Graph(edges=tuple(edges))


def _id(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def _short(event_type: str) -> str:
    return event_type.rsplit(".", 1)[-1]


def _label(edge: Edge) -> str:
    label = f"{_short(edge.event_type)} x{edge.count}"
    if edge.median_ms is not None:
        label += f", p50 {edge.median_ms:.0f} ms"
    return label


def graph_mermaid(graph: Graph) -> str:
    """A Mermaid flowchart: services as boxes, topics as cylinders, one arrow per edge."""
    lines = ["flowchart LR"]
    lines += [f"    svc_{_id(s)}[{s}]" for s in graph.services]
    lines += [f"    topic_{_id(t)}[({t})]" for t in graph.topics]
    for edge in graph.edges:
        target = f"svc_{_id(edge.consumer)}" if edge.consumer else f"topic_{_id(edge.topic)}"
        arrow = "-->" if edge.consumer else "-.->"
        lines.append(f'    svc_{_id(edge.producer)} {arrow}|"{_label(edge)}"| {target}')
    return "\n".join(lines)


def graph_dot(graph: Graph) -> str:
    """A Graphviz digraph of the same."""
    lines = ["digraph choreography {", "    rankdir=LR;", "    node [shape=box];"]
    lines += [f'    "{t}" [shape=cylinder];' for t in graph.topics]
    for edge in graph.edges:
        target = edge.consumer or edge.topic
        style = "" if edge.consumer else ", style=dashed"
        lines.append(f'    "{edge.producer}" -> "{target}" [label="{_label(edge)}"{style}];')
    lines.append("}")
    return "\n".join(lines)


def _plain(schema: Any) -> Any:
    """A schema as parsed by fastavro, back in the form of an ``.avsc`` file.

    fastavro adds bookkeeping keys and writes full names (``a.b.Name``);
    AsyncAPI's Avro schema wants a simple ``name`` and a ``namespace``.
    """
    if isinstance(schema, list):
        return [_plain(v) for v in schema]
    if not isinstance(schema, Mapping):
        return schema
    plain = {k: _plain(v) for k, v in schema.items() if not str(k).startswith("__")}
    name = plain.get("name")
    if plain.get("type") in ("record", "enum", "fixed", "error") and "." in str(name):
        namespace, _, simple = str(name).rpartition(".")
        plain["name"] = simple
        plain.setdefault("namespace", namespace)
    return plain


_HEADERS = {
    "type": "object",
    "description": "CloudEvents Kafka binding (binary mode), W3C trace context and the "
    "saga state stamp (Avro choreosaga.saga.Stamp, single-object encoding).",
    "properties": {
        name: {"type": "string"}
        for name in (
            "ce_specversion",
            "ce_id",
            "ce_type",
            "ce_source",
            "ce_time",
            "ce_subject",
            "ce_correlationid",
            "ce_causationid",
            "content-type",
            "traceparent",
            "tracestate",
            "ce_sagastamp",
        )
    },
}


def graph_asyncapi(
    graph: Graph, registry: SchemaRegistry, *, title: str = "Observed choreography"
) -> dict[str, Any]:
    """An AsyncAPI 3.0.0 document of the observed channels, messages and operations."""
    channels: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for edge in graph.edges:
        channel_id = _id(edge.topic)
        message_id = _id(edge.event_type)
        channel = channels.setdefault(
            channel_id, {"address": edge.topic, "messages": {}, "bindings": {"kafka": {}}}
        )
        channel["messages"][message_id] = {"$ref": f"#/components/messages/{message_id}"}
        if message_id not in messages:
            message: dict[str, Any] = {
                "name": edge.event_type,
                "title": _short(edge.event_type),
                "contentType": CONTENT_TYPE,
                "headers": _HEADERS,
            }
            try:
                schema = registry.latest(edge.event_type).parsed
            except SchemaError:
                pass  # observed, but its schema is not at hand
            else:
                message["payload"] = {"schemaFormat": AVRO_FORMAT, "schema": _plain(schema)}
            messages[message_id] = message
        ref = {"$ref": f"#/channels/{channel_id}/messages/{message_id}"}
        roles = [("send", edge.producer)]
        if edge.consumer:
            roles.append(("receive", edge.consumer))
        for action, service in roles:
            operation_id = f"{_id(service)}_{action}s_{message_id}"
            operations.setdefault(
                operation_id,
                {
                    "action": action,
                    "channel": {"$ref": f"#/channels/{channel_id}"},
                    "messages": [ref],
                    "tags": [{"name": service}],
                },
            )
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": title,
            "version": "1.0.0",
            "description": "Channels, messages and operations as observed in a choreosaga "
            "saga log (saga graph --format asyncapi).",
        },
        "defaultContentType": CONTENT_TYPE,
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }


def render_graph(graph: Graph, fmt: str, registry: SchemaRegistry | None = None) -> str:
    """Render in one of :data:`GRAPH_FORMATS` (AsyncAPI as JSON)."""
    if fmt == "dot":
        return graph_dot(graph)
    if fmt == "asyncapi":
        return json.dumps(graph_asyncapi(graph, registry or SchemaRegistry.default()), indent=2)
    return graph_mermaid(graph)
