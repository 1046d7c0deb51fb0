"""The store schema: versioned CQL migrations (``migrations/NNNN_name.cql``), shipped as package data."""
