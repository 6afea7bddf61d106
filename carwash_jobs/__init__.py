"""carwash-jobs: durable background jobs. Task-type authors need only the names below."""

from __future__ import annotations
