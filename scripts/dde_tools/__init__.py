"""Python side of dde: fixtures, model export and Pick-a-Pic export (see docs/formats.md)."""
