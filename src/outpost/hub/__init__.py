"""The control plane: accounts, machines, dispatch, and the HTTPS API that serves them.

Needs the ``hub`` extra. Imports nothing from ``outpost.agent``.
"""
