"""lth: tracked lottery-ticket transfer studies."""

__version__ = "0.1.0"
