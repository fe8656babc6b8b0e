"""PTQ methods, one per file, each registered by name with ``@register_method`` (see registry.py)."""
