"""ComfyUI node classes (classic V1 contract), one file per feature, registered by `registry.build()`."""
