"""Pure rules of the product, with no I/O: credentials, limits."""
