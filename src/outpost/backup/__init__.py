"""Backups of a machine to its hub with restic: ``bridge`` lets restic reach the machine's
repository on the hub (docs/backup.md)."""
