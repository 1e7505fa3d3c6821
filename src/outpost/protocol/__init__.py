"""What the hub and the agent share: wire models, request signing and the error catalog.

Nothing here imports the hub's or the agent's code, and nothing here needs a dependency
beyond the base install.
"""
