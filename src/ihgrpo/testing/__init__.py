"""Test support: stand-ins that let the library be exercised offline (no model hub)."""
