class PluginConfig:
    """Attributes are the plugin settings (the builder sets them one by one)."""
