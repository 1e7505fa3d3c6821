"""The extensions shipped with Outpost (each a package the hub publishes at ``hub init``)."""
