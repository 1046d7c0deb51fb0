"""dsched: one import namespace for the repository's top-level packages (each is a link to its folder)."""
