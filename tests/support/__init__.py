"""Test doubles and runners shared by the unit and integration tests (not shipped in the image)."""
