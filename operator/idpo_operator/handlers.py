"""kopf handlers: each only names the run to reconcile; `apply.reconcile_run` does the rest.

kopf run --standalone -m idpo_operator.handlers --namespace ml      # or: idpo operator
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from idpo_operator import apply
from idpo_operator.resources import LABEL_RUN
from idpo_operator.spec import GROUP, PLURAL, VERSION

RUNS = (GROUP, VERSION, PLURAL)
SAFETY_NET_SECONDS = 30.0


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # kopf's bookkeeping goes to annotations, so `status` stays ours alone.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="idpo.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="idpo.dev")
    settings.posting.level = logging.WARNING  # our own events tell the run's story
    settings.watching.server_timeout = 300
    apply.connect()


@kopf.on.resume(*RUNS)
@kopf.on.create(*RUNS)
@kopf.on.update(*RUNS)
def run_changed(name: str, namespace: str, **_: Any) -> None:
    apply.reconcile_run(namespace, name)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_RUN: kopf.PRESENT})
def job_changed(labels: dict[str, str], namespace: str, **_: Any) -> None:
    apply.reconcile_run(namespace, labels[LABEL_RUN])


@kopf.timer(*RUNS, interval=SAFETY_NET_SECONDS, initial_delay=SAFETY_NET_SECONDS)
def safety_net(name: str, namespace: str, **_: Any) -> None:
    """Catches anything a missed watch event would leave waiting."""
    apply.reconcile_run(namespace, name)


@kopf.on.probe(id="reconciles")
def reconciles(**_: Any) -> int:
    return apply.reconciles
