"""File formats: detection by content and loaders for every layout people download (see each module)."""
