"""The model registry: packaging, all-or-nothing registration, promotion, scoring and the model card.

Aliases, not stages. A new version of the product gets `challenger`;
`promote` compares it with `champion` on the same frozen test split and, if
every gate passes, moves `champion` to it and keeps the old one as
`previous-champion`; `rollback` restores `previous-champion`.

- `packaging`: the served pyfunc (classifier + preprocessing), its signature and requirements;
- `registration`: all-or-nothing registration of a run's models (the pipeline's and the pretrain flow's);
- `promotion`: gates, promote, rollback and the audit trail;
- `scoring`: raw rows through a registered model (batch scoring, promotion's re-scoring);
- `card`: the model card a reviewer reads.

Plain functions over a `distilflow.tracking.Tracker`; the Prefect flows and
the lock that keeps two changes of one model apart live in flows/registry.py and flows/locks.py.
"""

CHALLENGER, CHAMPION, PREVIOUS = "challenger", "champion", "previous-champion"
AUDIT_EXPERIMENT = "distilflow-registry-audit"
