"""The runbook helper's files, copied into every job's helper directory by ``agent.helper``.

``outpost_runbook.py`` is a Python module and command, and ``outpost.sh`` a file for bash and
sh to source. Both run under the runbook's own interpreter, which may not have Outpost
installed, so they use the standard library only.
"""
