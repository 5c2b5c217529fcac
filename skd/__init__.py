"""SKD: original entry points rebuilt on segkd's common package."""
