"""Tests of the car-wash task types, run through the real engine over SQLite in tmp_path."""
