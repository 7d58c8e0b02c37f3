"""Readers turn a source Redis into batches of entries (see ``cdcd.entry``)."""
