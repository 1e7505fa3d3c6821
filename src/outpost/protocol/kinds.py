"""The kinds of work item (work.py has their payload and result models).

Apart from the models so that the agent registers its handlers by kind without importing
them: it reads the built-in kinds' payloads without pydantic (readers.py says why).
"""

from __future__ import annotations

JOB = "job"
PING = "ping"
JOB_CONTROL = "job_control"
EXT_OP = "ext_op"
MODULE_CALL = "module_call"
