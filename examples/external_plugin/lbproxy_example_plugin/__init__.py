"""Example external routing plugins for lbproxy (see README.md)."""
