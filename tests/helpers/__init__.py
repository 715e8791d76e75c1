"""Builders shared by the test suites (tiny random models saved in the real on-disk formats)."""
