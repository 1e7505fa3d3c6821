"""The ``outpost`` command line."""
