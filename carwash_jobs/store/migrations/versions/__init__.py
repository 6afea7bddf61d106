"""The numbered schema revisions, loaded by Alembic from this directory (not imported)."""

from __future__ import annotations
