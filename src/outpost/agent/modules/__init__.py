"""Edge modules on the machine: the supervisor that keeps a deployment's module processes
running (supervisor.py and its neighbours) and the local message hub that carries their
messages (msghub.py, upstream.py). The daemon loads this package only once the hub names a
deployment for the machine, or the state directory records modules that may still run.
"""
