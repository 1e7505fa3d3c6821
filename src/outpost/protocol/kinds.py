"""The kinds of work item (work.py has their payload and result models).

Apart from the models so that the agent can register its handlers by kind without building
pydantic's validators: an idle agent never parses a work item (see readers.py).
"""

from __future__ import annotations

JOB = "job"
PING = "ping"
JOB_CONTROL = "job_control"
EXT_OP = "ext_op"
