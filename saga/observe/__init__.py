"""Saga visibility: the saga log, traces, status.

* :class:`SagaObserver` (``saga observe``) fills the saga log
  (:class:`SagaLog`) from the saga topics;
* :func:`trace_from_log`, :func:`trace_from_kafka` and
  :func:`trace_from_service` rebuild one saga's :class:`Trace`
  (``saga trace``), rendered by :func:`render_trace`;
* :func:`observed_graph` draws the choreography as observed (``saga graph``);
* :func:`saga_status` counts sagas and lists those that need attention
  (``saga status``).
"""

from saga.observe.api import trace_from_kafka, trace_from_log, trace_from_service
from saga.observe.graph import Graph, observed_graph, render_graph
from saga.observe.log import SagaLog, SagaSummary
from saga.observe.message import ObservedMessage
from saga.observe.observer import ObserverSettings, ObserverStats, SagaObserver
from saga.observe.render import FORMATS, render_trace
from saga.observe.status import StatusReport, saga_status
from saga.observe.trace import Trace, TraceEntry, Waiting, build_trace

__all__ = [
    "FORMATS",
    "Graph",
    "ObservedMessage",
    "ObserverSettings",
    "ObserverStats",
    "SagaLog",
    "SagaObserver",
    "SagaSummary",
    "StatusReport",
    "Trace",
    "TraceEntry",
    "Waiting",
    "build_trace",
    "observed_graph",
    "render_graph",
    "render_trace",
    "saga_status",
    "trace_from_kafka",
    "trace_from_log",
    "trace_from_service",
]
