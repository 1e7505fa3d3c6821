"""Code that the hub and the agent both use and that is not part of the wire protocol."""
