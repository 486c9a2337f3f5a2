"""HTTP routes, one module per surface: native jobs, OpenAI-compatible images, files, presets, system."""
